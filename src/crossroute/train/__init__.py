"""crossroute.train."""
