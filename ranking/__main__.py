"""`python -m ranking`: the ranking service, standalone."""

from ranking.server import main

main()
