"""A batch of users' scores over the whole catalogue, read without ever holding (users × items).

Full ranking asks three things of a batch's scores: each target's score, how many items the
user has not seen score at least as high, and the top-k unseen items. `DenseScores` answers
them an item chunk at a time (recall's two-tower, the baselines: every item has a score);
`ProposedScores` answers them from the few items the funnel proposed (every other item scores
-inf). Either way a batch holds at most SCORES_PER_CHUNK scores at once, so memory is flat in
the catalogue's size while a batch keeps many users, and per-batch work such as the query
encoder's forward pass stays amortised over them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

# Scores one chunk holds: 4 MiB of float32, with a mask beside it. Chunks of 16 MiB left the
# allocator's arenas holding 2-3 GiB after a validation of a 50,000-item catalogue (freed
# blocks too scattered to give back); 4 MiB ones hold none.
SCORES_PER_CHUNK = 1 << 20

# (start, stop) -> a fresh (B, stop - start) tensor of the batch's scores of those items.
ChunkScores = Callable[[int, int], torch.Tensor]


def chunk_width(batch: int) -> int:
    """Items per chunk for a batch of `batch` users."""
    return max(1, SCORES_PER_CHUNK // max(batch, 1))


def item_chunks(num_items: int, batch: int):  # type: ignore[no-untyped-def]
    width = chunk_width(batch)
    for start in range(0, num_items, width):
        yield start, min(start + width, num_items)


class SeenItems:
    """The distinct items each user of a batch has interacted with, as (row, item) pairs sorted
    by item, so that the pairs inside any item chunk are one contiguous slice."""

    def __init__(self, histories: list[np.ndarray], device: torch.device | str | None = None):
        self.batch = len(histories)
        lengths = [len(h) for h in histories]
        items = (np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if sum(lengths)
                 else np.zeros(0, dtype=np.int64))
        rows = np.repeat(np.arange(self.batch, dtype=np.int64), lengths)
        self.keys = np.unique(items * max(self.batch, 1) + rows)  # sorted by item, then row
        self.items = self.keys // max(self.batch, 1)
        rows = self.keys % max(self.batch, 1)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.rows_t = torch.from_numpy(rows).to(self.device)
        self.items_t = torch.from_numpy(self.items).to(self.device)
        self.counts = torch.from_numpy(np.bincount(rows, minlength=self.batch)).to(self.device)

    def in_chunk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and chunk-relative columns of the seen items in [start, stop)."""
        low, high = np.searchsorted(self.items, [start, stop])
        return self.rows_t[low:high], self.items_t[low:high] - start

    def has(self, items: torch.Tensor) -> torch.Tensor:
        """(B, n) True where row b has seen items[b, j]."""
        rows = np.broadcast_to(np.arange(self.batch, dtype=np.int64)[:, None], tuple(items.shape))
        keys = items.cpu().numpy().astype(np.int64) * max(self.batch, 1) + rows
        return torch.from_numpy(np.isin(keys, self.keys)).to(items.device)

    def dense(self, num_items: int) -> torch.Tensor:
        """(B, num_items) True where seen: for small catalogues and checks."""
        mask = torch.zeros(self.batch, num_items, dtype=torch.bool, device=self.device)
        mask[self.rows_t, self.items_t] = True
        return mask


def seen_mask(histories: list[np.ndarray], num_items: int, device: torch.device | None = None) -> torch.Tensor:
    """(B, num_items) True where the user has interacted with the item."""
    return SeenItems(histories, device).dense(num_items)


class RunningTop:
    """The k best scores seen so far and their items, fed one item chunk at a time."""

    def __init__(self, k: int):
        self.k = k
        self.values: torch.Tensor | None = None
        self.items: torch.Tensor | None = None

    def add(self, scores: torch.Tensor, start: int) -> None:
        top = scores.topk(min(self.k, scores.shape[1]), dim=1)
        values, items = top.values, top.indices + start
        if self.values is not None and self.items is not None:
            values, items = torch.cat([self.values, values], 1), torch.cat([self.items, items], 1)
            best = values.topk(min(self.k, values.shape[1]), dim=1)
            values, items = best.values, items.gather(1, best.indices)
        self.values, self.items = values, items

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.values is not None and self.items is not None, "no chunk was added"
        return self.values, self.items


