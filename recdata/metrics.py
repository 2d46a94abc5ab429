"""Top-k ranking metrics under the full-ranking and sampled protocols."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def target_rank(scores: np.ndarray, target: int, seen: Iterable[int]) -> int:
    """0-based rank of `target` among all items, not counting `seen` items.

    `scores` is (num_items,). Ties count against the target (pessimistic), so a constant
    scorer cannot look good. The target itself is never excluded even if it was seen.
    """
    scores = np.asarray(scores, dtype=np.float64)
    mask = np.zeros(len(scores), dtype=bool)
    seen_idx = np.fromiter(seen, dtype=np.int64)
    mask[seen_idx] = True
    mask[target] = False
    target_score = scores[target]
    better_or_tied = (scores >= target_score) & ~mask
    return int(better_or_tied.sum()) - 1  # the target ties with itself


def sampled_rank(scores: np.ndarray, target: int, negatives: np.ndarray) -> int:
    """0-based rank of `target` against sampled `negatives` only (ties count against it)."""
    return int((scores[negatives] >= scores[target]).sum())


def sample_unseen(
    rng: np.random.Generator, num_items: int, seen: np.ndarray, target: int, count: int = 100
) -> np.ndarray:
    """`count` distinct items, uniformly from those neither seen nor the target."""
    allowed = np.ones(num_items, dtype=bool)
    allowed[seen] = False
    allowed[target] = False
    pool = np.flatnonzero(allowed)
    return rng.choice(pool, size=min(count, len(pool)), replace=False)


def ranking_metrics(ranks: Iterable[int], ks: tuple[int, ...] = (10, 20),
                    weights: np.ndarray | None = None) -> dict[str, float]:
    """HR@k, NDCG@k and MRR@k averaged over cases, from each case's 0-based target rank;
    with `weights` (one > 0 per case), a weighted mean."""
    r = np.asarray(list(ranks), dtype=np.float64)
    if r.size == 0:
        raise ValueError("no evaluation cases")
    if weights is not None and len(weights) != len(r):
        raise ValueError(f"{len(weights)} weights for {len(r)} cases")
    out: dict[str, float] = {}
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = float(np.average(hit, weights=weights))
        out[f"ndcg@{k}"] = float(np.average(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0), weights=weights))
        out[f"mrr@{k}"] = float(np.average(np.where(hit, 1.0 / (r + 1.0), 0.0), weights=weights))
    return out
