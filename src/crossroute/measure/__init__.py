"""crossroute.measure."""
