"""`recfunnel bench serving`: what every hop of the served funnel costs, under open-loop load.

One run measures, on one machine and one bundle:
  * the same request mix through the in-process pipeline (gateway funnel code over
    in-process shards and models: no gRPC, no Ray) and through the cluster over gRPC
    (S recall shards, one ranker and the gateway as Ray actors) at a low load;
  * the cluster at rising offered loads until p99 passes the latency bound;
  * the ranking service's throughput at fixed concurrency with and without micro-batching;
  * intra-list diversity and NDCG@10 against the `diversity` knob on the test split;
  * two diagnostics for the targets: an empty gRPC round trip at the same low load (a Recommend
    makes FUNNEL_HOPS of them in sequence), and how much the ranking model alone gains from
    scoring 32 calls at once (the service has gained no more than its model).

Arrivals are open-loop (`bench.harness`), so queueing shows up in the percentiles.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from bench.harness import Call, LoadResult, open_loop, start_local_ray
from bench.transport import health_check_caller, round_trips
from gateway.backends import rank_request
from gateway.events import EventLog, UserView
from gateway.funnel import Funnel, RecommendQuery
from gateway.servicer import query_of
from protos.recfunnel.v1 import ranking_pb2, ranking_pb2_grpc, recommender_pb2, recommender_pb2_grpc
from protos.serving import CHANNEL_OPTIONS, freeze_loaded_objects
from ranking.config import RankingConfig
from ranking.inference import RankCall, RankingModel
from ranking.servicer import rank_candidates
from recdata.channels import channel_mask
from recdata.dataset import Dataset
from recdata.split import leave_last_two

LATENCY_BOUND_MS = 50.0
DEADLINE_S = 1.0   # the gateway's default budget, given to both paths
# Sequential round trips in a cluster Recommend: client -> gateway, Encode, the recall
# fan-out (its shards in parallel), Rank.
FUNNEL_HOPS = 4


@dataclass(frozen=True)
class ServingBenchConfig:
    bundle: Path
    rates: tuple[float, ...] = (25, 50, 100, 150, 200, 300, 400)  # offered loads (requests/s), rising
    low_rate: float = 10.0          # "low load" of the in-process vs cluster comparison
    seconds_per_rate: float = 15.0
    batching_seconds: float = 10.0  # per side of the batching comparison
    concurrency: int = 32
    batching_threads: int = 1       # torch threads of both sides of the batching comparison (the
                                    # cluster's ranker has 1: it shares the cores with the others)
    diversities: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    diversity_users: int = 0        # test users for the diversity sweep; 0 = all
    num_shards: int = 2
    k: int = 10
    seed: int = 0


# ---- the request mix ------------------------------------------------------------------------

def request_mix(dataset: Dataset, count: int, k: int, seed: int) -> list[recommender_pb2.RecommendRequest]:
    """Known users (plain, with exclusions, with context) and unknown users (plain, with context)."""
    rng = np.random.default_rng(seed)
    kinds = ["known", "known+exclude", "known+context", "unknown", "unknown+context"]
    weights = [0.35, 0.15, 0.2, 0.15, 0.15]
    requests = []
    for n in range(count):
        kind = kinds[rng.choice(len(kinds), p=weights)]
        if kind.startswith("known"):
            user_id = dataset.user_ids[rng.integers(dataset.num_users)]
        else:
            user_id = f"visitor-{seed}-{n}"
        items = [dataset.item_ids[i] for i in rng.choice(dataset.num_items, 5, replace=False)]
        requests.append(recommender_pb2.RecommendRequest(
            user_id=user_id, k=k,
            exclude_item_ids=items[:3] if kind.endswith("exclude") else [],
            context_item_ids=items[3:] if kind.endswith("context") else []))
    return requests


# ---- the two paths --------------------------------------------------------------------------

def in_process_call(funnel: Funnel, events: EventLog, history_length: int = 200) -> Call:
    async def call(request: recommender_pb2.RecommendRequest) -> bool:
        user = UserView(events.recent_items(request.user_id, history_length), events.hidden_items(request.user_id))
        answer = await funnel.recommend(query_of(request, user), time.monotonic() + DEADLINE_S)
        return answer.degraded
    return call


def cluster_call(stub: recommender_pb2_grpc.RecommenderStub) -> Call:
    async def call(request: recommender_pb2.RecommendRequest) -> bool:
        reply = await stub.Recommend(request, timeout=DEADLINE_S)
        return bool(reply.degraded)
    return call


class RecordingRanking:
    """Wraps the in-process ranking backend and keeps the Rank calls the funnel makes, so the
    batching comparison replays real candidate lists."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.calls: list[ranking_pb2.RankRequest] = []
        self.arguments: list[tuple[Any, ...]] = []  # what the funnel passed, to time building requests

    async def encode(self, history: list[str], timeout: float, model_version: str
                     ) -> tuple[dict[str, np.ndarray], str]:
        result: tuple[dict[str, np.ndarray], str] = await self.inner.encode(history, timeout, model_version)
        return result

    async def rank(self, history: list[str], candidates: list[tuple[str, dict[str, float]]], k: int,
                   diversity: float, explain_top: int, timeout: float, model_version: str,
                   new_item_place: int | None = None) -> list[tuple[str, float, list[str]]]:
        self.calls.append(rank_request(history, candidates, k, diversity, explain_top, model_version, new_item_place))
        self.arguments.append((history, candidates, k, diversity, explain_top, model_version))
        ranked: list[tuple[str, float, list[str]]] = await self.inner.rank(
            history, candidates, k, diversity, explain_top, timeout, model_version, new_item_place)
        return ranked

    async def item_vectors(self, item_ids: list[str], timeout: float, model_version: str
                           ) -> tuple[dict[str, np.ndarray], str, list[str]]:
        found: tuple[dict[str, np.ndarray], str, list[str]] = await self.inner.item_vectors(item_ids, timeout,
                                                                                          model_version)
        return found


