"""crossroute.io."""
