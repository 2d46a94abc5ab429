"""Query encoder: a causal self-attention transformer over the user's recent items.

SASRec/HSTU family: position t's output is the user vector after seeing items 0..t,
trained to score item t + 1 highest with sampled softmax. At serving time the last
position's output is the query vector of the `sequential` recall channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ranking.config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.out = nn.Linear(config.dim, config.dim)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, T, C) outputs, or (B, 1, C) for the last position alone when `last_only`."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, c)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        # Left padding: a query may not attend to padded keys; keep the diagonal so
        # fully padded rows still have one finite entry.
        allowed = causal & ~key_padding[:, None, None, :]
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=x.device)
        if last_only:  # the last position sees every key: one query row instead of T
            q, allowed = q[:, :, -1:], allowed[:, :, -1:]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, q.shape[2], C))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.attention = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(nn.Linear(config.dim, 4 * config.dim), nn.GELU(),
                                 nn.Linear(4 * config.dim, config.dim), nn.Dropout(config.dropout))

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        attended = self.attention(self.norm1(x), key_padding, last_only)
        x = (x[:, -1:] if last_only else x) + attended
        return x + self.mlp(self.norm2(x))


class QueryEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.position = nn.Embedding(config.max_len, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, item_vectors: torch.Tensor, padding: torch.Tensor, normalize: bool = True,
                last_only: bool = False) -> torch.Tensor:
        """item_vectors: (B, T, dim) left-padded history, padding: (B, T) True where padded.

        Returns (B, T, dim) user vectors, one per position; unit length unless `normalize`
        is off (dot-product models such as the SASRec baseline). With `last_only`, (B, 1, dim):
        serving needs the latest position alone, and the last block then computes only it.
        """
        B, T, _ = item_vectors.shape
        positions = torch.arange(T, device=item_vectors.device)
        x = item_vectors * self.config.dim**0.5 + self.position(positions)  # (B, T, dim)
        x = self.dropout(x) * ~padding.unsqueeze(-1)
        for n, block in enumerate(self.blocks):
            x = block(x, padding, last_only and n == len(self.blocks) - 1)
        x = self.norm(x)
        return F.normalize(x, dim=-1) if normalize else x
