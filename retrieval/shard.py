"""One recall shard: its partition of the catalogue and one index per channel.

Pure logic, no gRPC: the Recall servicer, the in-process pipeline and the tests call it.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from recdata.bundle import Bundle
from recdata.channels import POPULAR, VECTOR_CHANNELS
from retrieval.config import MAX_K, RecallConfig
from retrieval.index import build_index


class InvalidQuery(ValueError):
    """A query the shard cannot answer; the message names the field and the allowed range."""


def shard_of(item_id: str, num_shards: int) -> int:
    """The shard that owns an item: a stable hash, so ownership survives restarts and versions."""
    return zlib.crc32(item_id.encode("utf-8")) % num_shards


@dataclass(frozen=True)
class ChannelQuery:
    channel: str
    k: int
    vector: np.ndarray | None = None  # (dim,) for vector channels


class RecallShard:
    """Per-channel FAISS search over the items this shard owns."""

    def __init__(self, bundle: Bundle, config: RecallConfig):
        self.config = config
        self.version = bundle.version
        owned = np.asarray([n for n, item_id in enumerate(bundle.item_ids)
                            if shard_of(item_id, config.num_shards) == config.shard_id], dtype=np.int64)
        self.item_ids = bundle.item_ids  # catalogue index -> id (global, shared by all shards)
        self.item_index = {item_id: n for n, item_id in enumerate(bundle.item_ids)}
        self.owned = owned
        self.indexes = {
            channel: build_index(bundle.arrays[channel][owned], owned, config.index_kind,
                                 config.exact_below, config.use_gpu)
            for channel in VECTOR_CHANNELS
        }
        self.dims = {channel: int(bundle.arrays[channel].shape[1]) for channel in VECTOR_CHANNELS}
        popularity = bundle.arrays["popularity"][owned]
        order = np.argsort(-popularity, kind="stable")
        self.popular_items = owned[order]
        self.popular_scores = np.log1p(popularity[order]).astype(np.float32)
        # A FAISS index must not change while it is searched; every index access holds this.
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.owned)

    def validate(self, query: ChannelQuery) -> None:
        if query.channel not in (*VECTOR_CHANNELS, POPULAR):
            raise InvalidQuery(f"channel {query.channel!r} unknown; allowed: "
                               f"{', '.join((*VECTOR_CHANNELS, POPULAR))}")
        if not 1 <= query.k <= MAX_K:
            raise InvalidQuery(f"k={query.k} for channel {query.channel!r} out of range 1..{MAX_K}")
        if query.channel == POPULAR:
            return
        dim = self.dims[query.channel]
        if query.vector is None or query.vector.shape != (dim,):
            shape = None if query.vector is None else query.vector.shape
            raise InvalidQuery(f"channel {query.channel!r} needs a vector of shape ({dim},), got {shape}")
        if not np.isfinite(query.vector).all():
            raise InvalidQuery(f"channel {query.channel!r} vector has NaN or infinite values")

    def search(self, queries: Iterable[ChannelQuery], exclude_item_ids: Iterable[str] = ()
               ) -> dict[str, list[tuple[str, float]]]:
        """Per channel, up to k (item id, score) pairs best first, none of them excluded."""
        queries = list(queries)
        for query in queries:
            self.validate(query)
        excluded = {self.item_index[i] for i in exclude_item_ids if i in self.item_index}
        results: dict[str, list[tuple[str, float]]] = {}
        for query in queries:
            if query.channel == POPULAR:
                keep = [(int(i), float(s)) for i, s in zip(self.popular_items, self.popular_scores, strict=True)
                        if int(i) not in excluded][: query.k]
            else:
                # Ask for enough extra hits that k remain after dropping excluded items.
                fetch = min(query.k + len(excluded), max(self.size, 1))
                with self._lock:
                    scores, ids = self.indexes[query.channel].search(
                        query.vector.reshape(1, -1).astype(np.float32), fetch)
                keep = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True)
                        if i >= 0 and int(i) not in excluded][: query.k]
            results[query.channel] = [(self.item_ids[i], s) for i, s in keep]
        return results
