"""Recall channels and item ownership, shared by recall, ranking and the gateway."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

SEQUENTIAL = "sequential"  # query-encoder user vector vs item vectors (two-tower)
SEMANTIC = "semantic"      # recency-weighted LM text vector of the history vs item text vectors
POPULAR = "popular"        # most interacted items; answers users without history

VECTOR_CHANNELS = (SEQUENTIAL, SEMANTIC)
CHANNELS = (SEQUENTIAL, SEMANTIC, POPULAR)


@dataclass(frozen=True)
class ChannelQuery:
    """One channel's part of a recall search: k hits for a query vector (none for popular)."""

    channel: str
    k: int
    vector: np.ndarray | None = None  # (dim,) for vector channels


def shard_of(item_id: str, num_shards: int) -> int:
    """The shard that owns an item: a stable hash, so ownership survives restarts and versions."""
    return zlib.crc32(item_id.encode("utf-8")) % num_shards