def wire_costs(arguments: Sequence[tuple[Any, ...]]) -> dict[str, float]:
    """Milliseconds per Rank call that the wire format costs in Python, on real candidate
    lists: the gateway building the request, the ranker reading its candidates back."""
    started = time.perf_counter()
    requests = [rank_request(*args) for args in arguments]
    built = time.perf_counter() - started
    encoded = [r.SerializeToString() for r in requests]
    started = time.perf_counter()
    for data in encoded:
        rank_candidates(ranking_pb2.RankRequest.FromString(data))
    read = time.perf_counter() - started
    count = max(1, len(arguments))
    return {"calls": len(arguments), "build_ms": round(built / count * 1e3, 4), "read_ms": round(read / count * 1e3, 4),
            "bytes": round(sum(map(len, encoded)) / count)}


async def closed_loop_throughput(address: str, requests: Sequence[ranking_pb2.RankRequest], concurrency: int,
                                 seconds: float) -> float:
    """Rank calls per second with `concurrency` callers each sending its next call at once."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = ranking_pb2_grpc.RankingStub(channel)
        for request in requests[:concurrency]:  # warm up
            await stub.Rank(request, timeout=10)
        done = 0
        stop_at = time.monotonic() + seconds

        async def caller(offset: int) -> None:
            nonlocal done
            for request in itertools.islice(itertools.cycle(requests), offset, None):
                if time.monotonic() >= stop_at:
                    return
                await stub.Rank(request, timeout=10)
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(caller(n * 7) for n in range(concurrency)))
        return done / (time.monotonic() - started)


def model_batching(model: RankingModel, arguments: Sequence[tuple[Any, ...]], batch: int, rounds: int = 3
                   ) -> dict[str, float]:
    """Milliseconds per Rank call in the model alone (no gRPC, no queue), back to back: one call
    at a time against `batch` calls in one `rank_many`, over the same recorded calls."""
    calls = [RankCall(history, [(i, channel_mask(scores)) for i, scores in candidates], k, diversity, explain)
             for history, candidates, k, diversity, explain, _ in arguments]
    alone, together = [], []
    for _ in range(rounds):  # interleaved, so that drift on a noisy machine hits both alike
        started = time.perf_counter()
        for call in calls:
            model.rank_many([call])
        alone.append((time.perf_counter() - started) / len(calls))
        started = time.perf_counter()
        for first in range(0, len(calls), batch):
            model.rank_many(calls[first : first + batch])
        together.append((time.perf_counter() - started) / len(calls))
    one, many = min(alone), min(together)
    return {"calls": len(calls), "batch": batch, "ms_per_call_alone": round(one * 1e3, 3),
            "ms_per_call_batched": round(many * 1e3, 3), "throughput_ratio": round(one / many, 3)}


async def empty_round_trips(address: str, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """An empty unary call (the gateway's health check) at the low load's arrival rate: what
    one gRPC round trip costs on this machine with no work, timed from its send. (The open-loop
    clock of the latency runs also counts the load generator's own timer wake-up, once per
    request however many hops it makes.)"""
    call, close = health_check_caller(address, DEADLINE_S)
    try:
        figures = await round_trips(call, rate, seconds, seed)
    finally:
        await close()
    return {"p50_ms": figures["idle_p50_ms"], "p90_ms": figures["idle_p90_ms"], "calls": figures["idle_calls"],
            "back_to_back_p50_ms": figures["back_to_back_p50_ms"]}


# ---- diversity ------------------------------------------------------------------------------

def intra_list_diversity(vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance of a list's unit item vectors."""
    n = len(vectors)
    if n < 2:
        return 0.0
    similarity = vectors @ vectors.T
    return float((n * n - similarity.sum()) / (n * (n - 1)))


async def diversity_sweep(funnel: Funnel, model: RankingModel, dataset: Dataset, config: ServingBenchConfig
                          ) -> list[dict[str, float]]:
    """ILD@10 and NDCG@10 of the served funnel on the test split, per diversity value."""
    split = leave_last_two(dataset)
    positions = range(min(config.diversity_users or len(split.users), len(split.users)))
    vectors = model.tables.item_vectors.cpu().numpy()
    index = model.tables.item_index
    rows = []
    for diversity in config.diversities:
        ndcg, ild = [], []
        for p in positions:
            history = [dataset.item_ids[i] for i in split.test_history(p)]
            answer = await funnel.recommend(
                RecommendQuery(user_id=dataset.user_ids[split.users[p]], k=10, history=history, diversity=diversity),
                time.monotonic() + 10)
            items = [r.item_id for r in answer.items]
            target = dataset.item_ids[split.test_targets[p]]
            ndcg.append(1 / math.log2(items.index(target) + 2) if target in items else 0.0)
            ild.append(intra_list_diversity(vectors[[index[i] for i in items if i in index]]))
        rows.append({"diversity": diversity, "ild@10": round(float(np.mean(ild)), 4),
                     "ndcg@10": round(float(np.mean(ndcg)), 4), "users": len(ndcg)})
    return rows


# ---- the run --------------------------------------------------------------------------------

def _ranker_batch(stats_before: dict[str, Any], stats_after: dict[str, Any]) -> float | None:
    if not stats_after:
        return None
    requests = stats_after["rank"]["requests"] - stats_before["rank"]["requests"]
    batches = stats_after["rank"]["batches"] - stats_before["rank"]["batches"]
    return requests / batches if batches else None


def run_serving_bench(dataset: Dataset, config: ServingBenchConfig,
                      progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    import ray

    from bench.in_process import InProcessRanking, in_process_funnel
    from cluster.actors import RankingHost
    from cluster.config import ClusterConfig
    from cluster.demo import seed_history
    from cluster.launch import start_cluster

    # The cluster's ranker runs with one torch thread; the in-process path gets the same.
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="recfunnel-bench-"))
    report: dict[str, Any] = {"bundle": str(config.bundle), "cores": os.cpu_count(), "shards": config.num_shards,
                              "latency_bound_ms": LATENCY_BOUND_MS, "arrivals": "open-loop Poisson"}
    try:
        db_path = workdir / "events.sqlite"
        events = EventLog(db_path)
        seed_history(events, dataset)
        requests = request_mix(dataset, 2000, config.k, config.seed)

        # (a) in process: the funnel code over in-process shards and models.
        progress("in-process pipeline at low load")
        funnel = in_process_funnel(config.bundle, config.num_shards)
        freeze_loaded_objects()  # as the services do once loaded
        ranking = funnel.ranking
        assert isinstance(ranking, InProcessRanking)
        recording = RecordingRanking(ranking)
        funnel.ranking = recording
        call = in_process_call(funnel, events)
        asyncio.run(open_loop(call, requests[-100:], config.low_rate, 3, config.seed + 1))  # warm up
        in_process = asyncio.run(open_loop(call, requests, config.low_rate, config.seconds_per_rate, config.seed))
        report["in_process"] = in_process.summary()
        rank_requests = recording.calls[:512]
        report["rank_wire"] = wire_costs(recording.arguments[:512])
        model_only = model_batching(ranking.model, recording.arguments[:512], config.concurrency)
        funnel.ranking = ranking

        progress("diversity sweep on the test split")
        report["diversity"] = asyncio.run(diversity_sweep(funnel, ranking.model, dataset, config))
        del funnel, ranking, recording

        # (b) the cluster over gRPC.
        progress("starting the cluster on local Ray")
        start_local_ray()
        try:
            cluster = start_cluster(ClusterConfig(bundle=config.bundle, db_path=db_path,
                                                  num_shards=config.num_shards, gateway_port=0))
            # The load generator holds torch too: a full collection in it would stall arrivals
            # and be counted against the cluster.
            freeze_loaded_objects()
            try:
                report["cluster"], report["loads"], report["max_qps_p99_under_50ms"] = asyncio.run(
                    _cluster_loads(cluster, requests, config, progress))
                progress("an empty gRPC round trip at low load")
                report["transport"] = asyncio.run(empty_round_trips(cluster.gateway_address, config.low_rate,
                                                                  config.seconds_per_rate, config.seed))
            finally:
                cluster.stop()
            progress("ranking throughput with and without micro-batching")
            report["batching"] = {**_batching(RankingHost, config, rank_requests), "model_only": model_only}
        finally:
            ray.shutdown()
        in_process_p50 = report["in_process"]["p50_ms"]
        report["p50_ratio_cluster_vs_in_process"] = round(report["cluster"]["p50_ms"] / in_process_p50, 3)
        # The ratio the cluster would show if each hop cost one idle empty round trip on top of
        # the in-process stages: an estimate, not a bound (a hop made just after another finds
        # some of its threads still awake). The key keeps its published name.
        report["p50_ratio_transport_floor"] = round(
            (in_process_p50 + FUNNEL_HOPS * report["transport"]["p50_ms"]) / in_process_p50, 3)
        events.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