def top_unseen(chunk: ChunkScores, num_items: int, seen: SeenItems, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) best scores and their items among those each user has not seen."""
    best = RunningTop(k)
    for start, stop in item_chunks(num_items, seen.batch):
        scores = chunk(start, stop)
        rows, columns = seen.in_chunk(start, stop)
        scores[rows, columns] = -math.inf
        best.add(scores, start)
    return best.result()


class BatchScores(Protocol):
    device: torch.device

    def of(self, items: torch.Tensor) -> torch.Tensor:
        """(B, n) scores of the given (B, n) items."""
        ...

    def dense(self) -> torch.Tensor:
        """(B, num_items) every score at once: for small catalogues and checks."""
        ...

    def report(self, targets: torch.Tensor, seen: SeenItems, k: int) -> tuple[torch.Tensor, ...]:
        """Per row: how many unseen items other than the target score at least as high as it,
        whether the target's score is finite, and the top-k unseen items."""
        ...


class DenseScores:
    """Scores every item has, computed an item chunk at a time."""

    def __init__(self, chunk: ChunkScores, of: Callable[[torch.Tensor], torch.Tensor], num_items: int,
                 device: torch.device):
        self.chunk, self._of, self.num_items, self.device = chunk, of, num_items, device

    @classmethod
    def inner_products(cls, queries: torch.Tensor, table: torch.Tensor) -> DenseScores:
        """(B, d) query vectors against the rows of a (num_items + 1, d) table whose row 0 is
        padding: a two-tower model's scores."""
        return cls(lambda a, b: queries @ table[1 + a : 1 + b].T,
                   lambda items: (queries.unsqueeze(1) * table[1 + items]).sum(-1), table.shape[0] - 1, queries.device)

    @classmethod
    def of_matrix(cls, scores: torch.Tensor) -> DenseScores:
        """Scores already held as one (B, num_items) matrix: a small catalogue's."""
        return cls(lambda a, b: scores[:, a:b].clone(), lambda items: scores.gather(1, items),
                   scores.shape[1], scores.device)

    def of(self, items: torch.Tensor) -> torch.Tensor:
        return self._of(items.to(self.device)).float()

    def dense(self) -> torch.Tensor:
        return self.chunk(0, self.num_items).float()

    def report(self, targets: torch.Tensor, seen: SeenItems, k: int) -> tuple[torch.Tensor, ...]:
        targets = targets.to(self.device)
        target_scores = self.of(targets[:, None])                                 # (B, 1)
        above = torch.zeros(len(targets), dtype=torch.long, device=self.device)
        best = RunningTop(min(k, self.num_items))
        for start, stop in item_chunks(self.num_items, len(targets)):
            scores = self.chunk(start, stop).float()
            seen_here = seen.in_chunk(start, stop)
            excluded = torch.zeros_like(scores, dtype=torch.bool)
            excluded[seen_here] = True
            # The target never counts against itself, whether or not the user has seen it.
            inside = torch.nonzero((targets >= start) & (targets < stop))[:, 0]
            excluded[inside, targets[inside] - start] = True
            above += ((scores >= target_scores) & ~excluded).sum(1)
            scores[seen_here] = -math.inf  # in place: the list is of unseen items
            best.add(scores, start)
        return above, torch.isfinite(target_scores[:, 0]), best.result()[1]


class ProposedScores:
    """Scores of the (B, W) items the funnel proposed; every other item scores -inf.
    A repeated candidate carries -inf after its first occurrence."""

    def __init__(self, candidates: torch.Tensor, scores: torch.Tensor, num_items: int):
        self.candidates, self.scores, self.num_items = candidates, scores.float(), num_items
        self.device = scores.device

    def of(self, items: torch.Tensor) -> torch.Tensor:
        hit = items.to(self.device).unsqueeze(2) == self.candidates.unsqueeze(1)  # (B, n, W)
        return torch.where(hit, self.scores.unsqueeze(1), -math.inf).amax(2)

    def dense(self) -> torch.Tensor:
        full = torch.full((len(self.scores), self.num_items), -math.inf, device=self.device)
        return full.scatter_reduce(1, self.candidates, self.scores, reduce="amax")

    def report(self, targets: torch.Tensor, seen: SeenItems, k: int) -> tuple[torch.Tensor, ...]:
        targets = targets.to(self.device)
        target_scores = self.of(targets[:, None])                                 # (B, 1)
        counted = (torch.isfinite(self.scores) & (self.candidates != targets[:, None])
                   & ~seen.has(self.candidates))
        above = ((self.scores >= target_scores) & counted).sum(1)
        # A target the funnel never proposed ties, at -inf, with every unseen item: a miss.
        target_seen = seen.has(targets[:, None])[:, 0]
        unseen_others = self.num_items - seen.counts.to(self.device) - (~target_seen).long()
        found = torch.isfinite(target_scores[:, 0])
        ranks = torch.where(found, above, unseen_others)
        top = self.scores.topk(min(k, self.scores.shape[1]), dim=1).indices
        return ranks, found, self.candidates.gather(1, top)
