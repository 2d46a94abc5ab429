"""`recfunnel bench train`: query-encoder training throughput, plain loop against Ray Train
with 1 and more workers, in one run on the same data, seed and number of epochs.

Throughput is training positions (next-item targets) per second of the encoder phase,
validation after each epoch included, as every path does it. The overhead of Ray Train is
1 - (1 worker's throughput / the plain loop's), both given all the machine's cores.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ranking.config import TrainConfig
from ranking.text_encoder import TextEncoder
from ranking.train import Trainer, training_windows
from recdata.dataset import Dataset


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
    """Positions per second over the epochs after the first: throughput once Ray's own
    actors have started (they compete with the first epoch for the cores)."""
    epochs = _epoch_seconds(curve)[1:]
    return round(positions * len(epochs) / sum(epochs), 1) if epochs else float("nan")


def run_train_bench(dataset: Dataset, epochs: int, workers: list[int], seed: int = 0) -> dict[str, Any]:
    import ray

    from cluster.train_ray import RayTrainConfig, train_on_ray

    cores = os.cpu_count() or 2
    # A fixed number of epochs: no early stop, no time budget, no ranker epochs.
    config = TrainConfig(epochs=epochs, patience=epochs, time_budget_s=1e9, ranker_epochs=0, seed=seed,
                         threads=cores)
    text_vectors = TextEncoder().encode(dataset.item_texts)
    plain = Trainer(dataset, config, text_vectors=text_vectors)
    samples = positions_per_epoch(plain) * epochs
    curve = plain.train_encoder()
    plain_s = _encoder_seconds(curve)
    report: dict[str, Any] = {"dataset": dataset.name, "epochs": epochs, "positions_per_epoch": samples // epochs,
                              "cores": cores,
                              "plain": {"seconds": round(plain_s, 2), "samples_per_s": round(samples / plain_s, 1),
                                        "samples_per_s_after_first_epoch": _after_first(curve, samples // epochs),
                                        "epoch_seconds": _epoch_seconds(curve),
                                        "valid_ndcg@10": round(curve[-1]["ndcg@10"], 4)}}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for count in workers:
            with tempfile.TemporaryDirectory() as folder:
                result = train_on_ray(dataset, config, Path(folder) / "bundle",
                                      RayTrainConfig(workers=count, storage=Path(folder) / "checkpoints",
                                                     cpus_per_worker=cores / count, name=f"bench-{count}"),
                                      text_vectors=text_vectors)
            seconds = _encoder_seconds(result.curve)
            report[f"ray_train_{count}"] = {
                "workers": count, "seconds": round(seconds, 2), "samples_per_s": round(samples / seconds, 1),
                "samples_per_s_after_first_epoch": _after_first(result.curve, samples // epochs),
                "epoch_seconds": _epoch_seconds(result.curve),
                "valid_ndcg@10": round([p for p in result.curve if p["stage"] == 0.0][-1]["ndcg@10"], 4)}
    finally:
        ray.shutdown()
    if "ray_train_1" in report:
        one, plain_run = report["ray_train_1"], report["plain"]
        report["overhead_1_worker"] = round(1 - one["samples_per_s"] / plain_run["samples_per_s"], 4)
        report["overhead_1_worker_after_first_epoch"] = round(
            1 - one["samples_per_s_after_first_epoch"] / plain_run["samples_per_s_after_first_epoch"], 4)
    if "ray_train_2" in report and "ray_train_1" in report:
        report["speedup_2_vs_1"] = round(report["ray_train_2"]["samples_per_s"]
                                         / report["ray_train_1"]["samples_per_s"], 3)
    return report

