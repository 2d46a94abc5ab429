"""Item statistics the trainer writes into a bundle for the non-vector recall channels:
co-occurrence neighbours (item2item) and recent popularity (popular).

Plain numpy over the training sequences, so they cost seconds even at millions of
interactions and need no model.
"""

from __future__ import annotations

import numpy as np

COOCCURRENCE_WINDOW = 5    # items up to this many positions apart in a history co-occur
NEIGHBOURS = 50            # neighbours kept per item
RECENT_SHARE = 0.1         # "recent" = the latest tenth of the training interactions


def cooccurrence_neighbours(sequences: list[np.ndarray], num_items: int, window: int = COOCCURRENCE_WINDOW,
                            neighbours: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """Each item's strongest co-occurring items: (I, M) int32 catalogue indexes (-1 = none)
    and (I, M) float32 scores, best first.

    Two items in one history `d` positions apart add 1/d to their pair, both ways. The sum is
    divided by sqrt(count_a * count_b), so a neighbour must co-occur more than its own
    popularity alone explains; otherwise the most popular items would be everyone's neighbours.
    """
    firsts, seconds, weights = [], [], []
    for distance in range(1, window + 1):
        for seq in sequences:
            if len(seq) > distance:
                firsts.append(seq[:-distance])
                seconds.append(seq[distance:])
                weights.append(np.full(len(seq) - distance, 1.0 / distance))
    ids = np.full((num_items, neighbours), -1, dtype=np.int32)
    scores = np.zeros((num_items, neighbours), dtype=np.float32)
    if not firsts:
        return ids, scores
    a, b, w = np.concatenate(firsts), np.concatenate(seconds), np.concatenate(weights)
    a, b, w = np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([w, w])
    keep = a != b
    pairs, inverse = np.unique(a[keep] * num_items + b[keep], return_inverse=True)
    rows, cols = pairs // num_items, pairs % num_items
    counts = np.bincount(np.concatenate(sequences), minlength=num_items).astype(np.float64)
    strength = np.bincount(inverse, weights=w[keep]) / np.sqrt(counts[rows] * counts[cols])
    order = np.lexsort((-strength, rows))          # by item, strongest first
    rows, cols, strength = rows[order], cols[order], strength[order]
    starts = np.searchsorted(rows, np.arange(num_items))
    rank = np.arange(len(rows)) - starts[rows]     # position within the item's own list
    top = rank < neighbours
    ids[rows[top], rank[top]] = cols[top]
    scores[rows[top], rank[top]] = strength[top]
    return ids, scores


def recent_popularity(sequences: list[np.ndarray], num_items: int, timestamps: list[np.ndarray] | None,
                      share: float = RECENT_SHARE) -> np.ndarray:
    """(I,) interactions per item among the latest `share` of all interactions.

    With timestamps that is a global time cut. Without them (pairs files) there is no global
    clock, so each user's latest `share` of their own history stands in for it.
    """
    if not sequences or not any(len(s) for s in sequences):
        return np.zeros(num_items, np.float32)
    if timestamps is not None:
        times = np.concatenate([t[: len(s)] for s, t in zip(sequences, timestamps, strict=True)])
        cut = np.quantile(times, 1 - share)
        recent = np.concatenate(sequences)[times >= cut]
    else:
        recent = np.concatenate([s[int(np.floor(len(s) * (1 - share))):] for s in sequences])
    return np.bincount(recent, minlength=num_items).astype(np.float32)
