"""Batched scoring of the funnel and the quality protocol of DESIGN.md.

`FunnelScorer` holds fixed item tables and the two models, and scores many users at
once: exact recall per channel, the merge the gateway does, and the ranker. Training
uses it for validation; `recfunnel evaluate` uses it on a saved bundle. `Evaluation`
turns any scorer into metrics under the full-ranking and sampled protocols.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ranking.config import ModelConfig
from ranking.devices import resolve_device
from ranking.inference import NEW_ITEM_SLOT_MIN_K, NextItems, candidate_features, pad_left, semantic_queries
from ranking.query_encoder import QueryEncoder
from ranking.ranker import Ranker
from ranking.scores import BatchScores, ChunkScores, DenseScores, ProposedScores, SeenItems, top_unseen
from recdata.bundle import load_bundle, load_weights
from recdata.channels import (
    CHANNELS,
    ITEM2ITEM,
    ITEM2ITEM_RECENT,
    POPULAR,
    SEMANTIC,
    SEQUENTIAL,
    popular_scores,
    recency_weights,
)
from recdata.metrics import ranking_metrics, sample_unseen
from recdata.split import Split

# histories -> the batch's scores of every item; -inf where a model never proposes the item.
FullScorer = Callable[[list[np.ndarray]], BatchScores]
# histories, (B, n) items -> (B, n) scores.
ItemScorer = Callable[[list[np.ndarray], torch.Tensor], torch.Tensor]
# (batches done, batches in all) of one evaluation.
BatchProgress = Callable[[int, int], None]


@dataclass
class FunnelScorer:
    encoder: QueryEncoder
    ranker: Ranker
    item_table: torch.Tensor       # (I + 1, d) encoder input and item vectors; row 0 = padding
    text_vectors: np.ndarray       # (I, D_text)
    log_popularity: torch.Tensor   # (I,)
    popular: torch.Tensor          # (I,) the popular channel's score (all-time and recent)
    neighbour_ids: torch.Tensor    # (I, M) item2item co-occurrence neighbours, -1 = none
    neighbour_scores: torch.Tensor # (I, M)
    next_items: NextItems          # each item's usual next items, for the ranker's follow share
    budgets: dict[str, int]        # candidates per recall channel
    # (I, d) text-and-tags-only item vectors: how cold items look. Set while training the
    # ranker, which sees some candidates this way so that it learns to rank cold items.
    cold_table: torch.Tensor | None = None
    new_item_slot: bool = True     # as the served Rank: see `inference.with_new_item_slot`
    list_length: int = 10          # the k of the served list the slot is kept in

    def __post_init__(self) -> None:
        # Everything computes where the item table lives (the trainer's device, or the CPU for
        # a bundle read from disk); histories and results cross over as numpy.
        self.device = self.item_table.device
        self.text_t = torch.from_numpy(self.text_vectors).to(self.device)
        self.log_popularity = self.log_popularity.to(self.device)
        self.popular = self.popular.to(self.device)
        self.neighbour_ids = self.neighbour_ids.to(self.device)
        self.neighbour_scores = self.neighbour_scores.to(self.device)
        self.next_items = self.next_items.to(self.device)
        self.max_len = self.encoder.config.max_len
        self.num_items = self.item_table.shape[0] - 1

    def _padded(self, histories: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        padded, padding = pad_left(histories, self.max_len)
        return padded.to(self.device), padding.to(self.device)

    @classmethod
    def from_bundle(cls, folder: Path, budgets: dict[str, int], device: str | None = None) -> FunnelScorer:
        """The bundle's funnel, scoring on `device` (default: CUDA where torch sees one)."""
        place = resolve_device(device)
        bundle = load_bundle(folder)
        config = ModelConfig.from_dict(bundle.manifest["model"])
        encoder, ranker = QueryEncoder(config), Ranker(config, num_channels=len(CHANNELS))
        encoder.load_state_dict({k: torch.from_numpy(v) for k, v in load_weights(folder, "query_encoder").items()})
        ranker.load_state_dict({k: torch.from_numpy(v) for k, v in load_weights(folder, "ranker").items()})
        vectors = torch.from_numpy(bundle.arrays[SEQUENTIAL])
        arrays = bundle.arrays
        # The item table's device is the one everything else follows (__post_init__).
        return cls(encoder.eval().to(place), ranker.eval().to(place),
                   torch.cat([torch.zeros_like(vectors[:1]), vectors]).to(place),
                   arrays[SEMANTIC], torch.from_numpy(np.log1p(arrays["popularity"])),
                   torch.from_numpy(popular_scores(arrays["popularity"], arrays["recent_popularity"],
                                                   bundle.manifest["recent_share"])),
                   torch.from_numpy(arrays["item2item_ids"].astype(np.int64)),
                   torch.from_numpy(arrays["item2item_scores"]),
                   NextItems(arrays["next_item_ids"], arrays["next_item_shares"], place), budgets)

    def queries(self, histories: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) user vectors and (B, D_text) semantic query vectors."""
        padded, padding = self._padded(histories)
        users = self.encoder(self.item_table[padded], padding, last_only=True)[:, -1]
        return users, torch.from_numpy(semantic_queries(self.text_vectors, histories)).to(self.device)

    def item2item(self, histories: list[np.ndarray]) -> ChunkScores:
        """Co-occurrence scores of the recent history items' neighbours, -inf for the rest,
        an item chunk at a time: the (B, R·M) neighbour entries sorted by item, so that a
        chunk's entries are one slice."""
        B, recent = len(histories), ITEM2ITEM_RECENT
        recent_rows = np.zeros((B, recent), dtype=np.int64)  # built on the host, sent in one copy
        recent_weights = np.zeros((B, recent), dtype=np.float32)
        for b, history in enumerate(histories):
            tail = np.asarray(history[-recent:], dtype=np.int64)
            if len(tail):
                recent_rows[b, recent - len(tail):] = tail
                recent_weights[b, recent - len(tail):] = recency_weights(len(tail))
        rows = torch.from_numpy(recent_rows).to(self.device)
        weights = torch.from_numpy(recent_weights).to(self.device)
        ids = self.neighbour_ids[rows].reshape(B, -1)                              # (B, R·M)
        contributions = (self.neighbour_scores[rows] * weights.unsqueeze(-1)).reshape(B, -1)
        users = torch.arange(B, device=self.device).unsqueeze(1).expand_as(ids)
        real = ids >= 0  # -1: no neighbour
        ids, order = ids[real].sort()
        users, contributions = users[real][order], contributions[real][order]
        bounds = ids.cpu().numpy()

        def chunk(start: int, stop: int) -> torch.Tensor:
            low, high = np.searchsorted(bounds, [start, stop])
            scores = torch.zeros(B, stop - start, device=self.device)
            scores.index_put_((users[low:high], ids[low:high] - start), contributions[low:high], accumulate=True)
            return scores.masked_fill(scores <= 0, -math.inf)

        return chunk

    def recall(self, histories: list[np.ndarray], users: torch.Tensor, semantic: torch.Tensor,
               seen: SeenItems) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every channel's top-k of unseen items, merged as the gateway merges them.

        Returns candidates (B, W), proposed-by flags (B, W, n_channels) and a (B, W) mask that
        keeps each item's first occurrence only, and only items a channel really proposed
        (item2item proposes fewer than k when the history has few neighbours).
        """
        def channel_scores(channel: str) -> ChunkScores:
            if channel == ITEM2ITEM:
                return self.item2item(histories)
            if channel == POPULAR:
                return lambda a, b: self.popular[a:b].expand(len(users), -1).clone()
            if channel == SEMANTIC:
                return lambda a, b: semantic @ self.text_t[a:b].T
            return DenseScores.inner_products(users, self.item_table).chunk

        found, proposed, channel_of = [], [], []
        for c, channel in enumerate(CHANNELS):
            k = min(self.budgets.get(channel, 0), self.num_items)
            if k:
                values, indices = top_unseen(channel_scores(channel), self.num_items, seen, k)
                found.append(indices)
                proposed.append(torch.isfinite(values))
                channel_of += [c] * k
        candidates = torch.cat(found, dim=1)                                     # (B, W)
        real = torch.cat(proposed, dim=1)                                        # (B, W)
        same = (candidates.unsqueeze(2) == candidates.unsqueeze(1)) & real.unsqueeze(1)  # (B, W, W)
        earlier = torch.ones(same.shape[1:], dtype=torch.bool, device=self.device).tril(-1)
        mask = real & ~(same & earlier).any(-1)                                  # first real occurrence
        onehot = torch.nn.functional.one_hot(torch.tensor(channel_of, device=self.device), len(CHANNELS)).float()
        flags = (same.float() @ onehot).clamp(max=1.0)                           # (B, W, n)
        return candidates, flags, mask

    def rank(self, histories: list[np.ndarray], users: torch.Tensor, semantic: torch.Tensor,
             items: torch.Tensor, flags: torch.Tensor, as_cold: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) ranker scores of the given items with their proposed-by flags; items where
        the (B, n) `as_cold` is True are shown as cold items (content vectors, no popularity)."""
        padded, padding = self._padded(histories)
        vectors = self.item_table[1 + items]
        log_popularity = self.log_popularity[items]
        follow_share = self.next_items.share_after(histories, items)
        if as_cold is not None and self.cold_table is not None:
            vectors = torch.where(as_cold.unsqueeze(-1), self.cold_table[items], vectors)
            log_popularity = log_popularity.masked_fill(as_cold, 0.0)
            follow_share = follow_share.masked_fill(as_cold, 0.0)  # nobody has taken a cold item yet
            # A cold item has no co-occurrences and no popularity: those channels never propose
            # it, so a candidate shown as cold must not carry their flags either.
            needs_history = torch.tensor([c in (ITEM2ITEM, POPULAR) for c in CHANNELS], device=self.device)
            flags = flags.masked_fill(as_cold.unsqueeze(-1) & needs_history, 0.0)
        features = candidate_features(users, semantic, vectors, self.text_t[items], log_popularity, follow_share,
                                      flags)
        scores, _ = self.ranker(self.item_table[padded], padding, users, vectors, features)
        return scores

    def funnel(self, histories: list[np.ndarray], excluded: list[np.ndarray] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ranker scores of the merged candidates: (B, W) scores (-inf off the mask), candidates,
        mask. Recall leaves out the history and, per user, the `excluded` items too."""
        users, semantic = self.queries(histories)
        left_out = histories if excluded is None else [np.concatenate([h, e]) for h, e in
                                                         zip(histories, excluded, strict=True)]
        candidates, flags, mask = self.recall(histories, users, semantic, SeenItems(left_out, self.device))
        scores = self.rank(histories, users, semantic, candidates, flags)
        return scores.masked_fill(~mask, -math.inf), candidates, mask

    # ---- scorers for the protocols ------------------------------------------------------------
    @torch.no_grad()
    def recall_scores(self, histories: list[np.ndarray]) -> DenseScores:
        users, _ = self.queries(histories)
        return DenseScores.inner_products(users, self.item_table)

    def with_new_item_slot(self, scores: torch.Tensor, candidates: torch.Tensor, mask: torch.Tensor
                           ) -> torch.Tensor:
        """Scores under which the top `list_length` are what the served Rank returns: where no
        new item (no training interactions) made the list, the best-scored new candidate is
        lifted just above the last place's score, so it takes that place."""
        k = min(self.list_length, scores.shape[1])
        is_new = (self.log_popularity[candidates] == 0) & mask & torch.isfinite(scores)
        if k < NEW_ITEM_SLOT_MIN_K or not is_new.any():
            return scores
        last = scores.topk(k, dim=1).values[:, -1]                               # (B,)
        listed = (is_new & (scores >= last.unsqueeze(1))).any(1)
        best_new_score, best_new = scores.masked_fill(~is_new, -math.inf).max(1)
        rows = torch.nonzero(~listed & torch.isfinite(best_new_score) & torch.isfinite(last))[:, 0]
        lifted = scores.clone()
        lifted[rows, best_new[rows]] = last[rows] + 1e-6 * (last[rows].abs() + 1)
        return lifted

    @torch.no_grad()
    def funnel_scores(self, histories: list[np.ndarray], excluded: list[np.ndarray] | None = None
                      ) -> ProposedScores:
        """Full-catalogue scores of the served path: ranker scores on recall's candidates,
        -inf for every item recall did not propose."""
        scores, candidates, mask = self.funnel(histories, excluded)
        if self.new_item_slot:
            scores = self.with_new_item_slot(scores, candidates, mask)
        return ProposedScores(candidates, scores, self.num_items)

    @torch.no_grad()
    def funnel_item_scores(self, histories: list[np.ndarray], items: torch.Tensor) -> torch.Tensor:
        """Ranker scores of arbitrary items, flagged with the channels that would propose them."""
        users, semantic = self.queries(histories)
        candidates, flags, mask = self.recall(histories, users, semantic, SeenItems(histories, self.device))
        items = items.to(self.device)
        hit = (items.unsqueeze(2) == candidates.unsqueeze(1)) & mask.unsqueeze(1)  # (B, n, W)
        item_flags = (hit.float() @ flags).clamp(max=1.0)                          # (B, n, channels)
        return self.rank(histories, users, semantic, items, item_flags)


# Users scored together: enough to amortise the query encoder's forward pass; the scores
# themselves are read an item chunk at a time (ranking/scores.py), so memory does not grow
# with the catalogue.
CASES_PER_BATCH = 256


def user_sample(num_users: int, most: int, seed: int) -> np.ndarray | None:
    """Positions of a fixed, seeded sample of `most` users, in order; None (all of them) when
    there are no more than that, or `most` is 0."""
    if most <= 0 or num_users <= most:
        return None
    return np.sort(np.random.default_rng(seed).choice(num_users, most, replace=False))


class Evaluation:
    """One set of cases (validation or test, optionally a subset) under both protocols."""

    def __init__(self, split: Split, num_items: int, validation: bool, positions: np.ndarray | None = None,
                 seed: int = 0, negatives: int = 100):
        chosen = np.arange(len(split.users)) if positions is None else positions
        self.num_items = num_items
        self.histories = [split.valid_history(int(p)) if validation else split.test_history(int(p)) for p in chosen]
        targets = split.valid_targets if validation else split.test_targets
        self.targets = torch.from_numpy(targets[chosen].astype(np.int64))
        # Validation picks epochs for weighted training, so its cases weigh as their events do;
        # test figures stay plain per-case means, comparable across models and data sets.
        self.weights = split.valid_weights[chosen] if validation and split.valid_weights is not None else None
        self.seed, self.negative_count = seed, negatives
        self._negatives: list[np.ndarray] | None = None

    @property
    def negatives(self) -> list[np.ndarray]:
        """Per case, the seeded sample of unseen items the sampled protocol ranks against."""
        if self._negatives is None:  # drawn on first use: full-ranking runs never need them
            rng = np.random.default_rng(self.seed)
            self._negatives = [
                sample_unseen(rng, self.num_items, np.asarray(h, dtype=np.int64), int(t), self.negative_count)
                for h, t in zip(self.histories, self.targets.tolist(), strict=True)]
        return self._negatives

    def __len__(self) -> int:
        return len(self.histories)

    def batches(self, size: int = CASES_PER_BATCH):  # type: ignore[no-untyped-def]
        """Slices of the cases, `size` at a time."""
        for start in range(0, len(self.histories), size):
            yield slice(start, min(start + size, len(self.histories)))

    @torch.no_grad()
    def full_report(self, scorer: FullScorer, k: int = 10, progress: BatchProgress | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per case: the target's 0-based rank among all items its user has not interacted
        with (ties count against the target, so an item a model never proposes is a miss),
        whether the model gave the target a finite score, and the model's top-k unseen items."""
        ranks, found, lists = [], [], []
        parts = list(self.batches())
        for done, part in enumerate(parts):
            if progress:
                progress(done, len(parts))
            histories = self.histories[part]
            scores = scorer(histories)  # on the scorer's device; only the results come back
            above, finite, top = scores.report(self.targets[part], SeenItems(histories, scores.device), k)
            ranks.append(above.cpu().numpy())
            found.append(finite.cpu().numpy())
            lists.append(top.cpu().numpy())
        if progress:
            progress(len(parts), len(parts))
        return np.concatenate(ranks), np.concatenate(found), np.concatenate(lists)

    def full_ranks(self, scorer: FullScorer, progress: BatchProgress | None = None) -> np.ndarray:
        return self.full_report(scorer, progress=progress)[0]

    @torch.no_grad()
    def sampled_ranks(self, scorer: ItemScorer) -> np.ndarray:
        """0-based rank of each target against its 100 sampled unseen items (all of them, where
        a small catalogue leaves a user fewer)."""
        ranks = []
        for part in self.batches():
            targets, negatives = self.targets[part].numpy(), self.negatives[part]
            # Rows padded with the target to one width; the padding is not counted.
            width = 1 + max(len(n) for n in negatives)
            items = np.repeat(targets[:, None], width, axis=1)
            counted = np.zeros((len(targets), width - 1), dtype=bool)
            for row, drawn in enumerate(negatives):
                items[row, 1: 1 + len(drawn)] = drawn
                counted[row, : len(drawn)] = True
            scores = scorer(self.histories[part], torch.from_numpy(items)).float().cpu()
            ranks.append(((scores[:, 1:] >= scores[:, :1]) & torch.from_numpy(counted)).sum(1).numpy())
        return np.concatenate(ranks)

    def full(self, scorer: FullScorer, progress: BatchProgress | None = None) -> dict[str, float]:
        return ranking_metrics(self.full_ranks(scorer, progress).tolist(), weights=self.weights)

    def sampled(self, scorer: ItemScorer) -> dict[str, float]:
        metrics = ranking_metrics(self.sampled_ranks(scorer).tolist(), ks=(10,))
        return {k: v for k, v in metrics.items() if not k.startswith("mrr")}


def items_from_full(scorer: FullScorer) -> ItemScorer:
    """An ItemScorer that reads a FullScorer's scores of the asked items."""
    def item_scores(histories: list[np.ndarray], items: torch.Tensor) -> torch.Tensor:
        return scorer(histories).of(items)

    return item_scores
