"""Baselines trained in the same run as the funnel, so every gain is shown against them.

- popularity: items by training interactions, the same list for everyone.
- SASRec with its original recipe: ID embeddings only, causal self-attention, one
  sampled negative per position and binary cross-entropy, the paper's width and
  optimiser (Kang & McAuley, 2018).
- SASRec with sampled softmax (cross-entropy over the positive and shared uniform
  negatives; the whole catalogue where the sample would cover it): the stronger baseline
  the generative-recommender papers compare with.

Both train to convergence: early stopping on validation NDCG@10 with the funnel's patience,
and no time cap unless one is asked for; a run a cap stopped says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ranking.config import ModelConfig, TrainConfig
from ranking.devices import resolve_device
from ranking.evaluation import Evaluation
from ranking.inference import pad_left
from ranking.query_encoder import QueryEncoder
from ranking.scores import DenseScores
from ranking.train import CPU, seed_everything, stop_report, training_windows
from recdata.split import Split


def popularity_scorer(split: Split, num_items: int) -> Callable[[list[np.ndarray]], DenseScores]:
    counts = torch.from_numpy(np.bincount(np.concatenate(split.train), minlength=num_items).astype(np.float32))
    return lambda histories: DenseScores(lambda a, b: counts[a:b].expand(len(histories), -1).clone(),
                                         lambda items: counts[items], num_items, counts.device)


class SASRec(nn.Module):
    """ID embeddings + the causal encoder; scores are raw dot products, as in the paper."""

    def __init__(self, config: ModelConfig, num_items: int):
        super().__init__()
        # SASRec's blocks whatever the funnel's encoder is: the baseline is the paper's model.
        config = replace(config, encoder="sasrec")
        self.items = nn.Embedding(num_items + 1, config.dim, padding_idx=0)
        nn.init.normal_(self.items.weight, std=0.02)
        self.encoder = QueryEncoder(config)
        self.config = config

    def users(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, T) padded item rows -> (B, T, d) unnormalised user vectors."""
        return self.encoder(self.items(padded), padded == 0, normalize=False)


SASRecLoss = Literal["bce", "ce"]
BASELINE_EPOCHS = 400  # an upper bound only: patience ends a converging run long before it

# The paper's optimiser and width for the BCE recipe (Kang & McAuley, 2018, section IV-C):
# d = 50, Adam at 10^-3 with beta2 0.98. Dropout, length, batch and blocks come from `config`,
# which has the paper's values for MovieLens (0.2, 50, 128, 2). The CE baseline keeps the
# funnel's width and learning rate: it is the strong baseline, tuned as the funnel is.
PAPER_DIM, PAPER_LR, PAPER_BETAS = 50, 1e-3, (0.9, 0.98)


