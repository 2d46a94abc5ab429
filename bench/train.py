"""`recfunnel bench train`: query-encoder training throughput, plain loop against Ray Train
with 1 and more workers, in one run on the same data, seed and number of epochs.

Throughput is training positions (next-item targets) per second of the encoder phase,
validation after each epoch included, as every path does it. The overhead of Ray Train is
1 - (1 worker's throughput / the plain loop's), both given all the machine's cores.

The plain loop runs twice: before Ray starts, and again while Ray's own processes (raylet,
GCS, agents) run idle beside it. The first is the headline comparison; the second splits
the overhead into what sharing the cores with Ray costs and what Ray Train itself adds.

With `rounds` above 1 every path runs once per round, Ray started and shut down within each
round, and the headline figures are medians over the rounds (each round's own are kept):
a single pass on a two-core virtual machine has given overheads from 2% to 17%.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import start_local_ray
from ranking.config import TrainConfig
from ranking.text_encoder import TextEncoder
from ranking.train import Trainer, training_windows
from recdata.dataset import Dataset

# Ray's processes start in the background after ray.init returns; on two cores they would
# slow the next measurement while they import, which is start-up, not Ray's steady cost.
RAY_SETTLE_S = 10.0


def bench_config(epochs: int, seed: int, cores: int) -> TrainConfig:
    """A fixed number of epochs (no early stop, no time budget, no ranker epochs) on the CPU,
    as Ray Train's workers without GPUs train."""
    return TrainConfig(epochs=epochs, patience=epochs, time_budget_s=1e9, ranker_epochs=0, seed=seed,
                       threads=cores, device="cpu")


def positions_per_epoch(trainer: Trainer) -> int:
    windows = training_windows(trainer.split.train, trainer.config.model.max_len)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    return int(((targets != 0) & (inputs != 0)).sum())


def _encoder_seconds(curve: list[dict[str, float]]) -> float:
    return max(p["seconds"] for p in curve if p["stage"] == 0.0)


def _epoch_seconds(curve: list[dict[str, float]]) -> list[float]:
    """Each encoder epoch's own seconds (validation included)."""
    ends = [p["seconds"] for p in curve if p["stage"] == 0.0]
    return [round(end - start, 2) for start, end in zip([0.0, *ends], ends, strict=False)]


def _after_first(curve: list[dict[str, float]], positions: int) -> float:
    """Positions per second over the epochs after the first, which in a fresh process (every
    Ray Train worker) is the slowest."""
    epochs = _epoch_seconds(curve)[1:]
    return round(positions * len(epochs) / sum(epochs), 1) if epochs else float("nan")


def _plain_run(plain: Trainer, samples: int) -> dict[str, Any]:
    curve = plain.train_encoder()
    seconds = _encoder_seconds(curve)
    return {"seconds": round(seconds, 2), "samples_per_s": round(samples / seconds, 1),
            "samples_per_s_after_first_epoch": _after_first(curve, samples // plain.config.epochs),
            "epoch_seconds": _epoch_seconds(curve), "valid_ndcg@10": round(curve[-1]["ndcg@10"], 4)}


def _overheads(ray_train: dict[str, Any], plain: dict[str, Any]) -> tuple[float, float]:
    """Ray Train's overhead against a plain run: over the whole run, and after the first epoch."""
    return (round(1 - ray_train["samples_per_s"] / plain["samples_per_s"], 4),
            round(1 - ray_train["samples_per_s_after_first_epoch"] / plain["samples_per_s_after_first_epoch"], 4))


def _ray_train_run(dataset: Dataset, config: TrainConfig, text_vectors: Any, samples: int, count: int,
                   cores: int) -> dict[str, Any]:
    from cluster.train_ray import RayTrainConfig, train_on_ray

    with tempfile.TemporaryDirectory() as folder:
        result = train_on_ray(dataset, config, Path(folder) / "bundle",
                              RayTrainConfig(workers=count, storage=Path(folder) / "checkpoints",
                                             cpus_per_worker=cores / count, name=f"bench-{count}"),
                              text_vectors=text_vectors)
    seconds = _encoder_seconds(result.curve)
    return {"workers": count, "seconds": round(seconds, 2), "samples_per_s": round(samples / seconds, 1),
            "samples_per_s_after_first_epoch": _after_first(result.curve, samples // config.epochs),
            "epoch_seconds": _epoch_seconds(result.curve),
            "valid_ndcg@10": round([p for p in result.curve if p["stage"] == 0.0][-1]["ndcg@10"], 4)}


def _round(dataset: Dataset, config: TrainConfig, text_vectors: Any, samples: int, workers: list[int],
           cores: int) -> dict[str, Any]:
    """One pass over every path: the plain loop before Ray starts, then beside idle Ray, then
    Ray Train with each worker count; Ray is shut down again at the end."""
    import ray

    report: dict[str, Any] = {"plain": _plain_run(Trainer(dataset, config, text_vectors=text_vectors), samples)}
    start_local_ray(cores)
    try:
        time.sleep(RAY_SETTLE_S)
        report["plain_beside_idle_ray"] = _plain_run(Trainer(dataset, config, text_vectors=text_vectors), samples)
        for count in workers:
            report[f"ray_train_{count}"] = _ray_train_run(dataset, config, text_vectors, samples, count, cores)
    finally:
        ray.shutdown()
    if "ray_train_1" in report:
        one = report["ray_train_1"]
        report["overhead_1_worker"], report["overhead_1_worker_after_first_epoch"] = _overheads(
            one, report["plain"])
        # What Ray Train adds once Ray's own processes are on the machine for both.
        (report["overhead_1_worker_vs_plain_beside_ray"],
         report["overhead_1_worker_vs_plain_beside_ray_after_first_epoch"]) = _overheads(
            one, report["plain_beside_idle_ray"])
    if "ray_train_2" in report and "ray_train_1" in report:
        report["speedup_2_vs_1"] = round(report["ray_train_2"]["samples_per_s"]
                                         / report["ray_train_1"]["samples_per_s"], 3)
    return report


def summarise_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over rounds of every figure each round reports, paths and overheads alike.

    Each overhead is a ratio of two runs minutes apart in one round; the median of those paired
    ratios follows the machine's drift less than a ratio of medians would, and one slow run
    (this kind of machine swings by several percent from minute to minute) moves it little.
    """
    summary: dict[str, Any] = {}
    for key, first in rounds[0].items():
        if isinstance(first, dict):
            summary[key] = {name: (round(statistics.median(r[key][name] for r in rounds), 4)
                                   if isinstance(value, float) else value)
                            for name, value in first.items() if name != "epoch_seconds"}
        else:
            summary[key] = round(statistics.median(r[key] for r in rounds), 4)
    return summary


def run_train_bench(dataset: Dataset, epochs: int, workers: list[int], seed: int = 0,
                    rounds: int = 1) -> dict[str, Any]:
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    cores = os.cpu_count() or 2
    config = bench_config(epochs, seed, cores)
    text_vectors = TextEncoder().encode(dataset.item_texts)
    samples = positions_per_epoch(Trainer(dataset, config, text_vectors=text_vectors)) * epochs
    passes = [_round(dataset, config, text_vectors, samples, workers, cores) for _ in range(rounds)]
    report: dict[str, Any] = {"dataset": dataset.name, "epochs": epochs, "positions_per_epoch": samples // epochs,
                              "cores": cores, "rounds": rounds}
    if rounds == 1:
        return report | passes[0]
    return report | summarise_rounds(passes) | {"per_round": passes}
