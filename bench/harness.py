"""The harness every benchmark and the load tester share: open-loop load, percentile
summaries, peak memory, and the report a command prints (a table for people, JSON for scripts).

Open-loop load sends requests at scheduled Poisson arrival times, whatever the answers do.
Latency is counted from the scheduled send time, so queueing anywhere (in the system or in
this process) shows in the percentiles instead of slowing the arrivals down, as a closed
loop of callers would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # the services load only for the benches that start them
    from gateway.observe import GatewayObserver
    from gateway.server import Gateway
    from ranking.server import RankingService
    from retrieval.server import RecallService

LATENCY_QUANTILES = (50, 90, 99, 99.9)

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
        return {
            "offered_rps": self.offered_rps,
            "achieved_rps": round(len(ok) / self.wall_s, 2) if self.wall_s else 0.0,
            "requests": len(chosen),
            **percentiles_ms([s.latency_ms for s in ok]),
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


def percentiles_ms(latencies_ms: Iterable[float], quantiles: Sequence[float] = LATENCY_QUANTILES
                   ) -> dict[str, float]:
    """{"p50_ms": ..., "p99_ms": ...} of the latencies (NaN where there are none), to 3 decimals."""
    values = np.fromiter(latencies_ms, dtype=np.float64)
    if not len(values):
        return {f"p{q:g}_ms": float("nan") for q in quantiles}
    return {f"p{q:g}_ms": round(float(v), 3) for q, v in zip(quantiles, np.percentile(values, quantiles),
                                                               strict=True)}


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_local_ray(cores: int | None = None) -> None:
    """A local Ray for a bench, over `cores` CPUs (default: all): no dashboard, no usage
    report, no log forwarding."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=cores or os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)


def peak_rss_gib() -> float:
    """The highest resident memory this process has had, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def _lookup(report: dict[str, Any], path: str) -> Any:
    value: Any = report
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def headline_table(report: dict[str, Any], headline: Sequence[tuple[str, str]], title: str) -> Table:
    """The figures a person looks for first: (label, dotted key into the report) rows."""
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for label, path in headline:
        value = _lookup(report, path)
        if value is not None:
            table.add_row(label, f"{value:g}" if isinstance(value, float) else str(value))
    return table


def print_report(report: dict[str, Any], as_json: bool, headline: Sequence[tuple[str, str]] = (),
                 title: str = "") -> None:
    """A bench's output: the JSON report on stdout (one line with `as_json`, indented otherwise),
    and, for a person, the headline figures as a table on stderr, so stdout stays JSON alone."""
    if not as_json and headline:
        Console(stderr=True).print(headline_table(report, headline, title))
    sys.stdout.write(json.dumps(report, indent=None if as_json else 2) + "\n")
    sys.stdout.flush()


def wait_for_health(address: str, processes: list[subprocess.Popen[bytes]], within_s: float = 60.0) -> None:
    """Until the service processes started on `address` answer health checks; raises if one exits."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise RuntimeError(f"a service process exited while starting (code {[p.poll() for p in processes]})")
        with grpc.insecure_channel(address) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                # Every process listens once each has had time to bind; the port is shared.
                time.sleep(1.0)
                return
            except grpc.RpcError:
                time.sleep(0.3)
    raise TimeoutError(f"nothing answered health on {address} within {within_s} s")


@contextlib.contextmanager
def process_stack(bundle: Path, db_path: Path, gateways: dict[str, list[str]], num_shards: int = 2
                  ) -> Iterator[dict[str, str]]:
    """Recall shards, a ranker and the named gateways over them (each with its extra command
    line arguments) as `python -m …` processes on loopback, as a deployment runs them:
    {name: gateway address}."""
    processes: list[subprocess.Popen[bytes]] = []

    def launch(module: str, port: int, *arguments: str) -> str:
        process = subprocess.Popen([sys.executable, "-m", module, "--no-auth", "--port", str(port), *arguments],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        processes.append(process)
        address = f"127.0.0.1:{port}"
        wait_for_health(address, [process], within_s=180.0)
        return address

    try:
        shards = [launch("retrieval", free_port(), "--bundle", str(bundle), "--shard-id", str(n),
                         "--num-shards", str(num_shards)) for n in range(num_shards)]
        ranking = launch("ranking", free_port(), "--bundle", str(bundle))
        backends = [arg for address in shards for arg in ("--recall", address)] + ["--ranking", ranking]
        yield {name: launch("gateway", free_port(), "--db", str(db_path), *extra, *backends)
               for name, extra in gateways.items()}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


@contextlib.asynccontextmanager
async def grpc_stack(bundle: Path, db_path: Path, num_shards: int = 2, internal_token: str | None = None,
                     observer: GatewayObserver | None = None, **gateway_options: Any
                     ) -> AsyncIterator[tuple[Gateway, list[RecallService], RankingService]]:
    """Recall shards, the ranking service and a gateway over them, as gRPC servers on free
    loopback ports of this process (the services require `internal_token` when one is given,
    and the gateway sends it): (gateway, shard handles, ranking service)."""
    from gateway import server as gateway_server
    from gateway.config import GatewayConfig
    from ranking import server as ranking_server
    from ranking.config import RankingConfig
    from retrieval import server as recall_server
    from retrieval.config import RecallConfig

    shards = [await recall_server.start(RecallConfig(bundle=bundle, shard_id=n, num_shards=num_shards,
                                                     internal_token=internal_token))
              for n in range(num_shards)]
    ranking = await ranking_server.start(RankingConfig(bundle=bundle, internal_token=internal_token))
    gateway = await gateway_server.start(GatewayConfig(
        recall_addresses=tuple(s.address for s in shards), ranking_addresses=(ranking.address,),
        db_path=db_path, port=0, internal_token=internal_token, **gateway_options), observer)
    try:
        yield gateway, shards, ranking
    finally:
        await gateway.stop(0)
        for shard in shards:
            await shard.stop(0)
        await ranking.stop(0)
