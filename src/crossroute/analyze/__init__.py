"""crossroute.analyze."""
