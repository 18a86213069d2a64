"""crossroute.model."""
