"""Query encoder: a causal self-attention transformer over the user's recent items.

SASRec/HSTU family: position t's output is the user vector after seeing items 0..t,
trained to score item t + 1 highest with sampled softmax. At serving time the last
position's output is the query vector of the `sequential` recall channel.

Two kinds of block, chosen by `ModelConfig.encoder`:
- "sasrec": pre-norm softmax attention and a GELU MLP over absolute position embeddings;
- "hstu": HSTU's pointwise aggregated attention (Zhai et al., 2024): one projection gives
  U, V, Q, K through SiLU; attention weights are SiLU(QKᵀ/√d + relative position bias),
  not a softmax, divided by the window length; the output is LayerNorm(AV) gated by U.
  The relative bias replaces absolute positions, so a history's vectors do not depend on
  how much padding precedes it. HSTU's time bias is left out: histories reach the encoder
  without their times.
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


class HSTUBlock(nn.Module):
    """Pointwise aggregated attention with SiLU gating and a relative position bias."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads, self.max_len = config.heads, config.max_len
        self.norm = nn.LayerNorm(config.dim)
        self.uvqk = nn.Linear(config.dim, 4 * config.dim)
        self.attention_norm = nn.LayerNorm(config.dim)
        self.out = nn.Linear(config.dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        # One learned bias per head and distance back (0 = the item itself).
        self.relative_bias = nn.Parameter(torch.zeros(config.heads, config.max_len))

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        B, T, C = x.shape
        H, c = self.heads, C // self.heads
        u, v, q, k = F.silu(self.uvqk(self.norm(x))).split(C, dim=-1)
        q, k, v = (t.view(B, T, H, c).transpose(1, 2) for t in (q, k, v))   # (B, H, T, c)
        rows = torch.arange(T, device=x.device)
        if last_only:
            q, u, rows = q[:, :, -1:], u[:, -1:], rows[-1:]
        distance = rows[:, None] - torch.arange(T, device=x.device)[None, :]  # (Tq, T), > 0 looks back
        allowed = (distance >= 0) & ~key_padding[:, None, None, :]          # (B, 1, Tq, T)
        bias = self.relative_bias[:, distance.clamp(0, self.max_len - 1)]    # (H, Tq, T)
        weights = F.silu(q @ k.transpose(-1, -2) / c**0.5 + bias) * allowed / self.max_len
        attended = (weights @ v).transpose(1, 2).reshape(B, len(rows), C)   # (B, Tq, C)
        y = self.out(self.attention_norm(attended) * u)
        return (x[:, -1:] if last_only else x) + self.dropout(y)


class QueryEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # HSTU blocks place items by their relative bias; SASRec blocks need absolute positions.
        self.position = nn.Embedding(config.max_len, config.dim) if config.encoder == "sasrec" else None
        self.dropout = nn.Dropout(config.dropout)
        block = Block if config.encoder == "sasrec" else HSTUBlock
        self.blocks = nn.ModuleList(block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, item_vectors: torch.Tensor, padding: torch.Tensor, normalize: bool = True,
                last_only: bool = False) -> torch.Tensor:
        """item_vectors: (B, T, dim) left-padded history, padding: (B, T) True where padded.

        Returns (B, T, dim) user vectors, one per position; unit length unless `normalize`
        is off (dot-product models such as the SASRec baseline). With `last_only`, (B, 1, dim):
        serving needs the latest position alone, and the last block then computes only it.
        """
        B, T, _ = item_vectors.shape
        x = item_vectors * self.config.dim**0.5                             # (B, T, dim)
        if self.position is not None:
            x = x + self.position(torch.arange(T, device=item_vectors.device))
        x = self.dropout(x) * ~padding.unsqueeze(-1)
        for n, block in enumerate(self.blocks):
            x = block(x, padding, last_only and n == len(self.blocks) - 1)
        x = self.norm(x)
        return F.normalize(x, dim=-1) if normalize else x
