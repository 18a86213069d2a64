"""crossroute.experiments."""
