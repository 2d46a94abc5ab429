"""`recfunnel bench store`: the event store on SQLite and on PostgreSQL, in one run.

Per store, on a fresh log (a new SQLite file; a new schema on the server, dropped after):
  * the log is filled to `events` events (ML-100K's history, then synthetic users' events
    over the same items) and the fill's rate is recorded;
  * history reads at fixed open-loop rates, done the way the gateway does them (SQLite on the
    event loop, PostgreSQL on a worker thread), their p50/p99;
  * Feedback events acknowledged per second through 1 and 2 gateway processes on one port
    (SO_REUSEPORT), with batches of 1 and 100 events, from closed-loop callers, checked
    against what the log gained;
  * Recommend and Feedback at a fixed open-loop rate through one gateway process.
The recall shards and the ranking service run in this process, shared by both stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.harness import free_port, open_loop, wait_for_health
from gateway.events import Event, EventStore, open_event_store, read_user
from protos.serving import freeze_loaded_objects
from recdata.dataset import Dataset

FILL_BATCH = 10_000


@dataclass(frozen=True)
class StoreBenchConfig:
    bundle: Path
    pg_url: str = ""                          # "" = SQLite alone
    events: int = 1_000_000                   # logged before the reads
    read_rates: tuple[float, ...] = (100.0, 500.0)
    read_seconds: float = 10.0
    feedback_seconds: float = 8.0
    feedback_callers: int = 8
    serving_rate: float = 100.0
    serving_seconds: float = 20.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.events < 1_000 or any(r <= 0 for r in self.read_rates):
            raise ValueError("events must be >= 1000 and read rates > 0")


@contextlib.contextmanager
def fresh_store(kind: str, config: StoreBenchConfig, workdir: Path) -> Iterator[str]:
    """The location of an empty store of `kind`; a server schema is dropped afterwards."""
    if kind == "sqlite":
        yield str(workdir / f"events-{uuid.uuid4().hex[:8]}.sqlite")
        return
    from gateway.postgres_events import scratch_schema

    with scratch_schema(config.pg_url, "recfunnel_bench") as url:
        yield url


def fill(store: EventStore, dataset: Dataset, total: int, seed: int) -> tuple[list[str], float]:
    """ML-100K's history, then synthetic users' events over its items up to `total` events;
    returns users with a history (to read) and the events/s of the fill."""
    from cluster.demo import seed_history

    started = time.perf_counter()
    logged = seed_history(store, dataset)
    rng = np.random.default_rng(seed)
    users: list[str] = list(dataset.user_ids)
    while logged < total:
        count = min(FILL_BATCH, total - logged)
        owners = rng.integers(0, max(1, total // 10), count)
        items = rng.integers(0, dataset.num_items, count)
        store.append([Event(f"bench-u{u}", dataset.item_ids[i], "click", 1.0, 1_000 + logged + n)
                      for n, (u, i) in enumerate(zip(owners.tolist(), items.tolist(), strict=True))])
        logged += count
        users.extend(f"bench-u{u}" for u in owners[:50].tolist())
    return users, round(logged / (time.perf_counter() - started), 1)


async def history_reads(store: EventStore, users: list[str], rate: float, seconds: float, seed: int
                        ) -> dict[str, Any]:
    """Open-loop history reads of 200 items, as the gateway reads them."""
    async def read(user: str) -> bool:
        await read_user(store, user, 200)
        return False

    result = await open_loop(read, users, rate, seconds, seed, kind_of=lambda _: "history")
    return result.summary()


@contextlib.contextmanager
def gateway_processes(count: int, port: int, recall: list[str], ranking: str, db: str) -> Iterator[str]:
    """`count` gateway processes (python -m gateway) on one loopback port; its address."""
    command = [sys.executable, "-m", "gateway", "--no-auth", "--db", db, "--port", str(port), "--ranking", ranking,
               *[arg for address in recall for arg in ("--recall", address)]]
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}) for _ in range(count)]
    try:
        address = f"127.0.0.1:{port}"
        wait_for_health(address, processes)
        yield address
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


async def feedback_rate(address: str, batch: int, callers: int, seconds: float) -> dict[str, Any]:
    """Closed-loop callers, each on its own channel (the kernel spreads connections over the
    processes of a shared port), sending Feedback of `batch` new keyed events."""
    from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc

    acknowledged, errors = 0, 0
    stop = time.perf_counter() + seconds

    async def caller(n: int) -> None:
        nonlocal acknowledged, errors
        async with grpc.aio.insecure_channel(address) as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            while time.perf_counter() < stop:
                request = recommender_pb2.FeedbackRequest(events=[recommender_pb2.Event(
                    user_id=f"caller-{n}", item_id="1", event_type="click", event_id=uuid.uuid4().hex)
                    for _ in range(batch)])
                try:
                    # Awaited first: `total += await ...` would read the total before the
                    # await and lose every other caller's acknowledgements made meanwhile.
                    reply = await stub.Feedback(request, timeout=10)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                acknowledged += reply.accepted

    started = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    return {"events_per_s": round(acknowledged / (time.perf_counter() - started), 1), "acknowledged": acknowledged,
            "failed_calls": errors}


async def serving(address: str, dataset: Dataset, users: list[str], config: StoreBenchConfig) -> dict[str, Any]:
    from bench.loadtest import LoadTest, Mix, run_load

    mix = Mix(tuple(dataset.user_ids) + tuple(users[:1000]), tuple(dataset.item_ids))
    result = await run_load(LoadTest(address, config.serving_rate, config.serving_seconds, warmup_s=5.0,
                                     seed=config.seed), mix)
    return {kind: result.summary(kind) for kind in ("Recommend", "Feedback")}


def measure_store(kind: str, config: StoreBenchConfig, dataset: Dataset, recall: list[str], ranking: str,
                  workdir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    with fresh_store(kind, config, workdir) as location:
        store = open_event_store(location)
        try:
            progress(f"{kind}: filling the log to {config.events:,} events")
            users, report["fill_events_per_s"] = fill(store, dataset, config.events, config.seed)
            report["events_logged"] = store.count()
            # As a gateway process does once loaded: the fill's and the in-process services'
            # objects would otherwise make each full collection a ~90 ms stall in the reads.
            freeze_loaded_objects()
            report["history_reads"] = {}
            for rate in config.read_rates:
                progress(f"{kind}: history reads at {rate:g}/s")
                report["history_reads"][f"{rate:g}/s"] = asyncio.run(
                    history_reads(store, users, rate, config.read_seconds, config.seed))
            report["feedback"] = {}
            for processes in (1, 2):
                with gateway_processes(processes, free_port(), recall, ranking, location) as address:
                    for batch in (1, 100):
                        progress(f"{kind}: Feedback, batches of {batch}, {processes} gateway process(es)")
                        before = store.count()
                        measured = asyncio.run(feedback_rate(address, batch, config.feedback_callers,
                                                         config.feedback_seconds))
                        # What the log gained: every acknowledged event, once (the callers' count checked).
                        report["feedback"][f"batch {batch}, {processes} gateway(s)"] = {
                            **measured, "logged": store.count() - before}
                    if processes == 1 and config.serving_seconds > 0:
                        progress(f"{kind}: Recommend at {config.serving_rate:g}/s through one gateway")
                        report["serving"] = asyncio.run(serving(address, dataset, users, config))
        finally:
            store.close()
    return report


def run_store_bench(dataset: Dataset, config: StoreBenchConfig, progress: Callable[[str], None] = lambda _: None
                    ) -> dict[str, Any]:
    import logging

    from ranking import server as ranking_server
    from ranking.config import RankingConfig
    from retrieval import server as recall_server
    from retrieval.config import RecallConfig

    # A gateway process stopped at the end of a measurement leaves searches in flight whose
    # answers cannot be sent; the in-process shards would log each as an error.
    logging.getLogger("grpc._cython.cygrpc").setLevel(logging.CRITICAL)
    stores = ["sqlite"] + (["postgresql"] if config.pg_url else [])
    report: dict[str, Any] = {"bundle": str(config.bundle), "events": config.events, "stores": {}}
    workdir = Path(tempfile.mkdtemp(prefix="recfunnel-store-bench-"))
    loop = asyncio.new_event_loop()
    # The recall shards and the ranker answer on this process's own event loop, in a thread,
    # while the measurements run their own loops.
    shards = [loop.run_until_complete(recall_server.start(RecallConfig(bundle=config.bundle, shard_id=n,
                                                                       num_shards=2, port=0))) for n in range(2)]
    ranking = loop.run_until_complete(ranking_server.start(RankingConfig(bundle=config.bundle, port=0)))
    serving_thread = threading.Thread(target=loop.run_forever, daemon=True)
    serving_thread.start()
    try:
        for kind in stores:
            report["stores"][kind] = measure_store(kind, config, dataset, [s.address for s in shards],
                                                   ranking.address, workdir, progress)
    finally:
        for stop in [*(s.stop(0) for s in shards), ranking.stop(0)]:
            asyncio.run_coroutine_threadsafe(stop, loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        serving_thread.join(timeout=30)
    if "postgresql" in report["stores"]:
        pg, lite = report["stores"]["postgresql"], report["stores"]["sqlite"]
        if "serving" in pg and "serving" in lite:
            report["recommend_p99_postgresql_over_sqlite"] = round(
                pg["serving"]["Recommend"]["p99_ms"] / lite["serving"]["Recommend"]["p99_ms"], 3)
    return report

