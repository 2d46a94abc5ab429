"""The funnel in one process: the same gateway, shard and model code with no gRPC and no Ray.

The serving bench compares the cluster against it, and tests check that the batched scorer used
for evaluation ranks exactly as the served path does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gateway.funnel import Funnel, ShardAnswer
from ranking.inference import RankingModel
from recdata.attributes import NO_FILTER, ItemFilter
from recdata.bundle import load_bundle
from recdata.channels import ChannelQuery, channel_mask
from retrieval.config import RecallConfig
from retrieval.shard import RecallShard


class InProcessRecall:
    """A RecallShard behind the funnel's RecallBackend interface."""

    def __init__(self, shard: RecallShard):
        self.shard = shard

    async def search(self, queries: list[ChannelQuery], exclude_item_ids: list[str], timeout: float,
                     model_version: str, item_filter: ItemFilter = NO_FILTER) -> ShardAnswer:
        hits, passed = self.shard.search_filtered(queries, exclude_item_ids, item_filter)
        return ShardAnswer(hits, self.shard.version, passed)


class InProcessRanking:
    """A RankingModel behind the funnel's RankingBackend interface."""

    def __init__(self, model: RankingModel):
        self.model = model

    async def encode(self, history: list[str], timeout: float, model_version: str
                     ) -> tuple[dict[str, np.ndarray], str]:
        rows = self.model.indexes(history)
        if len(rows) == 0:
            return {}, self.model.version
        return {c: v[0] for c, v in self.model.encode([rows]).items()}, self.model.version

    async def rank(self, history: list[str], candidates: list[tuple[str, dict[str, float]]], k: int,
                   diversity: float, explain_top: int, timeout: float, model_version: str,
                   new_item_place: int | None = None) -> list[tuple[str, float, list[str]]]:
        return self.model.rank_items(history, [(i, channel_mask(s)) for i, s in candidates], k, diversity,
                                     explain_top, new_item_place)

    async def item_vectors(self, item_ids: list[str], timeout: float, model_version: str
                           ) -> tuple[dict[str, np.ndarray], str, list[str]]:
        vectors, unknown = self.model.item_queries(item_ids)
        return vectors, self.model.version, unknown


def in_process_funnel(bundle: Path, num_shards: int = 2, channel_budgets: dict[str, int] | None = None,
                      device: str | None = None) -> Funnel:
    """The served funnel over `num_shards` in-process shards and the bundle's models."""
    loaded = load_bundle(bundle)
    shards = [InProcessRecall(RecallShard(loaded, RecallConfig(bundle=bundle, shard_id=n, num_shards=num_shards)))
              for n in range(num_shards)]
    budgets = channel_budgets or dict(loaded.manifest["candidates_per_channel"])
    return Funnel(shards, InProcessRanking(RankingModel.load(bundle, device)), budgets)