class SASRecTrainer:
    def __init__(self, split: Split, num_items: int, config: TrainConfig, valid: Evaluation,
                 loss: SASRecLoss = "bce", time_budget_s: float | None = None):
        """`config` gives the model, batch, learning rate, patience, epochs and negatives (for
        "ce"); its time budget is the funnel's and is not read: `time_budget_s` caps this run
        (None = no cap, the default). The BCE recipe takes the paper's width and optimiser."""
        seed_everything(config.seed)
        self.betas = (0.9, 0.999)  # Adam's own
        if loss == "bce":
            width = -(-PAPER_DIM // config.model.heads) * config.model.heads  # divisible by the heads
            config = replace(config, lr=PAPER_LR, model=replace(config.model, dim=width))
            self.betas = PAPER_BETAS
        self.split, self.num_items, self.config, self.valid = split, num_items, config, valid
        self.loss, self.time_budget_s = loss, time_budget_s
        self.device = resolve_device(config.device)
        self.model = SASRec(config.model, num_items).to(self.device)
        self.curve: list[dict[str, float]] = []
        self.stop: dict[str, Any] = {}

    @torch.no_grad()
    def scores(self, histories: list[np.ndarray]) -> DenseScores:
        self.model.eval()
        padded, _ = pad_left(histories, self.config.model.max_len)
        return DenseScores.inner_products(self.model.users(padded.to(self.device))[:, -1], self.model.items.weight)

    def _batch_loss(self, inputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        users = self.model.users(inputs)                                       # (B, T, d)
        valid = (targets != 0) & (inputs != 0)
        if self.loss == "bce":
            # Drawn from the CPU generator wherever the model is, so a run's draws do not
            # depend on the device.
            negatives = torch.randint(1, self.num_items + 1, tuple(targets.shape), generator=generator,
                                      device=CPU).to(self.device)
            positive = (users * self.model.items(targets)).sum(-1)
            negative = (users * self.model.items(negatives)).sum(-1)
            return F.binary_cross_entropy_with_logits(positive[valid], torch.ones_like(positive[valid])) + \
                F.binary_cross_entropy_with_logits(negative[valid], torch.zeros_like(negative[valid]))
        chosen, wanted = users[valid], targets[valid]                          # (N, d), (N,)
        if self.config.num_negatives >= self.num_items:  # the sample would be the catalogue: all of it
            logits = chosen @ self.model.items.weight[1:].T
            return F.cross_entropy(logits, wanted - 1)
        negatives = torch.randint(1, self.num_items + 1, (self.config.num_negatives,), generator=generator,
                                  device=CPU).to(self.device)
        positive = (chosen * self.model.items(wanted)).sum(-1, keepdim=True)  # (N, 1)
        negative = chosen @ self.model.items(negatives).T                      # (N, S)
        # A drawn negative that is the row's own target is no negative.
        negative = negative.masked_fill(negatives.unsqueeze(0) == wanted.unsqueeze(1), float("-inf"))
        logits = torch.cat([positive, negative], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=self.device))

    def train(self) -> float:
        """Train with early stopping on validation NDCG@10; returns the seconds it took. Why it
        stopped, after how many epochs, and whether a cap cut it while it still improved, is in
        `stop`; each epoch's validation figure is in `curve`."""
        cfg = self.config
        started = time.perf_counter()
        windows = torch.from_numpy(training_windows(self.split.train, cfg.model.max_len))
        optimiser = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=self.betas)
        generator = torch.Generator(device=CPU).manual_seed(cfg.seed)
        best, best_state, stale, epoch = -1.0, None, 0, 0
        budget = self.time_budget_s if self.time_budget_s is not None else float("inf")
        for epoch in range(1, cfg.epochs + 1):
            self.model.train()
            order = torch.randperm(len(windows), generator=generator, device=CPU)
            for start in range(0, len(windows), cfg.batch_size):
                batch = windows[order[start : start + cfg.batch_size]].to(self.device)
                loss = self._batch_loss(batch[:, :-1], batch[:, 1:], generator)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            ndcg = self.valid.full(self.scores)["ndcg@10"]
            self.curve.append({"epoch": float(epoch), "ndcg@10": ndcg, "seconds": time.perf_counter() - started})
            if ndcg > best:
                best, stale = ndcg, 0
                best_state = {k: v.clone() for k, v in self.model.state_dict().items()}
            else:
                stale += 1
            if stale >= cfg.patience or time.perf_counter() - started > budget:
                break
        seconds = time.perf_counter() - started
        self.stop = stop_report(f"SASRec-{self.loss.upper()}", self.curve, budget, seconds, epoch, cfg.epochs,
                                out_of_patience=stale >= cfg.patience)
        self.stop["capped"] = self.stop["reason"] == "time budget"
        self.stop["recipe"] = {"dim": cfg.model.dim, "lr": cfg.lr, "betas": list(self.betas),
                               "dropout": cfg.model.dropout, "max_len": cfg.model.max_len}
        self.stop["best_epoch"] = int(max(self.curve, key=lambda p: p["ndcg@10"])["epoch"]) if self.curve else 0
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return time.perf_counter() - started
