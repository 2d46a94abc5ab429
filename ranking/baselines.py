"""Baselines trained in the same run as the funnel, so every gain is shown against them.

- popularity: items by training interactions, the same list for everyone.
- SASRec with its original recipe: ID embeddings only, causal self-attention, one
  sampled negative per position and binary cross-entropy (Kang & McAuley, 2018).
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
from ranking.train import CPU, seed_everything, training_windows
from recdata.split import Split


def popularity_scorer(split: Split, num_items: int) -> Callable[[list[np.ndarray]], DenseScores]:
    counts = torch.from_numpy(np.bincount(np.concatenate(split.train), minlength=num_items).astype(np.float32))
    return lambda histories: DenseScores(lambda a, b: counts[a:b].expand(len(histories), -1).clone(),
                                         lambda items: counts[items], num_items, counts.device)


class SASRec(nn.Module):
    """ID embeddings + the causal encoder; scores are raw dot products, as in the paper."""

    def __init__(self, config: ModelConfig, num_items: int):
        super().__init__()
        self.items = nn.Embedding(num_items + 1, config.dim, padding_idx=0)
        nn.init.normal_(self.items.weight, std=0.02)
        self.encoder = QueryEncoder(config)
        self.config = config

    def users(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, T) padded item rows -> (B, T, d) unnormalised user vectors."""
        return self.encoder(self.items(padded), padded == 0, normalize=False)


class SASRecTrainer:
    def __init__(self, split: Split, num_items: int, config: TrainConfig, valid: Evaluation):
        seed_everything(config.seed)
        self.split, self.num_items, self.config, self.valid = split, num_items, config, valid
        self.device = resolve_device(config.device)
        self.model = SASRec(config.model, num_items).to(self.device)

    @torch.no_grad()
    def scores(self, histories: list[np.ndarray]) -> DenseScores:
        self.model.eval()
        padded, _ = pad_left(histories, self.config.model.max_len)
        return DenseScores.inner_products(self.model.users(padded.to(self.device))[:, -1], self.model.items.weight)

    def train(self) -> float:
        """Train with early stopping on validation NDCG@10; returns the seconds it took."""
        cfg = self.config
        started = time.perf_counter()
        windows = torch.from_numpy(training_windows(self.split.train, cfg.model.max_len))
        optimiser = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        generator = torch.Generator(device=CPU).manual_seed(cfg.seed)
        best, best_state, stale = -1.0, None, 0
        for _ in range(cfg.epochs):
            self.model.train()
            order = torch.randperm(len(windows), generator=generator, device=CPU)
            for start in range(0, len(windows), cfg.batch_size):
                batch = windows[order[start : start + cfg.batch_size]].to(self.device)
                inputs, targets = batch[:, :-1], batch[:, 1:]
                users = self.model.users(inputs)                                   # (B, T, d)
                # Drawn from the CPU generator wherever the model is, so a run's draws do not
                # depend on the device.
                negatives = torch.randint(1, self.num_items + 1, tuple(targets.shape), generator=generator,
                                          device=CPU).to(self.device)
                positive = (users * self.model.items(targets)).sum(-1)
                negative = (users * self.model.items(negatives)).sum(-1)
                valid = (targets != 0) & (inputs != 0)
                loss = F.binary_cross_entropy_with_logits(positive[valid], torch.ones_like(positive[valid])) + \
                    F.binary_cross_entropy_with_logits(negative[valid], torch.zeros_like(negative[valid]))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            ndcg = self.valid.full(self.scores)["ndcg@10"]
            if ndcg > best:
                best, stale = ndcg, 0
                best_state = {k: v.clone() for k, v in self.model.state_dict().items()}
            else:
                stale += 1
            if stale >= cfg.patience or time.perf_counter() - started > cfg.time_budget_s:
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return time.perf_counter() - started
