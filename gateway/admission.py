"""Admission control: the gateway starts only as many calls as it can answer in time.

Every call queued behind work the cluster cannot finish makes every later call slower, so
an overloaded gateway that accepts everything answers nothing in time. This one holds a
concurrency limit that follows the measured latency (a gradient limit, as in Netflix's
concurrency-limits): while admitted calls take about their no-load time the limit grows,
once they take `tolerance` times longer it shrinks in proportion. A call that finds every
slot taken waits in a short priority queue if the expected wait is small, and is refused
at once otherwise (`Overloaded`, answered `RESOURCE_EXHAUSTED` with a retry hint): the
refusal costs microseconds, and what is admitted stays fast.

Feedback (events must not be lost) and catalogue writes come before Recommend: they wait
ahead of it, and a full queue gives up its newest Recommend to make room for them.

Written here rather than taken from a library: what exists for Python (e.g. `aiolimiter`)
caps a rate, not a latency-driven concurrency, and nothing knows the gateway's priorities.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Priority(IntEnum):
    WRITE = 0       # Feedback, UpsertItems, DeleteItems: first in, never displaced
    RECOMMEND = 1


@dataclass(frozen=True)
class AdmissionConfig:
    enabled: bool = True
    initial_limit: int = 16         # concurrent calls before any latency is known
    # Never fewer: a handful of calls at once is no overload, whatever latency does (a node
    # lost, a model loading), and callers that only keep a few in flight are never refused.
    min_limit: int = 8
    max_limit: int = 512
    max_queue: int = 32             # calls waiting for a slot, at most
    max_queue_wait_s: float = 0.010 # a call expected to wait longer is refused at once
    tolerance: float = 2.0          # admitted latency up to this × the no-load latency is healthy
    window_s: float = 0.25          # the limit is updated once per window of answered calls
    window_min_samples: int = 10
    # The no-load latency: the least window median seen, let rise by this share a second so
    # that it follows lasting change (a slower model) but not an overload of some seconds.
    baseline_drift_per_s: float = 0.01
    max_loop_lag_s: float = 0.004   # the event loop running later than this is overload too
    loop_probe_s: float = 0.01      # how often the loop's lag is measured

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError(f"limits must satisfy 1 <= min_limit ({self.min_limit}) <= initial_limit "
                             f"({self.initial_limit}) <= max_limit ({self.max_limit})")
        if self.max_queue < 0 or self.max_queue_wait_s < 0 or self.tolerance < 1 or self.window_s <= 0:
            raise ValueError("max_queue and max_queue_wait_s must be >= 0, tolerance >= 1, window_s > 0")


class Overloaded(Exception):
    """The call was not started: the gateway is at its limit. `retry_after_s` is a hint."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GradientLimit:
    """The concurrency limit from the latencies of answered calls.

    Per window: `sample` = the window's median latency, `baseline` = the least such median
    seen, rising slowly (`baseline_drift_per_s`) so as to follow lasting change. A minimum
    over a recent span only would, under an overload longer than the span, take the
    overloaded latency for the no-load one and let the limit grow.

    gradient = clamp(tolerance × baseline / sample, 0.5, 1): at 1 the limit grows by √limit,
    but only if the window used at least half of it (a lightly loaded gateway proves nothing
    about a higher limit); below 1 it shrinks to limit × gradient. The event loop's lag counts
    too: calls wait for the loop before any of them is admitted or refused, a wait the
    latency of admitted calls does not show, so a window whose loop lagged more than
    `max_loop_lag_s` shrinks the limit as a slow one does.
    """

    def __init__(self, config: AdmissionConfig, clock: Any = time.monotonic):
        self.config = config
        self.clock = clock
        self.limit = float(config.initial_limit)
        self._window: list[float] = []
        self._window_started = clock()
        self._window_peak = 0
        self._window_lag = 0.0
        self.baseline_s = 0.0
        self.last_median_s = 0.0

    def loop_lag(self, lag_s: float) -> None:
        """How late the event loop ran a timer just now."""
        self._window_lag = max(self._window_lag, lag_s)

    def observe(self, latency_s: float, in_flight: int) -> None:
        """One answered call's latency; `in_flight` = calls running when it started."""
        self._window.append(latency_s)
        self._window_peak = max(self._window_peak, in_flight)
        now = self.clock()
        if now - self._window_started < self.config.window_s or len(self._window) < self.config.window_min_samples:
            return
        sample = statistics.median(self._window)
        if self.baseline_s == 0.0 or sample < self.baseline_s:
            self.baseline_s = sample
        else:
            self.baseline_s *= 1.0 + self.config.baseline_drift_per_s * (now - self._window_started)
        self.last_median_s = sample
        gradient = min(1.0, max(0.5, self.config.tolerance * self.baseline_s / max(sample, 1e-9)))
        if self._window_lag > self.config.max_loop_lag_s:
            gradient = min(gradient, max(0.5, self.config.max_loop_lag_s / self._window_lag))
        if gradient < 1.0:
            self.limit *= gradient
        elif self._window_peak >= self.limit / 2:
            self.limit += math.sqrt(self.limit)
        self.limit = min(float(self.config.max_limit), max(float(self.config.min_limit), self.limit))
        self._window, self._window_started, self._window_peak, self._window_lag = [], now, 0, 0.0


