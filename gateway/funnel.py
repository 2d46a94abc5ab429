"""The funnel one Recommend runs: history -> encode -> fan-out recall -> merge -> rank -> top-k.

Pure logic over two small interfaces, so the same code runs against gRPC clients (the
gateway), in-process models (benchmarks) and fakes that fail on purpose (fault tests).
Every stage may fail without failing the request: a missing shard gives partial
candidates, a failed encoder or ranker falls back to popularity or recall order; each
such answer is marked degraded. A stage the remaining budget cannot pay for (by what it has
been taking) is skipped the same way, so that an answer under load is on time.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from recdata.channels import CHANNELS, ITEM2ITEM, ITEM2ITEM_RECENT, POPULAR, ChannelQuery

log = logging.getLogger(__name__)

ChannelHits = dict[str, list[tuple[str, float]]]


@dataclass(frozen=True)
class ShardAnswer:
    hits: ChannelHits
    model_version: str


class StageFailed(Exception):
    """A downstream stage did not answer in time or answered with an error."""

    def __init__(self, message: str, status: str = ""):
        super().__init__(message)
        self.status = status  # the stage's gRPC status name, when it answered with one


class RecallBackend(Protocol):
    async def search(self, queries: list[ChannelQuery], exclude_item_ids: list[str], timeout: float,
                     model_version: str) -> ShardAnswer: ...


class RankingBackend(Protocol):
    async def encode(self, history: list[str], timeout: float, model_version: str
                     ) -> tuple[dict[str, np.ndarray], str]:
        """Query vectors per channel and the version that made them ("" = the default)."""
        ...

    async def rank(self, history: list[str], candidates: list[tuple[str, dict[str, float]]], k: int,
                   diversity: float, explain_top: int, timeout: float, model_version: str
                   ) -> list[tuple[str, float, list[str]]]:
        """k of the candidates as (item id, score, because ids), best first (MMR order when
        diversity > 0)."""
        ...


@dataclass(frozen=True)
class RecommendQuery:
    user_id: str
    k: int
    history: list[str]            # oldest first: the logged events, then the request's context
    exclude_item_ids: list[str] = field(default_factory=list)
    explain: bool = False
    diversity: float = 0.0        # 0 = pure relevance .. 1 = most diverse (MMR)


@dataclass
class Recommendation:
    item_id: str
    score: float
    channels: list[str]
    because_item_ids: list[str] = field(default_factory=list)


@dataclass
class Answer:
    items: list[Recommendation]
    model_version: str
    degraded: bool
    recall_coverage: float
    stages_ms: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # stages left out: too little budget left for them


class StageCosts:
    """What each stage has been taking (a moving average of its recent successful runs), so
    that a request with less budget left than a stage needs skips it rather than running it
    late: a late answer is no answer to a client whose deadline has passed."""

    def __init__(self, weight: float = 0.1):
        self.weight = weight
        self.seconds: dict[str, float] = {}

    def observe(self, stage: str, seconds: float) -> None:
        old = self.seconds.get(stage)
        self.seconds[stage] = seconds if old is None else old + self.weight * (seconds - old)

    def needed(self, *stages: str) -> float:
        """Seconds the stages are expected to take one after another; 0 for one never run."""
        return sum(self.seconds.get(stage, 0.0) for stage in stages)


def merge_shards(answers: Sequence[ShardAnswer], budgets: dict[str, int]) -> ChannelHits:
    """Per channel, the best `budget` hits over all shards' answers, best first, deduplicated."""
    merged: ChannelHits = {}
    for channel, budget in budgets.items():
        best: dict[str, float] = {}
        for answer in answers:
            for item_id, score in answer.hits.get(channel, []):
                if score > best.get(item_id, float("-inf")):
                    best[item_id] = score
        merged[channel] = heapq.nlargest(budget, best.items(), key=lambda hit: (hit[1], hit[0]))
    return merged


