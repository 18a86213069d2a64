"""crossroute.report."""