@dataclass(frozen=True)
class Ticket:
    priority: Priority
    started: float
    running_beside: int             # calls in flight when it started, itself included
    limited: bool = True            # False with admission control off


@dataclass
class AdmissionStats:
    admitted: int = 0
    shed: int = 0                   # refused at once: no slot, and the wait would be too long
    shed_displaced: int = 0         # a queued Recommend that gave its place to a write
    timed_out: int = 0              # waited for a slot until its budget ran out
    queue_wait_s: float = 0.0       # total time admitted calls spent queued


class Admission:
    """`async with admission.admit(priority, deadline):` runs the body in a slot, or raises
    Overloaded without running it."""

    def __init__(self, config: AdmissionConfig | None = None, clock: Any = time.monotonic):
        self.config = config or AdmissionConfig()
        self.clock = clock
        self.limiter = GradientLimit(self.config, clock)
        self.in_flight = 0
        self.stats = AdmissionStats()
        # (priority, arrival, future): the next slot goes to the lowest tuple still waiting.
        self._queue: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self._lag_probe: asyncio.Task[None] | None = None
        self._held = 0  # > 0 while planned work (a model swap's loading) slows every call

    @contextmanager
    def limit_held(self) -> Iterator[None]:
        """The limit keeps its value meanwhile: a model swap's index builds and weight loads
        are planned work whose slowdown says nothing of what the cluster serves otherwise,
        and callers that were served before it must not be refused because of it."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1

    async def _probe_loop_lag(self) -> None:
        """Sleep and see how late the loop wakes: the wait every new call has before it."""
        while True:
            asked = self.clock() + self.config.loop_probe_s
            await asyncio.sleep(self.config.loop_probe_s)
            if not self._held:
                self.limiter.loop_lag(max(0.0, self.clock() - asked))

    def close(self) -> None:
        if self._lag_probe is not None:
            self._lag_probe.cancel()
            self._lag_probe = None

    @property
    def limit(self) -> int:
        return max(1, int(self.limiter.limit)) if self.config.enabled else self.config.max_limit

    @property
    def queued(self) -> int:
        return sum(1 for _, _, future in self._queue if not future.done())

    def expected_service_s(self) -> float:
        return self.limiter.last_median_s or self.limiter.baseline_s

    def snapshot(self) -> dict[str, Any]:
        """What `recfunnel status` and the metrics show."""
        return {"enabled": self.config.enabled, "limit": self.limit, "in_flight": self.in_flight,
                "queued": self.queued, "admitted": self.stats.admitted,
                "shed": self.stats.shed + self.stats.shed_displaced + self.stats.timed_out,
                "queue_wait_s": round(self.stats.queue_wait_s, 6),
                "baseline_ms": round(self.limiter.baseline_s * 1000, 3),
                "median_ms": round(self.limiter.last_median_s * 1000, 3)}

    @asynccontextmanager
    async def admit(self, priority: Priority, deadline: float) -> AsyncIterator[None]:
        """The body runs in a slot; raises Overloaded without running it."""
        ticket = await self.acquire(priority, deadline)
        try:
            yield
        finally:
            self.release(ticket)

    async def acquire(self, priority: Priority, deadline: float) -> Ticket:
        """A slot for a call that must be answered by `deadline` (time.monotonic() seconds),
        or Overloaded. Every ticket is given back with `release`."""
        arrived = self.clock()
        if self._lag_probe is None and self.config.enabled:  # started on the serving loop, at its first call
            self._lag_probe = asyncio.get_running_loop().create_task(self._probe_loop_lag())
        if not self.config.enabled:  # counted, never refused
            self.in_flight += 1
            return Ticket(priority, arrived, self.in_flight, limited=False)
        if self.in_flight >= self.limit:
            await self._wait_for_slot(priority, deadline, arrived)
        else:
            self.in_flight += 1
        self.stats.admitted += 1
        started = self.clock()
        self.stats.queue_wait_s += started - arrived
        return Ticket(priority, started, self.in_flight)

    def release(self, ticket: Ticket) -> None:
        if not ticket.limited:
            self.in_flight -= 1
            return
        if ticket.priority is Priority.RECOMMEND and not self._held:  # writes wait on the disk, not the CPU
            self.limiter.observe(self.clock() - ticket.started, ticket.running_beside)
        self._release()

    async def _wait_for_slot(self, priority: Priority, deadline: float, arrived: float) -> None:
        service = self.expected_service_s()
        ahead = sum(1 for p, _, f in self._queue if p <= priority and not f.done())
        expected_wait = (ahead + 1) * service / max(self.limit, 1)
        retry_after = max(service, 0.001)
        if priority is Priority.RECOMMEND:
            if self.queued >= self.config.max_queue or expected_wait > self.config.max_queue_wait_s:
                self.stats.shed += 1
                raise Overloaded(f"gateway at its limit of {self.limit} concurrent calls; expected wait "
                                 f"{expected_wait * 1000:.1f} ms > {self.config.max_queue_wait_s * 1000:g} ms",
                                 retry_after)
        elif self.queued >= self.config.max_queue and not self._displace_a_recommend():
            self.stats.shed += 1
            raise Overloaded(f"gateway queue full of writes ({self.config.max_queue})", retry_after)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (int(priority), next(self._arrivals), future))
        # It waits while an answer could still be in time; a backend that hangs every slot
        # would otherwise hold it for good.
        budget = max(0.0, deadline - self.clock() - service)
        try:
            await asyncio.wait_for(asyncio.shield(future), budget)
        except TimeoutError:
            if future.done() and not future.cancelled() and future.exception() is None:
                return  # the slot came as the wait ended: keep it
            future.cancel()
            self.stats.timed_out += 1
            raise Overloaded(f"no slot within the call's budget ({(self.clock() - arrived) * 1000:.1f} ms "
                             f"waited)", retry_after) from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release()  # handed a slot as the caller went away: pass it on
            future.cancel()
            raise
        # A queued Recommend displaced by a write has raised Overloaded from the wait above.

    def _displace_a_recommend(self) -> bool:
        """Refuse the newest queued Recommend so that a write can wait instead; False if none."""
        waiting = [(arrival, future) for p, arrival, future in self._queue
                   if p == Priority.RECOMMEND and not future.done()]
        if not waiting:
            return False
        _, future = max(waiting, key=lambda entry: entry[0])
        future.set_exception(Overloaded("displaced from the queue by a write", self.expected_service_s()))
        self.stats.shed_displaced += 1
        return True

    def _release(self) -> None:
        """A slot is free: hand it to the first call still waiting, else free it."""
        while self._queue:
            _, _, future = heapq.heappop(self._queue)
            if not future.done():
                future.set_result(None)  # the slot passes on: in_flight stays
                return
        self.in_flight -= 1
