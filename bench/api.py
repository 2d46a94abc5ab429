"""`recfunnel bench api`: the product API under open-loop load on the ML-100K bundle.

SimilarItems (one or two items of a page or basket) and Recommend with filters that pass about
50%, 5% and 0.5% of the catalogue, each at every offered rate, through a gateway over two recall
shards and a ranker as processes, as deployed. Reported per case: p50/p99, errors, and the
share of answers that filled k (a filter that passes fewer than k items cannot). The exposure
log's cost: Recommend at the highest rate through a gateway that logs exposures and one that
does not, over the same shards and ranker, in alternating rounds. Then
`recfunnel export`'s path on a local Ray of the machine's cores: every user of the log, k = 100,
in users/s with and without the actors' start.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.harness import LoadResult, open_loop, process_stack
from protos.filters import filter_to_proto
from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc
from protos.serving import CHANNEL_OPTIONS
from recdata.attributes import ItemAttributes, ItemFilter, NumberRange
from recdata.dataset import Dataset


@dataclass(frozen=True)
class ApiBenchConfig:
    bundle: Path
    rates: tuple[float, ...] = (50.0, 100.0)
    seconds: float = 15.0
    selectivities: tuple[float, ...] = (0.5, 0.05, 0.005)
    k: int = 10
    seed: int = 0
    export_k: int = 100
    export_actors: int = 2
    export_repeat: int = 10  # the log's users, this many times over: enough scoring to time
    exposure_rounds: int = 2  # alternating rounds of the exposure-cost comparison


def year_filter(attributes: Sequence[ItemAttributes], share: float) -> tuple[ItemFilter, float]:
    """The release-year range whose share of the catalogue is closest to `share`, and that share."""
    years = np.asarray([a.properties.get("year", np.nan) for a in attributes], dtype=np.float64)
    known = np.unique(years[~np.isnan(years)])
    best: tuple[float, float, float] = (np.inf, known[0], known[-1])
    for n, low in enumerate(known):
        counts = np.cumsum([np.count_nonzero(years == y) for y in known[n:]])
        shares = counts / len(years)
        m = int(np.argmin(np.abs(shares - share)))
        if abs(shares[m] - share) < best[0]:
            best = (abs(shares[m] - share), float(low), float(known[n + m]))
    item_filter = ItemFilter(ranges=(NumberRange("year", best[1], best[2]),))
    return item_filter, float(np.mean([item_filter.passes(a) for a in attributes]))


def case_summary(result: LoadResult, filled: list[bool]) -> dict[str, Any]:
    return {**result.summary(), "filled_k_share": round(float(np.mean(filled)), 4) if filled else None}


async def run_case(address: str, requests: Sequence[Any], method: str, rate: float, seconds: float, seed: int,
                   k: int) -> dict[str, Any]:
    filled: list[bool] = []
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = getattr(recommender_pb2_grpc.RecommenderStub(channel), method)

        async def one(request: Any) -> bool:
            reply = await call(request, timeout=1.0)
            filled.append(len(reply.items) >= k)
            return bool(reply.degraded)

        await open_loop(one, requests[:50], min(rate, 20.0), 3.0, seed + 1)  # warm-up, not counted
        filled.clear()
        result = await open_loop(one, requests, rate, seconds, seed)
    return case_summary(result, filled)


def run_api_bench(dataset: Dataset, config: ApiBenchConfig, progress: Callable[[str], None] = lambda _: None
                  ) -> dict[str, Any]:
    from cluster.demo import fresh_event_log
    from recdata.bundle import load_bundle

    bundle = load_bundle(config.bundle)
    if not bundle.item_attributes:
        raise ValueError(f"{config.bundle} holds no item attributes (written before filters): train it again")
    rng = np.random.default_rng(config.seed)
    users = [dataset.user_ids[u] for u in rng.integers(0, dataset.num_users, 2000)]
    pages = [[dataset.item_ids[i] for i in rng.integers(0, dataset.num_items, rng.integers(1, 3))]
             for _ in range(2000)]
    filters = {f"{share:g}": year_filter(bundle.item_attributes, share) for share in config.selectivities}
    cases: dict[str, tuple[str, list[Any]]] = {
        "similar_items": ("SimilarItems", [recommender_pb2.SimilarItemsRequest(item_ids=p, k=config.k)
                                           for p in pages]),
        "recommend_unfiltered": ("Recommend", [recommender_pb2.RecommendRequest(user_id=u, k=config.k)
                                               for u in users]),
        **{f"recommend_filter_{name}": ("Recommend", [recommender_pb2.RecommendRequest(
            user_id=u, k=config.k, filter=filter_to_proto(item_filter)) for u in users])
           for name, (item_filter, _) in filters.items()},
    }
    workdir = Path(tempfile.mkdtemp(prefix="recfunnel-api-bench-"))
    db_path = fresh_event_log(workdir / "events.sqlite", dataset)
    report: dict[str, Any] = {
        "bundle": str(config.bundle), "k": config.k, "seconds_per_case": config.seconds,
        "filters": {name: {"filter": repr(item_filter), "passing_share": round(share, 4)}
                    for name, (item_filter, share) in filters.items()},
        "cases": {}}
    progress("starting 2 recall shards, a ranker and a gateway")
    with process_stack(config.bundle, db_path, {"gateway": [], "no_exposures": ["--no-exposures"]}) as gateways:
        for rate in config.rates:
            for name, (method, requests) in cases.items():
                progress(f"{name} at {rate:g} requests/s for {config.seconds:g} s")
                summary = asyncio.run(run_case(gateways["gateway"], requests, method, rate, config.seconds,
                                               config.seed, config.k))
                report["cases"].setdefault(name, {})[f"{rate:g}"] = summary
        report["exposure_cost"] = exposure_cost(gateways, cases["recommend_unfiltered"][1], config, progress)
    progress(f"export of every user, k = {config.export_k}, {config.export_actors} Ray Data actors")
    report["export"] = run_export(config, str(db_path), workdir / "recs.parquet")
    return report


def exposure_cost(gateways: dict[str, str], requests: Sequence[Any], config: ApiBenchConfig,
                  progress: Callable[[str], None]) -> dict[str, Any]:
    """Recommend p50/p99 with the exposure log on and off, alternating rounds, and their ratios."""
    rate = max(config.rates)
    rounds: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for n in range(config.exposure_rounds):
        for name, gateway in (("on", "gateway"), ("off", "no_exposures")):
            progress(f"exposure log {name}, round {n + 1}: Recommend at {rate:g} requests/s")
            rounds[name].append(asyncio.run(run_case(gateways[gateway], requests, "Recommend", rate, config.seconds,
                                                     config.seed + n, config.k)))
    mean = {name: {q: float(np.mean([r[q] for r in runs])) for q in ("p50_ms", "p99_ms")}
            for name, runs in rounds.items()}
    return {"rate": rate, "rounds": rounds, "mean": mean,
            "p50_on_over_off": round(mean["on"]["p50_ms"] / mean["off"]["p50_ms"], 3),
            "p99_on_over_off": round(mean["on"]["p99_ms"] / mean["off"]["p99_ms"], 3)}


def run_export(config: ApiBenchConfig, db: str, out: Path) -> dict[str, Any]:
    import ray

    from bench.harness import start_local_ray
    from cluster.export import ExportConfig, all_users, export

    users = all_users(db)
    start_local_ray()
    try:
        report = export(ExportConfig(bundle=config.bundle, store=db, out=out, k=config.export_k,
                                     actors=config.export_actors, device="cpu"), users * config.export_repeat)
    finally:
        ray.shutdown()
    return {**report, "distinct_users": len(users), "repeat": config.export_repeat}
