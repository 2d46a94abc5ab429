"""`python -m gateway`: the public Recommender service, standalone."""

from gateway.server import main

main()