def combine_channels(per_channel: ChannelHits, order: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
    """Union of every channel's hits, each item once with its score per channel that found it.

    Listed round-robin over channels by rank, so recall order (the fallback when ranking is
    down) gives every channel its share near the top.
    """
    combined: dict[str, dict[str, float]] = {}
    longest = max((len(per_channel.get(c, [])) for c in order), default=0)
    for rank in range(longest):
        for channel in order:
            hits = per_channel.get(channel, [])
            if rank < len(hits):
                item_id, score = hits[rank]
                combined.setdefault(item_id, {})[channel] = score
    return list(combined.items())


class Funnel:
    def __init__(self, shards: Sequence[RecallBackend], ranking: RankingBackend,
                 channel_budgets: dict[str, int], explain_top: int = 3):
        self.shards = list(shards)
        self.ranking = ranking
        self.budgets = channel_budgets
        self.explain_top = explain_top
        self.costs = StageCosts()
        # The version every stage of a request uses; "" until the first answer names one.
        # A swap replaces it in one assignment: a request reads it once, at its start.
        self.model_version = ""

    async def _fan_out(self, queries: list[ChannelQuery], exclude: list[str], deadline: float,
                       version: str) -> tuple[list[ShardAnswer], float]:
        timeout = max(deadline - time.monotonic(), 0.001)
        answers = await asyncio.gather(
            *(shard.search(queries, exclude, timeout, version) for shard in self.shards),
            return_exceptions=True,
        )
        ok = [a for a in answers if not isinstance(a, BaseException)]
        for answer in answers:
            if isinstance(answer, BaseException):
                log.warning("recall shard failed: %s", answer)
        return ok, len(ok) / len(self.shards)

    async def recommend(self, query: RecommendQuery, deadline: float) -> Answer:
        """Answer one query before `deadline` (time.monotonic() seconds)."""
        stages: dict[str, float] = {}
        skipped: list[str] = []
        started = time.monotonic()
        degraded = False
        seen = set(query.history) | set(query.exclude_item_ids)
        vectors: dict[str, np.ndarray] = {}
        version = self.model_version
        if query.history and deadline - started < self.costs.needed("encode", "recall"):
            skipped.append("encode")  # popularity, in time, rather than a personal answer too late
            degraded = True
        elif query.history:
            try:
                budget = (deadline - time.monotonic()) * 0.3
                vectors, version = await self.ranking.encode(query.history, max(budget, 0.001), version)
                self.model_version = self.model_version or version
                self.costs.observe("encode", time.monotonic() - started)
            except StageFailed as error:
                log.warning("encode failed, answering from popularity: %s", error)
                degraded = True
        stages["encode"] = (time.monotonic() - started) * 1000

        budgets = dict(self.budgets)
        if not vectors:  # nobody to personalise for: popularity has to fill the whole answer
            budgets = {POPULAR: max(budgets.get(POPULAR, 0), query.k)}
        recent = tuple(query.history[-ITEM2ITEM_RECENT:])
        queries = [
            ChannelQuery(channel, k, vectors.get(channel), recent if channel == ITEM2ITEM else ())
            for channel, k in budgets.items()
            if k > 0 and (channel == POPULAR or channel in vectors or (channel == ITEM2ITEM and recent))
        ]
        # Shards drop seen and excluded items before cutting their top-k, so each channel
        # still brings its full budget of new items.
        exclude = sorted(seen)
        t = time.monotonic()
        recall_deadline = t + (deadline - t) * 0.6
        answers, coverage = await self._fan_out(queries, exclude, recall_deadline, version)
        if coverage == 1.0:
            self.costs.observe("recall", time.monotonic() - t)
        stages["recall"] = (time.monotonic() - t) * 1000
        degraded |= coverage < 1.0
        merged = merge_shards(answers, {q.channel: q.k for q in queries})
        version = version or next((a.model_version for a in answers), "")
        order = [c for c in CHANNELS if c in merged]
        candidates = [(i, s) for i, s in combine_channels(merged, order) if i not in seen]

        t = time.monotonic()
        ranked: list[tuple[str, float, list[str]]] | None = None
        if vectors and candidates and deadline - t < self.costs.needed("rank"):
            skipped.append("rank")  # recall order, in time
            degraded = True
        elif vectors and candidates:
            try:
                ranked = await self.ranking.rank(
                    query.history, candidates, query.k, query.diversity, self.explain_top if query.explain else 0,
                    max(deadline - time.monotonic(), 0.001), version)
                self.costs.observe("rank", time.monotonic() - t)
            except StageFailed as error:
                log.warning("ranking failed, answering in recall order: %s", error)
                degraded = True
        stages["rank"] = (time.monotonic() - t) * 1000

        channels_of = dict(candidates)
        if ranked is not None:  # already best first
            items = [Recommendation(i, s, sorted(channels_of[i]), because) for i, s, because in ranked[: query.k]]
        else:
            n = len(candidates)
            # Recall order with a score that falls with rank, so clients can still sort by it.
            items = [Recommendation(i, float(n - rank) / max(n, 1), sorted(ch))
                     for rank, (i, ch) in enumerate(candidates[: query.k])]
        return Answer(items, version, degraded, coverage, stages, skipped)
