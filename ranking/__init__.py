"""Ranking: the item encoder, the query encoder, the ranker, their training and the Ranking service."""
