"""The exposure log: what every answer showed, written off the request path.

An answer's items go into a bounded in-memory queue and return at once; one task drains the
queue in batches into the event store (a transaction a batch, on the executor). A full queue
drops the new exposures and counts them: a slow store never delays an answer. A graceful stop
drains what is queued; a killed gateway loses at most the queue, and `dropped`/`queued` say how
much was at risk. Memory is the queue's capacity; cost per answer is k small tuples.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from gateway.events import EventStore, Exposure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExposureConfig:
    enabled: bool = True
    capacity: int = 50_000         # exposures queued at most; beyond, new ones are dropped and counted
    batch: int = 2_000             # exposures a write holds at most
    flush_interval_s: float = 0.2  # how long exposures wait for a batch to fill
    # Answers whose group (experiment variant) the gateway remembers, so that the events naming
    # them count toward their group's metrics: a bounded map, the oldest answers forgotten first.
    attribution_window: int = 100_000

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.batch < 1 or self.flush_interval_s <= 0 or self.attribution_window < 1:
            raise ValueError("exposure capacity, batch and attribution_window must be >= 1 and "
                             "flush_interval_s > 0")


@dataclass
class ExposureStats:
    offered: int = 0   # exposures answers produced
    logged: int = 0    # written to the store
    dropped: int = 0   # refused by a full queue, or lost to a failed write
    queued: int = 0    # waiting now

    def to_dict(self) -> dict[str, int]:
        return {"offered": self.offered, "logged": self.logged, "dropped": self.dropped, "queued": self.queued}


@dataclass
class GroupCounts:
    """What `recfunnel experiments report` counts from the store, counted live per group
    (experiment variant, "" outside any) for the Ray metrics: answers, items shown, and the
    events that named one of the group's answers, by type."""

    answers: Counter[str] = field(default_factory=Counter)
    exposures: Counter[str] = field(default_factory=Counter)
    events: Counter[tuple[str, str]] = field(default_factory=Counter)  # (group, event type)


class ExposureLog:
    def __init__(self, store: EventStore, config: ExposureConfig, executor: Executor | None = None):
        self.store = store
        self.config = config
        self.executor = executor
        self.stats = ExposureStats()
        self.groups = GroupCounts()
        self._group_of: OrderedDict[str, str] = OrderedDict()  # request id -> group, the recent answers
        self._queue: deque[Exposure] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def offer(self, request_id: str, user_id: str, items: Sequence[tuple[str, float]], model_version: str,
              variant: str = "", ranked: Sequence[int] | None = None) -> None:
        """Queue one answer's (item id, score) list, in answer order; never blocks. `ranked`:
        each shown place's place in the ranking, where exploration swapped some."""
        if not self.config.enabled or not items:
            return
        self._count_answer(request_id, variant, len(items))
        self.stats.offered += len(items)
        room = self.config.capacity - len(self._queue)
        if room < len(items) or self._closing:
            self.stats.dropped += len(items)  # all of the answer or none: no half-logged answers
            return
        now = int(time.time() * 1000)
        places = ranked or range(len(items))
        self._queue.extend(Exposure(request_id, user_id, item, n, score, model_version, variant, now, place)
                           for n, ((item, score), place) in enumerate(zip(items, places, strict=True)))
        self.stats.queued = len(self._queue)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())
        if len(self._queue) >= self.config.batch:
            self._wake.set()

    def _count_answer(self, request_id: str, group: str, shown: int) -> None:
        self.groups.answers[group] += 1
        self.groups.exposures[group] += shown
        self._group_of[request_id] = group
        if len(self._group_of) > self.config.attribution_window:
            self._group_of.popitem(last=False)

    def attribute(self, events: Iterable[tuple[str, str]]) -> None:
        """Count acknowledged (request id, event type) pairs toward their answer's group; an
        answer older than the window (or another gateway's) is not counted here, only in the
        store, which the report reads."""
        for request_id, event_type in events:
            group = self._group_of.get(request_id)
            if group is not None:
                self.groups.events[(group, event_type)] += 1

    async def _write(self, batch: list[Exposure]) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.store.record_exposures, batch)
            self.stats.logged += len(batch)
        except Exception as error:  # noqa: BLE001 - any failed write is counted; the drain goes on
            self.stats.dropped += len(batch)
            log.warning("exposure log: %d exposures lost to a failed write: %s", len(batch), error)

    async def _drain(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # a batch that did not fill goes out after the interval
                await asyncio.wait_for(self._wake.wait(), self.config.flush_interval_s)
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self.config.batch, len(self._queue)))]
                self.stats.queued = len(self._queue)
                await self._write(batch)
            if self._closing:
                return

    async def close(self) -> None:
        """Write everything queued, then stop taking exposures."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            await self._task
        self.stats.queued = len(self._queue)
