"""Recall: item vectors per channel, FAISS index build and search, sharding, the Recall service."""
