"""Item statistics the trainer writes into a bundle: co-occurrence neighbours and recent
popularity for the non-vector recall channels (item2item, popular), and each item's usual
next items for the ranker.

Plain numpy over the training sequences, so they cost seconds even at millions of
interactions and need no model.
"""

from __future__ import annotations

import numpy as np

COOCCURRENCE_WINDOW = 5    # items up to this many positions apart in a history co-occur
NEIGHBOURS = 50            # neighbours kept per item
RECENT_SHARE = 0.1         # "recent" = the latest tenth of the training interactions
PAIRS_PER_CHUNK = 1 << 22  # co-occurrences summed at a time: ~100 MB of temporaries
NEXT_ITEMS = 20            # next items kept per item


def cooccurrence_neighbours(sequences: list[np.ndarray], num_items: int, window: int = COOCCURRENCE_WINDOW,
                            neighbours: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """Each item's strongest co-occurring items: (I, M) int32 catalogue indexes (-1 = none)
    and (I, M) float32 scores, best first.

    Two items in one history `d` positions apart add 1/d to their pair, both ways. The sum is
    divided by sqrt(count_a * count_b), so a neighbour must co-occur more than its own
    popularity alone explains; otherwise the most popular items would be everyone's neighbours.
    """
    ids = np.full((num_items, neighbours), -1, dtype=np.int32)
    scores = np.zeros((num_items, neighbours), dtype=np.float32)
    pairs, weight = pair_weights(sequences, num_items, window)
    if not len(pairs):
        return ids, scores
    rows, cols = pairs // num_items, pairs % num_items
    counts = np.bincount(np.concatenate(sequences), minlength=num_items).astype(np.float64)
    strength = weight / np.sqrt(counts[rows] * counts[cols])
    order = np.lexsort((-strength, rows))          # by item, strongest first
    rows, cols, strength = rows[order], cols[order], strength[order]
    starts = np.searchsorted(rows, np.arange(num_items))
    rank = np.arange(len(rows)) - starts[rows]     # position within the item's own list
    top = rank < neighbours
    ids[rows[top], rank[top]] = cols[top]
    scores[rows[top], rank[top]] = strength[top]
    return ids, scores


def next_item_shares(sequences: list[np.ndarray], num_items: int, kept: int = NEXT_ITEMS
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Each item's most frequent next items in the histories: (I, N) int32 catalogue indexes
    (-1 = none), most frequent first, and (I, N) float32 shares, count(a then b) /
    (count(a followed by anything) + 1), the 1 so that a single sighting is not a certainty.

    Order within a history is what a sequel, the next episode or the usual second purchase
    leave behind; co-occurrence (both ways, within a window) blurs it. One sort of the
    consecutive pairs: time and memory follow the events (a few tens of bytes each while
    it runs), and the table the items.
    """
    ids = np.full((num_items, kept), -1, dtype=np.int32)
    shares = np.zeros((num_items, kept), dtype=np.float32)
    steps = [seq.astype(np.int64) for seq in sequences if len(seq) > 1]
    if not steps:
        return ids, shares
    before = np.concatenate([seq[:-1] for seq in steps])
    after = np.concatenate([seq[1:] for seq in steps])
    keep = before != after
    pairs, counts = np.unique(before[keep] * num_items + after[keep], return_counts=True)
    rows, cols = pairs // num_items, pairs % num_items
    outgoing = np.bincount(rows, weights=counts, minlength=num_items)
    order = np.lexsort((cols, -counts, rows))       # by item, most frequent first, ties by index
    rows, cols, counts = rows[order], cols[order], counts[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, np.arange(num_items))[rows]
    top = rank < kept
    ids[rows[top], rank[top]] = cols[top]
    shares[rows[top], rank[top]] = counts[top] / (outgoing[rows[top]] + 1.0)
    return ids, shares


def pair_weights(sequences: list[np.ndarray], num_items: int, window: int = COOCCURRENCE_WINDOW,
                 pairs_per_chunk: int = PAIRS_PER_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Every co-occurring (a, b) pair, both ways, as sorted keys a * num_items + b with their
    summed weights 1/distance: one pass over the sequences a chunk of users at a time. Each
    chunk's pairs are summed at once; the sums are merged like a log-structured tree (a run
    merges with the one below it when it has grown as large), so every pair is re-sorted
    O(log chunks) times. Memory follows the distinct pairs (a sparse matrix), not the events
    times the window, nor items squared."""
    runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys, sums), larger runs first
    chunk: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    size = 0

    def summed(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distinct, inverse = np.unique(keys, return_inverse=True)
        return distinct, np.bincount(inverse, weights=weights, minlength=len(distinct))

    def merge_last_two() -> None:
        (k1, s1), (k2, s2) = runs.pop(), runs.pop()
        runs.append(summed(np.concatenate([k2, k1]), np.concatenate([s2, s1])))

    def close_chunk() -> None:
        nonlocal chunk, size
        a, b, w = (np.concatenate(parts) for parts in zip(*chunk, strict=True))
        keep = a != b
        a, b, w = a[keep], b[keep], w[keep]
        runs.append(summed(np.concatenate([a * num_items + b, b * num_items + a]), np.concatenate([w, w])))
        chunk, size = [], 0
        while len(runs) > 1 and len(runs[-1][0]) >= len(runs[-2][0]):
            merge_last_two()

    for seq in sequences:
        for distance in range(1, min(window, len(seq) - 1) + 1):
            chunk.append((seq[:-distance].astype(np.int64), seq[distance:].astype(np.int64),
                          np.full(len(seq) - distance, 1.0 / distance)))
            size += len(seq) - distance
        if size >= pairs_per_chunk:
            close_chunk()
    if chunk:
        close_chunk()
    if not runs:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    while len(runs) > 1:
        merge_last_two()
    return runs[0]


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
