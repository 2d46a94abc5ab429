"""Figures the CLI writes: the training curve (NDCG@10 against wall-clock seconds)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

RECBOLE_SASREC_TEST_NDCG10 = 0.0636  # PEERS.md: RecBole 1.2.1 SASRec, 20 epochs, same split


def plot_training_curve(curve: list[dict[str, float]], path: Path, title: str) -> Path:
    """Validation and test NDCG@10 after every epoch of both phases, against seconds since start."""
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    for stage, name, marker in ((0.0, "query encoder (recall)", "o"), (1.0, "ranker (funnel)", "s")):
        points = [p for p in curve if p["stage"] == stage]
        if points:
            seconds = [p["seconds"] for p in points]
            if all("test_ndcg@10" in p for p in points):
                axis.plot(seconds, [p["test_ndcg@10"] for p in points], marker=marker, label=f"{name}, test")
            axis.plot(seconds, [p["ndcg@10"] for p in points], marker=marker, linestyle="--", alpha=0.6,
                      label=f"{name}, validation")
    axis.axhline(RECBOLE_SASREC_TEST_NDCG10, color="grey", linestyle=":",
                 label="RecBole SASRec test (35 min here)")
    axis.set_xlabel("wall-clock seconds on this machine")
    axis.set_ylabel("NDCG@10, full ranking")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
