"""Training of the query encoder and the ranker on one data set, written out as a bundle.

Phase 1 trains item + query encoder with sampled softmax (uniform and in-batch negatives,
logQ-corrected) and early stopping on validation NDCG@10 of recall. Phase 2 trains the
ranker listwise on the candidates the recall stage really returns (hard negatives).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ranking.config import TrainConfig
from ranking.inference import candidate_features, pad_left, semantic_queries
from ranking.item_encoder import ItemEncoder, tag_matrix
from ranking.query_encoder import QueryEncoder
from ranking.ranker import Ranker
from ranking.text_encoder import TextEncoder
from recdata.bundle import Bundle, new_version_id
from recdata.channels import CHANNELS, POPULAR, SEMANTIC, SEQUENTIAL
from recdata.dataset import Dataset
from recdata.metrics import ranking_metrics
from recdata.split import Split, leave_last_two

log = logging.getLogger(__name__)

NOT_FOUND_RANK = 1 << 30  # rank given to a target the funnel never proposed

Progress = Callable[[str, dict[str, float]], None]


@dataclass
class TrainResult:
    folder: Path
    version: str
    metrics: dict[str, Any]
    curve: list[dict[str, float]] = field(default_factory=list)  # per epoch: seconds, ndcg@10


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_windows(sequences: list[np.ndarray], max_len: int) -> np.ndarray:
    """(N, max_len + 1) left-padded windows (item index + 1) covering every position once."""
    windows = []
    for seq in sequences:
        rows = np.asarray(seq, dtype=np.int64) + 1
        for end in range(len(rows), 1, -max_len):
            chunk = rows[max(0, end - max_len - 1) : end]
            windows.append(np.pad(chunk, (max_len + 1 - len(chunk), 0)))
    return np.stack(windows) if windows else np.zeros((0, max_len + 1), np.int64)


class Funnel(torch.nn.Module):
    """The trainable models together: item encoder, query encoder and ranker."""

    def __init__(self, config: TrainConfig, text_vectors: np.ndarray, tag_index: np.ndarray,
                 num_tags: int):
        super().__init__()
        self.items = ItemEncoder(config.model, text_vectors, tag_index, num_tags)
        self.encoder = QueryEncoder(config.model)
        self.ranker = Ranker(config.model, num_channels=len(CHANNELS))

    def user_vectors(self, item_table: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """(B, T, d) user vectors for padded histories, given the (I + 1, d) input table."""
        return self.encoder(item_table[padded], padded == 0)


class Trainer:
    def __init__(self, dataset: Dataset, config: TrainConfig, text_encoder: TextEncoder | None = None,
                 progress: Progress | None = None):
        self.dataset = dataset
        self.config = config
        self.progress = progress or (lambda stage, values: None)
        seed_everything(config.seed)
        torch.set_num_threads(config.threads)
        self.split: Split = leave_last_two(dataset)
        self.text_encoder = text_encoder or TextEncoder()
        self.text_vectors = self.text_encoder.encode(dataset.item_texts)
        tags, self.tag_vocabulary = tag_matrix(dataset.item_tags)
        self.model = Funnel(config, self.text_vectors, tags, len(self.tag_vocabulary))
        counts = np.bincount(np.concatenate(self.split.train), minlength=dataset.num_items)
        self.popularity = counts.astype(np.float32)
        self.model.items.id_known[1:] = torch.from_numpy((counts > 0).astype(np.float32))
        self.log_q = torch.log(torch.from_numpy(counts + 1.0) / (counts.sum() + dataset.num_items))
        self.text_t = torch.from_numpy(self.text_vectors)
        self.log_pop_t = torch.from_numpy(np.log1p(self.popularity))
        self.started = time.perf_counter()

    # ---- phase 1: item + query encoder -------------------------------------------------
    def sampled_softmax_loss(self, users: torch.Tensor, targets: torch.Tensor,
                             items: torch.Tensor) -> torch.Tensor:
        """users (N, d), targets (N,) catalogue indexes, items (I, d) -> mean loss."""
        tau = self.config.model.temperature
        num_items = items.shape[0]
        if self.config.num_negatives >= num_items:  # the sample is the whole catalogue
            return F.cross_entropy(users @ items.T / tau, targets)
        positive = (users * items[targets]).sum(-1, keepdim=True) / tau          # (N, 1)
        uniform = torch.randint(num_items, (self.config.num_negatives,))
        uniform_logits = users @ items[uniform].T / tau                          # (N, S)
        uniform_logits -= math.log(self.config.num_negatives / num_items)
        uniform_logits = uniform_logits.masked_fill(uniform[None, :] == targets[:, None], -math.inf)
        # In-batch negatives: the batch's distinct targets, drawn in proportion to popularity,
        # hence the logQ correction; one column per distinct item keeps this (N, U) not (N, N).
        others = targets.unique()
        in_batch = users @ items[others].T / tau - (self.log_q[others] + math.log(len(targets)))
        in_batch = in_batch.masked_fill(others[None, :] == targets[:, None], -math.inf)  # (N, U)
        logits = torch.cat([positive, uniform_logits, in_batch], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long))

    def train_encoder(self) -> list[dict[str, float]]:
        cfg = self.config
        windows = torch.from_numpy(training_windows(self.split.train, cfg.model.max_len))
        params = list(self.model.items.parameters()) + list(self.model.encoder.parameters())
        optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        best, best_state, stale, curve = -1.0, None, 0, []
        generator = torch.Generator().manual_seed(cfg.seed)
        for epoch in range(cfg.epochs):
            self.model.train()
            order = torch.randperm(len(windows), generator=generator)
            total = 0.0
            for start in range(0, len(order), cfg.batch_size):
                batch = windows[order[start : start + cfg.batch_size]]
                inputs, targets = batch[:, :-1], batch[:, 1:]
                table = torch.cat([torch.zeros(1, cfg.model.dim), self.model.items.all_items()])
                users = self.model.user_vectors(table, inputs)                   # (B, T, d)
                valid = (targets != 0) & (inputs != 0)
                loss = self.sampled_softmax_loss(users[valid], targets[valid] - 1, table[1:])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += loss.item()
            metrics = self.evaluate_recall(validation=True)
            elapsed = time.perf_counter() - self.started
            curve.append({"epoch": epoch + 1, "seconds": elapsed, "ndcg@10": metrics["ndcg@10"]})
            self.progress("encoder", {"epoch": epoch + 1, "loss": total, **metrics})
            if metrics["ndcg@10"] > best:
                best, stale = metrics["ndcg@10"], 0
                best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            else:
                stale += 1
            if stale >= cfg.patience or elapsed > cfg.time_budget_s:
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return curve

    # ---- shared: exact recall over the whole catalogue -----------------------------------
    @torch.no_grad()
    def item_table(self) -> torch.Tensor:
        self.model.eval()
        return torch.cat([torch.zeros(1, self.config.model.dim), self.model.items.all_items()])

    @torch.no_grad()
    def queries(self, histories: list[np.ndarray], table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        padded, _ = pad_left(histories, self.config.model.max_len)
        users = self.model.user_vectors(table, padded)[:, -1]
        return users, torch.from_numpy(semantic_queries(self.text_vectors, histories))

    def recall(self, users: torch.Tensor, semantic: torch.Tensor, histories: list[np.ndarray],
               table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merged candidates of every channel as the serving funnel builds them.

        Returns candidates (B, C), their proposed-by flags (B, C, n_channels) and a (B, C)
        mask of real (non-padding) entries; seen items are never candidates.
        """
        budgets = dict(self.config.candidates_per_channel)
        seen = torch.zeros(len(histories), self.dataset.num_items, dtype=torch.bool)
        for b, h in enumerate(histories):
            seen[b, torch.from_numpy(np.asarray(h, dtype=np.int64))] = True
        per_channel = {
            SEQUENTIAL: users @ table[1:].T,
            SEMANTIC: semantic @ self.text_t.T,
            POPULAR: self.log_pop_t.expand(len(histories), -1).clone(),
        }
        found = []
        for channel in CHANNELS:
            k = min(budgets.get(channel, 0), self.dataset.num_items)
            scores = per_channel[channel].masked_fill(seen, -math.inf)
            found.append(scores.topk(k, dim=1).indices if k else torch.zeros(len(histories), 0, dtype=torch.long))
        width = sum(f.shape[1] for f in found)
        candidates = torch.zeros(len(histories), width, dtype=torch.long)
        flags = torch.zeros(len(histories), width, len(CHANNELS))
        mask = torch.zeros(len(histories), width, dtype=torch.bool)
        for b in range(len(histories)):
            slot: dict[int, int] = {}
            for c, items in enumerate(found):
                for item in items[b].tolist():
                    if item not in slot:
                        slot[item] = len(slot)
                        candidates[b, slot[item]] = item
                        mask[b, slot[item]] = True
                    flags[b, slot[item], c] = 1.0
        return candidates, flags, mask

    def evaluate_recall(self, validation: bool) -> dict[str, float]:
        return self.evaluate(validation, with_ranker=False)

    @torch.no_grad()
    def evaluate(self, validation: bool, with_ranker: bool, batch: int = 256) -> dict[str, float]:
        """Full-ranking metrics of recall alone (two-tower) or the whole funnel."""
        self.model.eval()
        table = self.item_table()
        split = self.split
        ranks: list[int] = []
        for start in range(0, len(split.users), batch):
            positions = range(start, min(start + batch, len(split.users)))
            histories = [split.valid_history(p) if validation else split.test_history(p) for p in positions]
            targets = torch.from_numpy(split.valid_targets[list(positions)] if validation
                                       else split.test_targets[list(positions)])
            users, semantic = self.queries(histories, table)
            if not with_ranker:
                scores = users @ table[1:].T
                for b, h in enumerate(histories):
                    scores[b, torch.from_numpy(np.asarray(h, dtype=np.int64))] = -math.inf
                    scores[b, targets[b]] = (users[b] * table[1 + targets[b]]).sum()
                target_scores = scores.gather(1, targets[:, None])
                ranks.extend(((scores >= target_scores).sum(1) - 1).tolist())
                continue
            scores, candidates, mask = self.funnel_scores(histories, users, semantic, table)
            for b in range(len(histories)):
                hit = (candidates[b] == targets[b]) & mask[b]
                if not hit.any():
                    ranks.append(NOT_FOUND_RANK)
                    continue
                target_score = scores[b][hit][0]
                ranks.append(int(((scores[b] >= target_score) & mask[b]).sum()) - 1)
        return ranking_metrics(ranks)

    def funnel_scores(self, histories: list[np.ndarray], users: torch.Tensor, semantic: torch.Tensor,
                      table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        candidates, flags, mask = self.recall(users, semantic, histories, table)
        padded, padding = pad_left(histories, self.config.model.max_len)
        features = candidate_features(users, semantic, table[1:], self.text_t, self.log_pop_t,
                                      candidates, flags)
        scores, _ = self.model.ranker(table[padded], padding, users, table[1 + candidates], features)
        return scores.masked_fill(~mask, -math.inf), candidates, mask

    # ---- phase 2: ranker ------------------------------------------------------------------
    def ranker_examples(self, table: torch.Tensor) -> list[tuple[np.ndarray, int]]:
        """(history, target) pairs from the most recent training positions of every user."""
        examples = []
        for seq in self.split.train:
            for end in range(max(1, len(seq) - self.config.ranker_positions), len(seq)):
                examples.append((seq[:end], int(seq[end])))
        return examples

    def train_ranker(self) -> list[dict[str, float]]:
        cfg = self.config
        table = self.item_table().detach()
        examples = self.ranker_examples(table)
        optimiser = torch.optim.AdamW(self.model.ranker.parameters(), lr=cfg.lr)
        rng = np.random.default_rng(cfg.seed)
        best = self.evaluate(validation=True, with_ranker=True)["ndcg@10"]
        best_state = {k: v.clone() for k, v in self.model.ranker.state_dict().items()}
        curve = []
        for epoch in range(cfg.ranker_epochs):
            order = rng.permutation(len(examples))
            total = 0.0
            for start in range(0, len(order), cfg.batch_size):
                chosen = [examples[i] for i in order[start : start + cfg.batch_size]]
                histories = [h for h, _ in chosen]
                targets = torch.tensor([t for _, t in chosen])
                with torch.no_grad():
                    users, semantic = self.queries(histories, table)
                self.model.ranker.train()
                scores, candidates, mask = self.funnel_scores(histories, users, semantic, table)
                hit = (candidates == targets[:, None]) & mask
                keep = hit.any(1)  # learn only where recall found the target
                if not keep.any():
                    continue
                loss = F.cross_entropy(scores[keep], hit[keep].float().argmax(1))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += loss.item()
            metrics = self.evaluate(validation=True, with_ranker=True)
            curve.append({"epoch": epoch + 1, "seconds": time.perf_counter() - self.started,
                          "ndcg@10": metrics["ndcg@10"]})
            self.progress("ranker", {"epoch": epoch + 1, "loss": total, **metrics})
            if metrics["ndcg@10"] > best:
                best = metrics["ndcg@10"]
                best_state = {k: v.clone() for k, v in self.model.ranker.state_dict().items()}
        self.model.ranker.load_state_dict(best_state)
        return curve

    # ---- export -----------------------------------------------------------------------------
    def export(self, folder: Path, metrics: dict[str, Any]) -> Bundle:
        table = self.item_table()
        state = self.model.state_dict()
        bundle = Bundle(
            version=new_version_id(self.dataset.name),
            item_ids=self.dataset.item_ids,
            item_texts=self.dataset.item_texts,
            arrays={
                SEQUENTIAL: table[1:].numpy().astype(np.float32),
                SEMANTIC: self.text_vectors,
                "popularity": self.popularity,
            },
            manifest={
                "dataset": self.dataset.name,
                "model": self.config.model.to_dict(),
                "text_model": str(self.text_encoder.model_dir.name),
                "tag_vocabulary": self.tag_vocabulary,
                "metrics": metrics,
                "created_unix": time.time(),
            },
        )
        weights = {
            name: {k.removeprefix(f"{prefix}."): v.numpy() for k, v in state.items() if k.startswith(f"{prefix}.")}
            for name, prefix in (("query_encoder", "encoder"), ("ranker", "ranker"), ("item_encoder", "items"))
        }
        bundle.save(folder, weights)
        return bundle


def train(dataset: Dataset, config: TrainConfig, out: Path, text_encoder: TextEncoder | None = None,
          progress: Progress | None = None) -> TrainResult:
    """Train every model of the funnel on `dataset` and write the bundle to `out`."""
    trainer = Trainer(dataset, config, text_encoder, progress)
    encoder_curve = trainer.train_encoder()
    ranker_curve = trainer.train_ranker()
    metrics = {
        "train_seconds": time.perf_counter() - trainer.started,
        "valid": {"recall": trainer.evaluate(True, False), "funnel": trainer.evaluate(True, True)},
        "test": {"recall": trainer.evaluate(False, False), "funnel": trainer.evaluate(False, True)},
    }
    bundle = trainer.export(out, metrics)
    log.info("bundle %s written to %s", bundle.version, out)
    return TrainResult(out, bundle.version, metrics, encoder_curve + ranker_curve)
