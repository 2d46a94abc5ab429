"""Open-loop load: requests sent at scheduled Poisson arrival times, whatever the answers do.

Latency is counted from the scheduled send time, so queueing anywhere (in the system or in
this process) shows in the percentiles instead of slowing the arrivals down, as a closed
loop of callers would. `recfunnel loadtest` and `recfunnel bench serving` both use it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

# A request -> whether its answer was degraded. Raises on failure.
Call = Callable[[Any], Awaitable[bool]]
KindOf = Callable[[Any], str]


@dataclass(frozen=True)
class Sample:
    sent_s: float        # scheduled send time, seconds from the start of the run
    latency_ms: float    # from the scheduled send time to the answer (or the error)
    kind: str            # e.g. "Recommend" or "Feedback"
    status: str          # "OK" or the gRPC status name (or exception type) of the failure
    degraded: bool = False


@dataclass
class LoadResult:
    offered_rps: float
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    ranker_batch: float | None = None

    @property
    def latencies_ms(self) -> list[float]:
        return [s.latency_ms for s in self.samples if s.status == "OK"]

    @property
    def errors(self) -> Counter[str]:
        return Counter(s.status for s in self.samples if s.status != "OK")

    def summary(self, kind: str | None = None) -> dict[str, Any]:
        """Percentiles of the successful requests (of one kind, or all), errors by status,
        achieved rate and degraded share."""
        chosen = [s for s in self.samples if kind is None or s.kind == kind]
        ok = [s for s in chosen if s.status == "OK"]
        lat = np.asarray([s.latency_ms for s in ok]) if ok else np.asarray([math.nan])
        return {
            "offered_rps": self.offered_rps,
            "achieved_rps": round(len(ok) / self.wall_s, 2) if self.wall_s else 0.0,
            "requests": len(chosen),
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p90_ms": round(float(np.percentile(lat, 90)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "p99.9_ms": round(float(np.percentile(lat, 99.9)), 3),
            "errors": dict(Counter(s.status for s in chosen if s.status != "OK")),
            "degraded_share": round(sum(s.degraded for s in ok) / max(len(ok), 1), 4),
            **({"mean_ranker_batch": round(self.ranker_batch, 3)} if self.ranker_batch is not None else {}),
        }


async def open_loop(call: Call, requests: Sequence[Any], rate: float, seconds: float, seed: int,
                    kind_of: KindOf = lambda request: type(request).__name__.removesuffix("Request")
                    ) -> LoadResult:
    """Send `requests` (cycled) at Poisson arrivals of `rate` per second for `seconds`."""
    loop = asyncio.get_running_loop()
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, int(rate * seconds * 1.2) + 10))
    arrivals = arrivals[arrivals < seconds]
    result = LoadResult(rate)
    start = loop.time() + 0.05

    async def one(request: Any, at: float) -> None:
        scheduled = start + at
        try:
            degraded = await call(request)
            status = "OK"
        except grpc.aio.AioRpcError as error:
            degraded, status = False, error.code().name
        except Exception as error:  # noqa: BLE001 - in-process failures count too, by their type
            degraded, status = False, type(error).__name__
        result.samples.append(Sample(float(at), (loop.time() - scheduled) * 1000, kind_of(request), status,
                                     bool(degraded)))

    tasks = []
    for at, request in zip(arrivals, itertools.cycle(requests), strict=False):
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(request, float(at))))
    await asyncio.gather(*tasks)
    result.wall_s = loop.time() - start
    return result
