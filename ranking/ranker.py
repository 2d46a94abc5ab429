"""Ranker: scores recall candidates with target attention over the user's history.

Each candidate attends over the history (candidate = query, history = keys/values), so
the interest it is compared with is specific to it; the attention weights name the
history items behind the score ("because you liked X"). Recall-side features join in:
the two-tower and text similarities, which channels proposed the candidate, and its
popularity.
"""

from __future__ import annotations

import torch
from torch import nn

from ranking.config import ModelConfig

# Per-candidate side features, in this order: sequential score, semantic score,
# log popularity, known (has training interactions), follow share (how often the candidate
# came right after the user's last item in training), then one "proposed by" flag per
# recall channel.
NUM_SCORE_FEATURES = 5


class Ranker(nn.Module):
    def __init__(self, config: ModelConfig, num_channels: int):
        super().__init__()
        d = config.dim
        self.query = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.recency = nn.Embedding(config.max_len, d)  # lets attention prefer recent items
        features = 4 * d + NUM_SCORE_FEATURES + num_channels
        # Start as the two-tower score (the MLP's last layer at zero), so an untrained ranker
        # keeps recall's order and training only adds what it learns on top of it.
        last = nn.Linear(config.ranker_hidden, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(
            nn.Linear(features, config.ranker_hidden), nn.GELU(), nn.Dropout(config.dropout),
            nn.Linear(config.ranker_hidden, config.ranker_hidden), nn.GELU(),
            last,
        )
        self.base = nn.Parameter(torch.tensor(1.0 / config.temperature))

    def forward(
        self,
        history: torch.Tensor,    # (B, T, d) item vectors, left-padded
        padding: torch.Tensor,    # (B, T) True where padded
        user: torch.Tensor,       # (B, d) query-encoder user vector
        candidates: torch.Tensor, # (B, C, d) candidate item vectors
        features: torch.Tensor,   # (B, C, F) side features, see NUM_SCORE_FEATURES
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns scores (B, C) and attention weights over the history (B, C, T)."""
        T = history.shape[1]
        keys = self.key(history + self.recency(torch.arange(T, device=history.device)))  # (B, T, d)
        q = self.query(candidates)                                           # (B, C, d)
        logits = q @ keys.transpose(1, 2) / q.shape[-1] ** 0.5              # (B, C, T)
        logits = logits.masked_fill(padding.unsqueeze(1), float("-inf"))
        empty = padding.all(dim=1)  # users without history attend to nothing
        weights = torch.softmax(logits.masked_fill(empty[:, None, None], 0.0), dim=-1)
        weights = weights * ~empty[:, None, None]
        interest = weights @ self.value(history)                             # (B, C, d)
        u = user.unsqueeze(1).expand_as(candidates)                          # (B, C, d)
        x = torch.cat([candidates, interest, candidates * interest, candidates * u, features], dim=-1)
        two_tower = features[..., 0]  # cosine of user and candidate
        return self.base * two_tower + self.mlp(x).squeeze(-1), weights