async def _cluster_loads(cluster: Any, requests: list[recommender_pb2.RecommendRequest],
                         config: ServingBenchConfig, progress: Callable[[str], None]
                         ) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    async with grpc.aio.insecure_channel(cluster.gateway_address) as channel:
        call = cluster_call(recommender_pb2_grpc.RecommenderStub(channel))
        await open_loop(call, requests[-100:], config.low_rate, 3, config.seed + 1)  # warm up

        async def measured(rate: float) -> LoadResult:
            before = await cluster.ranker.stats.remote()
            result = await open_loop(call, requests, rate, config.seconds_per_rate, config.seed)
            after = await cluster.ranker.stats.remote()
            result.ranker_batch = _ranker_batch(before, after)
            return result

        progress(f"cluster at low load ({config.low_rate:g} rps)")
        low = (await measured(config.low_rate)).summary()
        loads, best = [], 0.0
        for rate in config.rates:
            progress(f"cluster at {rate:g} rps")
            summary = (await measured(rate)).summary()
            loads.append(summary)
            if summary["p99_ms"] > LATENCY_BOUND_MS or summary["errors"]:
                break
            best = rate
        return low, loads, best


def batching_services(config: ServingBenchConfig) -> list[tuple[str, RankingConfig]]:
    """The two ranking services of the batching comparison: alike but for batching."""
    return [(name, RankingConfig(bundle=config.bundle, max_batch_size=size, threads=config.batching_threads))
            for name, size in (("batched", 32), ("unbatched", 1))]


def _batching(host: type, config: ServingBenchConfig, rank_requests: list[ranking_pb2.RankRequest]
              ) -> dict[str, Any]:
    import ray

    out: dict[str, Any] = {"concurrency": config.concurrency, "rank_requests": len(rank_requests),
                           "threads": config.batching_threads}
    for name, service in batching_services(config):
        actor: Any = ray.remote(host).options(num_cpus=0.5).remote(service)
        try:
            address = ray.get(actor.start.remote(), timeout=300)
            rps = asyncio.run(closed_loop_throughput(address, rank_requests, config.concurrency,
                                                     config.batching_seconds))
            stats = ray.get(actor.stats.remote(), timeout=30)
            out[name] = {"max_batch_size": service.max_batch_size, "rank_per_s": round(rps, 2),
                         "mean_batch_size": stats["rank"]["mean_batch_size"]}
        finally:
            ray.get(actor.stop.remote(), timeout=30)
            ray.kill(actor)
    out["throughput_ratio_at_32"] = round(out["batched"]["rank_per_s"] / out["unbatched"]["rank_per_s"], 3)
    return out
