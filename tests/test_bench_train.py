"""The training bench's medians over rounds."""

from __future__ import annotations

import pytest

from bench.train import run_train_bench, summarise_rounds


def _round(plain: float, worker: float) -> dict:
    return {"plain": {"samples_per_s": plain, "epoch_seconds": [1.0], "valid_ndcg@10": 0.095},
            "ray_train_1": {"workers": 1, "samples_per_s": worker, "epoch_seconds": [1.2],
                            "valid_ndcg@10": 0.095},
            "overhead_1_worker": round(1 - worker / plain, 4)}


def test_rounds_report_the_median_of_each_rounds_own_overhead() -> None:
    # The machine slows down over the run: each round's pair is slower than the last.
    summary = summarise_rounds([_round(100.0, 90.0), _round(80.0, 76.0), _round(60.0, 45.0)])

    assert summary["overhead_1_worker"] == 0.1  # median of 0.10, 0.05, 0.25
    assert summary["plain"]["samples_per_s"] == 80.0 and summary["ray_train_1"]["samples_per_s"] == 76.0
    assert summary["ray_train_1"]["workers"] == 1 and "epoch_seconds" not in summary["plain"]


def test_the_training_bench_refuses_no_rounds() -> None:
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        run_train_bench(None, epochs=1, workers=[1], rounds=0)  # type: ignore[arg-type]
