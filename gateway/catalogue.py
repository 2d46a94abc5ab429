"""Live catalogue changes: UpsertItems encodes text into vectors and routes each item to
the shard that owns it; DeleteItems removes items from every shard.

Both are idempotent, so a client may retry a call that failed part-way.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from recdata.channels import shard_of


class ShardWriter(Protocol):
    async def add_items(self, item_ids: list[str], vectors: dict[str, np.ndarray], timeout: float) -> int: ...

    async def remove_items(self, item_ids: list[str], timeout: float) -> int: ...


class ItemEmbedder(Protocol):
    async def embed_items(self, items: list[tuple[str, str, list[str]]], timeout: float
                          ) -> tuple[dict[str, np.ndarray], str]: ...


@dataclass(frozen=True)
class NewItem:
    item_id: str
    text: str
    tags: tuple[str, ...] = ()


class Catalogue:
    def __init__(self, shards: Sequence[ShardWriter], embedder: ItemEmbedder):
        self.shards = list(shards)  # position = shard id
        self.embedder = embedder

    async def upsert(self, items: list[NewItem], timeout: float) -> tuple[int, str]:
        """Encode the items and add each to its owning shard; returns (count, model version).

        The ranking service learns the items first, so the moment a shard can return one,
        the ranker can score it.
        """
        vectors, version = await self.embedder.embed_items(
            [(i.item_id, i.text, list(i.tags)) for i in items], timeout)
        rows: dict[int, list[int]] = defaultdict(list)
        for row, item in enumerate(items):
            rows[shard_of(item.item_id, len(self.shards))].append(row)
        await asyncio.gather(*(
            self.shards[shard].add_items([items[r].item_id for r in picked],
                                         {c: v[picked] for c, v in vectors.items()}, timeout)
            for shard, picked in rows.items()
        ))
        return len(items), version

    async def delete(self, item_ids: list[str], timeout: float) -> int:
        """Remove the items from every shard (ownership may have moved); returns how many existed."""
        removed = await asyncio.gather(*(s.remove_items(item_ids, timeout) for s in self.shards))
        return sum(removed)
