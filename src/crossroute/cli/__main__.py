"""`python -m crossroute.cli` (and `accelerate launch -m crossroute.cli`): the crossroute command line."""

from crossroute.cli.main import main

if __name__ == "__main__":
    main()
