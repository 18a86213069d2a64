"""crossroute.repair."""
