"""crossroute.cli."""
