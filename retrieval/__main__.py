"""`python -m retrieval`: one recall shard, standalone."""

from retrieval.server import main

main()
