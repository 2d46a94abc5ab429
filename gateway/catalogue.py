"""Live catalogue changes: UpsertItems encodes text into vectors and routes each item to
the shard that owns it; DeleteItems removes items from every shard.

Both are idempotent, so a client may retry a call that failed part-way. Applied changes
are recorded in order, and `replay` brings a newly loaded model version to the same
catalogue before it serves.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from gateway.events import ItemChange
from recdata.attributes import ItemAttributes
from recdata.channels import shard_of


class ShardWriter(Protocol):
    async def add_items(self, item_ids: list[str], vectors: dict[str, np.ndarray], timeout: float,
                        model_version: str = "", attributes: list[ItemAttributes] | None = None) -> int: ...

    async def remove_items(self, item_ids: list[str], timeout: float) -> int: ...


class ItemEmbedder(Protocol):
    async def embed_items(self, items: list[ItemChange], timeout: float, model_version: str = ""
                          ) -> tuple[dict[str, np.ndarray], str]: ...


class ChangeLog(Protocol):
    def record_item_changes(self, changes: list[ItemChange]) -> None: ...

    def item_changes(self) -> list[ItemChange]: ...


class Catalogue:
    def __init__(self, shards: Sequence[ShardWriter], embedder: ItemEmbedder, changes: ChangeLog | None = None,
                 batch: int = 1000):
        self.shards = list(shards)  # position = shard id
        self.embedder = embedder
        self.changes = changes
        self.batch = batch  # items per call when replaying
        # Held while a change is applied and recorded, and while a swap replays the log and
        # switches versions, so no change lands in the old version only.
        self.lock = asyncio.Lock()
        # Versions served beside the serving one (experiment variants'): every change reaches
        # them too, each encoded by its own model, so that no variant serves a stale catalogue.
        self.beside: set[str] = set()

    async def _add(self, items: list[ItemChange], timeout: float, version: str) -> str:
        vectors, version = await self.embedder.embed_items(items, timeout, version)
        rows: dict[int, list[int]] = defaultdict(list)
        for row, item in enumerate(items):
            rows[shard_of(item.item_id, len(self.shards))].append(row)
        await asyncio.gather(*(
            self.shards[shard].add_items([items[r].item_id for r in picked],
                                         {c: v[picked] for c, v in vectors.items()}, timeout, version,
                                         [items[r].attributes for r in picked])
            for shard, picked in rows.items()
        ))
        return version

    async def _remove(self, item_ids: list[str], timeout: float) -> int:
        # Every shard, since ownership may have moved; shards remove from every version they hold.
        removed = await asyncio.gather(*(s.remove_items(item_ids, timeout) for s in self.shards))
        return sum(removed)

    async def _record(self, changes: list[ItemChange]) -> None:
        if self.changes is not None:
            await asyncio.to_thread(self.changes.record_item_changes, changes)

    async def upsert(self, items: list[ItemChange], timeout: float, version: str = "") -> tuple[int, str]:
        """Encode the items and add each to its owning shard; returns (count, model version).

        The ranking service learns the items first, so the moment a shard can return one,
        the ranker can score it.
        """
        async with self.lock:
            version = await self._add(items, timeout, version)
            for other in sorted(self.beside - {version}):
                await self._add(items, timeout, other)
            await self._record(items)
        return len(items), version

    async def delete(self, item_ids: list[str], timeout: float) -> int:
        """Remove the items from every shard; returns how many existed."""
        async with self.lock:
            removed = await self._remove(item_ids, timeout)
            await self._record([ItemChange("delete", i) for i in item_ids])
        return removed

    async def replay(self, version: str, timeout: float) -> int:
        """Apply every recorded change, in order, to `version`; the caller holds `lock`."""
        if self.changes is None:
            return 0
        changes = await asyncio.to_thread(self.changes.item_changes)
        # Consecutive changes of one kind go in calls of up to `batch` items, in order.
        for op, same_kind in itertools.groupby(changes, key=lambda change: change.op):
            run = list(same_kind)
            for start in range(0, len(run), self.batch):
                part = run[start : start + self.batch]
                if op == "upsert":
                    await self._add(part, timeout, version)
                else:
                    await self._remove([c.item_id for c in part], timeout)
        return len(changes)
