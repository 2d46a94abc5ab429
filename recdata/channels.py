"""Recall channels and item ownership, shared by recall, ranking and the gateway."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

SEQUENTIAL = "sequential"  # query-encoder user vector vs item vectors (two-tower)
SEMANTIC = "semantic"      # recency-weighted LM text vector of the history vs item text vectors
ITEM2ITEM = "item2item"    # co-occurrence neighbours of the most recent history items
POPULAR = "popular"        # global and recent popularity; answers users without history

VECTOR_CHANNELS = (SEQUENTIAL, SEMANTIC)
CHANNELS = (SEQUENTIAL, SEMANTIC, ITEM2ITEM, POPULAR)


def tuning_queries_name(channel: str) -> str:
    """The bundle array of real query vectors a vector channel's index is tuned on."""
    return f"tuning_queries.{channel}"

# The channels that proposed a candidate, as bits (CHANNELS order) on the gateway -> ranker wire.
CHANNEL_BITS = {channel: 1 << n for n, channel in enumerate(CHANNELS)}
ALL_CHANNEL_BITS = (1 << len(CHANNELS)) - 1
# The place a new item may be given on the same wire (1-based): no answer is longer than this.
MAX_NEW_ITEM_PLACE = 1000


def channel_mask(channels: Iterable[str]) -> int:
    return sum(CHANNEL_BITS[c] for c in set(channels))


def channel_flags(masks: Iterable[int] | np.ndarray) -> np.ndarray:
    """(len(masks), len(CHANNELS)) 0/1 float32: which channels each mask names, CHANNELS order."""
    bits = np.asarray(masks, dtype=np.int64).reshape(-1, 1) >> np.arange(len(CHANNELS))
    return (bits & 1).astype(np.float32)


ITEM2ITEM_RECENT = 5       # history items whose neighbours item2item collects
ITEM2ITEM_DECAY = 0.8      # weight of the k-th most recent of them is decay**k
RECENT_WEIGHT = 0.5        # share of recent (vs all-time) popularity in the popular score


@dataclass(frozen=True)
class ChannelQuery:
    """One channel's part of a recall search: k hits for a query vector (vector channels) or
    for the most recent history items (item2item); popular needs neither."""

    channel: str
    k: int
    vector: np.ndarray | None = None  # (dim,) for vector channels
    item_ids: tuple[str, ...] = ()    # item2item: recent history items, oldest first
    user_properties: tuple[str, ...] = ()  # popular: name=value the user gave, for segment popularity


def recency_weights(count: int) -> np.ndarray:
    """(count,) item2item weights of the recent items, oldest first."""
    return (ITEM2ITEM_DECAY ** np.arange(count)[::-1]).astype(np.float32)


def popular_scores(popularity: np.ndarray, recent: np.ndarray, recent_share: float) -> np.ndarray:
    """The popular channel's score: all-time and recent interactions, the recent count scaled
    to the whole period so that both weigh the same for an item with a steady rate."""
    return ((1 - RECENT_WEIGHT) * np.log1p(popularity) + RECENT_WEIGHT * np.log1p(recent / recent_share)
            ).astype(np.float32)


def shard_of(item_id: str, num_shards: int) -> int:
    """The shard that owns an item: a stable hash, so ownership survives restarts and versions."""
    return zlib.crc32(item_id.encode("utf-8")) % num_shards
