"""crossroute.core."""
