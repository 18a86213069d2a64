"""`python -m crossroute ...`: the same CLI as the `crossroute` console script (e.g. under accelerate launch)."""

from crossroute.cli.main import main

main()
