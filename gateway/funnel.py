"""The funnel one Recommend runs: history -> encode -> fan-out recall -> merge -> rank -> top-k;
and SimilarItems, the same from the given items' own vectors.

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

from recdata.attributes import NO_FILTER, ItemFilter
from recdata.channels import CHANNELS, ITEM2ITEM, ITEM2ITEM_RECENT, POPULAR, ChannelQuery

log = logging.getLogger(__name__)

ChannelHits = dict[str, list[tuple[str, float]]]


@dataclass(frozen=True)
class ShardAnswer:
    hits: ChannelHits
    model_version: str
    filter_passed: int = 0  # with a filter: the shard's items that pass it


class StageFailed(Exception):
    """A downstream stage did not answer in time or answered with an error."""

    def __init__(self, message: str, status: str = ""):
        super().__init__(message)
        self.status = status  # the stage's gRPC status name, when it answered with one


class UnknownItems(ValueError):
    """Items asked about that the serving version does not know."""

    def __init__(self, item_ids: list[str]):
        super().__init__(f"unknown item ids: {', '.join(item_ids[:10])}" + (" ..." if len(item_ids) > 10 else ""))
        self.item_ids = item_ids


class RecallBackend(Protocol):
    async def search(self, queries: list[ChannelQuery], exclude_item_ids: list[str], timeout: float,
                     model_version: str, item_filter: ItemFilter = NO_FILTER) -> ShardAnswer: ...


class RankingBackend(Protocol):
    async def encode(self, history: list[str], timeout: float, model_version: str
                     ) -> tuple[dict[str, np.ndarray], str]:
        """Query vectors per channel and the version that made them ("" = the default)."""
        ...

    async def rank(self, history: list[str], candidates: list[tuple[str, dict[str, float]]], k: int,
                   diversity: float, explain_top: int, timeout: float, model_version: str,
                   new_item_place: int | None = None) -> list[tuple[str, float, list[str]]]:
        """k of the candidates as (item id, score, because ids), best first (MMR order when
        diversity > 0); `new_item_place`: the best new item's place (0 = none kept; None = as
        the ranking service is configured)."""
        ...

    async def item_vectors(self, item_ids: list[str], timeout: float, model_version: str
                           ) -> tuple[dict[str, np.ndarray], str, list[str]]:
        """The items' own query vectors per channel (their mean), the version, and the ids it
        does not know."""
        ...


@dataclass(frozen=True)
class RecommendQuery:
    user_id: str
    k: int
    history: list[str]            # oldest first: the logged events, then the request's context
    exclude_item_ids: list[str] = field(default_factory=list)
    explain: bool = False
    diversity: float = 0.0        # 0 = pure relevance .. 1 = most diverse (MMR)
    item_filter: ItemFilter = NO_FILTER
    # What a user without history said about themselves, as name=value: popularity among the
    # users who share it (segment popularity) instead of everyone's.
    user_properties: tuple[str, ...] = ()
    channel_budgets: dict[str, int] | None = None  # this query's (an experiment variant's); None: the funnel's
    model_version: str = ""  # a version loaded beside the serving one (an experiment variant's); "" = serving
    new_item_place: int | None = None  # an experiment variant's place for a new item; None: the ranker's


@dataclass(frozen=True)
class SimilarQuery:
    item_ids: list[str]           # the items the answer should be like, never returned
    k: int
    history: list[str] = field(default_factory=list)  # the user's, to personalise; [] = nobody's
    exclude_item_ids: list[str] = field(default_factory=list)
    item_filter: ItemFilter = NO_FILTER


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
    filter_passed: int = 0  # with a filter: catalogue items that pass it, over the shards that answered


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
                       version: str, item_filter: ItemFilter) -> tuple[list[ShardAnswer], float]:
        timeout = max(deadline - time.monotonic(), 0.001)
        answers = await asyncio.gather(
            *(shard.search(queries, exclude, timeout, version, item_filter=item_filter) for shard in self.shards),
            return_exceptions=True,
        )
        ok = [a for a in answers if not isinstance(a, BaseException)]
        for answer in answers:
            if isinstance(answer, BaseException):
                log.warning("recall shard failed: %s", answer)
        return ok, len(ok) / len(self.shards)

    async def recommend(self, query: RecommendQuery, deadline: float) -> Answer:
        """Answer one query before `deadline` (time.monotonic() seconds)."""
        run = _Run(time.monotonic(), query.model_version or self.model_version)
        vectors: dict[str, np.ndarray] = {}
        if query.history and deadline - run.started < self.costs.needed("encode", "recall"):
            run.skip("encode")  # popularity, in time, rather than a personal answer too late
        elif query.history:
            try:
                budget = (deadline - time.monotonic()) * 0.3
                vectors, version = await self.ranking.encode(query.history, max(budget, 0.001), run.version)
                run.version = run.version or version
                self.model_version = self.model_version or version
                self.costs.observe("encode", time.monotonic() - run.started)
            except StageFailed as error:
                log.warning("encode failed, answering from popularity: %s", error)
                run.degraded = True
        run.stages["encode"] = (time.monotonic() - run.started) * 1000
        seen = set(query.history) | set(query.exclude_item_ids)
        # Without the user's vectors (encode failed or skipped) the answer is popularity's, in time.
        recent = tuple(query.history[-ITEM2ITEM_RECENT:]) if vectors else ()
        return await self._recall_and_rank(run, vectors, recent, query.history,
                                           seen, query.k, query.diversity, query.explain, query.item_filter,
                                           deadline, query.user_properties, query.channel_budgets,
                                           query.new_item_place)

    async def similar(self, query: SimilarQuery, deadline: float) -> Answer:
        """Items like `query.item_ids`, from their own vectors and co-occurrence neighbours,
        ranked as if the items were the latest of the user's history (or the whole of it).
        Raises UnknownItems when the serving version knows none of some given items."""
        run = _Run(time.monotonic(), self.model_version)
        vectors: dict[str, np.ndarray] = {}
        try:
            budget = (deadline - time.monotonic()) * 0.3
            vectors, version, unknown = await self.ranking.item_vectors(query.item_ids, max(budget, 0.001),
                                                                        run.version)
            if unknown:
                raise UnknownItems(unknown)
            run.version = run.version or version
        except StageFailed as error:  # neighbours and popularity still answer
            log.warning("item vectors failed, answering from item2item and popularity: %s", error)
            run.degraded = True
        run.stages["encode"] = (time.monotonic() - run.started) * 1000
        seen = set(query.item_ids) | set(query.history) | set(query.exclude_item_ids)
        history = query.history + query.item_ids
        return await self._recall_and_rank(run, vectors, tuple(query.item_ids[-MAX_SIMILAR_TO:]), history, seen,
                                           query.k, 0.0, False, query.item_filter, deadline)

    async def _recall_and_rank(self, run: _Run, vectors: dict[str, np.ndarray], recent: tuple[str, ...],
                               history: list[str], seen: set[str], k: int, diversity: float, explain: bool,
                               item_filter: ItemFilter, deadline: float, user_properties: tuple[str, ...] = (),
                               channel_budgets: dict[str, int] | None = None,
                               new_item_place: int | None = None) -> Answer:
        """Fan out to the shards with the query vectors (popularity alone without), merge,
        rank the candidates for `history` and cut the top k."""
        chosen = self.budgets if channel_budgets is None else {**self.budgets, **channel_budgets}
        budgets = dict(chosen)
        if not vectors:  # nothing personal to search with: popularity has to be able to fill the answer
            budgets = {c: b for c, b in budgets.items() if c == ITEM2ITEM and recent}
            budgets[POPULAR] = max(chosen.get(POPULAR, 0), k)
        if not item_filter.is_empty:
            # A selective filter may leave the other channels short: popular items that pass it fill k.
            budgets[POPULAR] = max(budgets.get(POPULAR, 0), k)
        queries = [
            ChannelQuery(channel, budget, vectors.get(channel), recent if channel == ITEM2ITEM else (),
                         user_properties if channel == POPULAR and not vectors else ())
            for channel, budget in budgets.items()
            if budget > 0 and (channel == POPULAR or channel in vectors or (channel == ITEM2ITEM and recent))
        ]
        # Shards drop seen and excluded items before cutting their top-k, so each channel
        # still brings its full budget of new items.
        exclude = sorted(seen)
        t = time.monotonic()
        recall_deadline = t + (deadline - t) * 0.6
        answers, coverage = await self._fan_out(queries, exclude, recall_deadline, run.version, item_filter)
        if coverage == 1.0:
            self.costs.observe("recall", time.monotonic() - t)
        run.stages["recall"] = (time.monotonic() - t) * 1000
        run.degraded |= coverage < 1.0
        merged = merge_shards(answers, {q.channel: q.k for q in queries})
        version = run.version or next((a.model_version for a in answers), "")
        order = [c for c in CHANNELS if c in merged]
        candidates = [(i, s) for i, s in combine_channels(merged, order) if i not in seen]

        t = time.monotonic()
        ranked: list[tuple[str, float, list[str]]] | None = None
        rankable = bool(vectors) and bool(candidates) and bool(history)
        if rankable and deadline - t < self.costs.needed("rank"):
            run.skip("rank")  # recall order, in time
        elif rankable:
            try:
                ranked = await self.ranking.rank(history, candidates, k, diversity, self.explain_top if explain else 0,
                                                 max(deadline - time.monotonic(), 0.001), version, new_item_place)
                self.costs.observe("rank", time.monotonic() - t)
            except StageFailed as error:
                log.warning("ranking failed, answering in recall order: %s", error)
                run.degraded = True
        run.stages["rank"] = (time.monotonic() - t) * 1000

        channels_of = dict(candidates)
        if ranked is not None:  # already best first
            items = [Recommendation(i, s, sorted(channels_of[i]), because) for i, s, because in ranked[:k]]
        else:
            n = len(candidates)
            # Recall order with a score that falls with rank, so clients can still sort by it.
            items = [Recommendation(i, float(n - rank) / max(n, 1), sorted(ch))
                     for rank, (i, ch) in enumerate(candidates[:k])]
        return Answer(items, version, run.degraded, coverage, run.stages, run.skipped,
                      sum(a.filter_passed for a in answers))


MAX_SIMILAR_TO = 100  # given items whose co-occurrence neighbours a SimilarItems collects


@dataclass
class _Run:
    """What one request's stages have found so far."""

    started: float
    version: str  # the version every stage of the request uses; "" until one names it
    degraded: bool = False
    stages: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def skip(self, stage: str) -> None:
        self.skipped.append(stage)
        self.degraded = True
