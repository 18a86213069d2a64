"""crossroute.domains."""
