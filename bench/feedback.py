"""`recfunnel bench feedback`: what typed feedback is worth to training, on MovieLens-100K's
ratings.

Ratings at or below `dislike_at` (2: a sixth of ML-100K's) are dislikes. Four models train
with the same settings:

  * `all_positive`: every rating is a positive interaction (what a log without event types
    gives, and recfunnel's ML-100K figures elsewhere);
  * `dropped`: dislikes are left out altogether (what `dislikes` is without its negatives:
    the pair tells the negatives' effect from the history's loss);
  * `dislikes`: dislikes are never history, and are each user's extra training negatives;
  * `weighted`: as `dislikes`, each positive also weighs its rating (3, 4, 5).

All three are judged on the same cases: each user's last two positive ratings are the
validation and test targets, and every event after the validation target is left out of
training, so no variant sees what another must predict. Only a variant's own history differs:
`all_positive` reads the user's disliked films as history.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ranking.config import TrainConfig
from ranking.train import Trainer, fit
from recdata.dataset import Dataset
from recdata.split import MIN_SEQUENCE_FOR_EVAL

log = logging.getLogger(__name__)

VARIANTS = ("all_positive", "dropped", "dislikes", "weighted")


@dataclass(frozen=True)
class FeedbackBenchConfig:
    dislike_at: float = 2.0     # ratings <= this are dislikes
    seconds: float = 300.0      # encoder training budget of each variant
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.dislike_at < 5:
            raise ValueError(f"dislike_at={self.dislike_at} must be in 1..4 (ratings are 1..5)")
        if self.seconds <= 0:
            raise ValueError(f"seconds={self.seconds} must be > 0")


def rating_variants(dataset: Dataset, ratings: list[np.ndarray], dislike_at: float) -> dict[str, Dataset]:
    """The data sets of `VARIANTS`, with the same validation and test targets for every user."""
    variants: dict[str, dict[str, list[Any]]] = {name: {"sequences": [], "timestamps": [], "weights": [],
                                                        "negatives": []} for name in VARIANTS}
    times = dataset.timestamps or [np.arange(len(s), dtype=np.float64) for s in dataset.sequences]
    for seq, when, rated in zip(dataset.sequences, times, ratings, strict=True):
        liked = np.flatnonzero(rated > dislike_at)
        if len(liked) >= MIN_SEQUENCE_FOR_EVAL:
            # Held out: the last two positives; everything after the first of them is unseen.
            before, held = np.arange(liked[-2]), liked[-2:]
            everything = np.concatenate([before, held])
        else:  # too few positives to judge anyone on: their positives only train, in every variant
            before, held = np.arange(len(seq)), np.zeros(0, np.int64)
            everything = liked
        disliked = before[rated[before] <= dislike_at]
        kept_liked = before[rated[before] > dislike_at]
        liked_only = np.concatenate([kept_liked, held]) if len(held) else liked
        for name in VARIANTS:
            positions = everything if name == "all_positive" else liked_only
            parts = variants[name]
            parts["sequences"].append(seq[positions])
            parts["timestamps"].append(when[positions])
            parts["weights"].append(rated[positions] if name == "weighted" else np.ones(len(positions)))
            parts["negatives"].append(seq[disliked] if name in ("dislikes", "weighted") else np.zeros(0, np.int64))
    return {name: replace(dataset, name=f"{dataset.name}-{name}", sequences=parts["sequences"],
                          timestamps=parts["timestamps"] if dataset.timestamps is not None else None,
                          weights=parts["weights"] if name == "weighted" else None,
                          negatives=parts["negatives"])
            for name, parts in variants.items()}


def run_feedback_bench(dataset: Dataset, ratings: list[np.ndarray], config: FeedbackBenchConfig,
                       text_vectors: np.ndarray | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    variants = rating_variants(dataset, ratings, config.dislike_at)
    training = TrainConfig(time_budget_s=config.seconds, ranker_time_budget_s=config.seconds / 2, seed=config.seed)
    results: dict[str, Any] = {}
    for name, data in variants.items():
        trainer = Trainer(data, training, text_vectors=text_vectors)
        text_vectors = trainer.text_vectors  # one catalogue: encode its text once
        metrics, _ = fit(trainer)
        results[name] = {"test": metrics["test"], "valid": metrics["valid"], "stops": metrics["stops"],
                         "train_seconds": metrics["train_seconds"], "interactions": data.num_interactions,
                         "dislikes": int(sum(len(n) for n in data.negatives))}
        log.info("%s: funnel NDCG@10 %.4f, recall %.4f", name, metrics["test"]["funnel"]["ndcg@10"],
                 metrics["test"]["recall"]["ndcg@10"])
    plain = results["all_positive"]["test"]["funnel"]["ndcg@10"]
    cases = int(sum(len(s) >= MIN_SEQUENCE_FOR_EVAL for s in variants["dislikes"].sequences))
    return {"dataset": dataset.name, "dislike_at": config.dislike_at, "cases": cases,
            "variants": results,
            "funnel_ndcg@10_over_all_positive": {name: results[name]["test"]["funnel"]["ndcg@10"] / plain
                                                 for name in VARIANTS},
            # What the dislikes bring as negatives, beside leaving them out of history.
            "negatives_over_dropped": (results["dislikes"]["test"]["funnel"]["ndcg@10"]
                                       / results["dropped"]["test"]["funnel"]["ndcg@10"]),
            "weighted_over_unweighted": (results["weighted"]["test"]["funnel"]["ndcg@10"]
                                         / results["dislikes"]["test"]["funnel"]["ndcg@10"]),
            "seconds": time.perf_counter() - started}
