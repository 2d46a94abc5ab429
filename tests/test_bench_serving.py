"""The serving benchmark's batching comparison and its two diagnostics: the model's own
batching gain and an empty round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.serving import ServingBenchConfig, batching_services, empty_round_trips, model_batching
from ranking import server as ranking_server
from ranking.config import RankingConfig
from ranking.inference import RankingModel


def test_the_batching_comparison_differs_in_batching_only(tiny_bundle: Path) -> None:
    services = dict(batching_services(ServingBenchConfig(bundle=tiny_bundle, batching_threads=2)))
    assert services["batched"].max_batch_size == 32 and services["unbatched"].max_batch_size == 1
    assert services["batched"] == RankingConfig(**{**vars(services["unbatched"]), "max_batch_size": 32})
    assert services["unbatched"].threads == 2  # the thread budget asked for, on both sides


def test_model_batching_times_the_same_calls_alone_and_in_batches(tiny_bundle: Path) -> None:
    model = RankingModel.load(tiny_bundle, device="cpu")
    rng = np.random.default_rng(0)
    ids = model.tables.item_ids
    # As the funnel passes them: history, candidates with their channel scores, k, diversity,
    # explain_top, model version.
    arguments = [([ids[i] for i in rng.choice(len(ids), 6, replace=False)],
                  [(ids[i], {"sequential": 1.0}) for i in rng.choice(len(ids), 20, replace=False)],
                  10, 0.0, 0, "") for _ in range(12)]

    report = model_batching(model, arguments, batch=4, rounds=1)

    assert report["calls"] == 12 and report["batch"] == 4
    assert report["ms_per_call_alone"] > 0 and report["ms_per_call_batched"] > 0
    assert abs(report["throughput_ratio"]
               - report["ms_per_call_alone"] / report["ms_per_call_batched"]) < 0.05 * report["throughput_ratio"]


async def test_empty_round_trips_times_empty_round_trips_to_a_server(tiny_bundle: Path) -> None:
    service = await ranking_server.start(RankingConfig(bundle=tiny_bundle))
    try:
        summary = await empty_round_trips(service.address, rate=40, seconds=1.0, seed=0)
    finally:
        await service.stop(0)

    assert summary["calls"] > 10
    assert 0 < summary["p50_ms"] <= summary["p90_ms"] and summary["back_to_back_p50_ms"] > 0
