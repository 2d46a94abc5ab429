"""Item encoder: item_vec = norm(E_id[i] + W · LM(text_i) + Σ E_tag + Σ_v W_v · unit(x_v,i)).

Index 0 is padding everywhere; catalogue item i is row i + 1. The LM text vectors, tag
lists and named precomputed vectors x_v (an image model's, say) are fixed inputs
(buffers); only the ID/tag embeddings and the projections W, W_v are learned. An item
without some input has zeros there, which project to nothing: an item with only an image
vector is still encoded from that.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ranking.config import ModelConfig
from recdata.vectors import unit_rows


class ItemEncoder(nn.Module):
    text_vectors: torch.Tensor  # (I + 1, text_dim) LM vectors, row 0 = padding
    tag_index: torch.Tensor     # (I + 1, max_tags) tag ids, 0 = none
    id_known: torch.Tensor      # (I + 1,) 1 where the ID embedding was trained

    def __init__(self, config: ModelConfig, text_vectors: np.ndarray, tag_index: np.ndarray,
                 num_tags: int, vectors: Mapping[str, np.ndarray] | None = None,
                 vector_dims: Mapping[str, int] | None = None):
        """`vectors`: name -> (I, d) precomputed item vectors to fuse; `vector_dims`: name -> d
        where only `fuse` will be called with given vectors (a serving model encoding new
        items), so the catalogue's own need not be held."""
        super().__init__()
        num_items, text_dim = text_vectors.shape
        self.config = config
        # Sparse gradients: a step updates the rows it read (see `ranking.optim.LazyAdamW`).
        self.id_embedding = nn.Embedding(num_items + 1, config.dim, padding_idx=0, sparse=True)
        nn.init.normal_(self.id_embedding.weight, std=0.02)
        self.text_projection = nn.Linear(text_dim, config.dim, bias=False)
        self.tag_embedding = nn.Embedding(num_tags + 1, config.dim, padding_idx=0)
        nn.init.normal_(self.tag_embedding.weight, std=0.02)
        padded_text = np.vstack([np.zeros((1, text_dim), np.float32), text_vectors])
        padded_tags = np.vstack([np.zeros((1, tag_index.shape[1]), np.int64), tag_index])
        self.register_buffer("text_vectors", torch.from_numpy(padded_text), persistent=False)
        self.register_buffer("tag_index", torch.from_numpy(padded_tags), persistent=False)
        # 1 for items whose ID embedding was trained; cold items rely on text and tags only.
        self.register_buffer("id_known", torch.ones(num_items + 1), persistent=False)
        dims = dict(vector_dims or {}) | {name: v.shape[1] for name, v in (vectors or {}).items()}
        self.vector_names = sorted(dims)
        self.held_vectors = sorted(vectors or {})  # the names whose catalogue vectors are buffers here
        self.vector_projections = nn.ModuleDict(
            {name: nn.Linear(dims[name], config.dim, bias=False) for name in self.vector_names})
        for name, table in (vectors or {}).items():
            padded = np.vstack([np.zeros((1, table.shape[1]), np.float32), unit_rows(table)])
            self.register_buffer(f"vectors_{name}", torch.from_numpy(padded), persistent=False)

    def vectors_of(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """items: (...,) padded indexes -> name -> (..., d) their precomputed vectors."""
        return {name: getattr(self, f"vectors_{name}")[items] for name in self.held_vectors}

    def fuse(self, id_part: torch.Tensor, text: torch.Tensor, tags: torch.Tensor,
             vectors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(..., dim) ID part, (..., text_dim) LM vectors, (..., max_tags) tag ids and name ->
        (..., d) unit precomputed vectors (a name left out: the items lack it) -> unit vectors."""
        fused = id_part + self.text_projection(text) + self.tag_embedding(tags).sum(-2)
        for name, vector in (vectors or {}).items():
            fused = fused + self.vector_projections[name](vector)
        return F.normalize(fused, dim=-1)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items: (...,) padded indexes -> (..., dim) unit vectors (zeros for padding)."""
        id_part = self.id_embedding(items) * self.id_known[items].unsqueeze(-1)
        if self.training and self.config.id_dropout > 0:
            keep = torch.rand(items.shape, device=items.device) >= self.config.id_dropout
            id_part = id_part * keep.unsqueeze(-1)
        vectors = self.fuse(id_part, self.text_vectors[items], self.tag_index[items], self.vectors_of(items))
        return vectors * (items != 0).unsqueeze(-1)

    def content_of(self, items: torch.Tensor) -> torch.Tensor:
        """items: (N,) padded indexes -> (N, dim) vectors from content alone (text, tags and
        precomputed vectors), as a cold item is encoded (zeros for padding)."""
        text, tags = self.text_vectors[items], self.tag_index[items]
        vectors = self.fuse(torch.zeros(len(items), self.config.dim, device=text.device), text, tags,
                            self.vectors_of(items))
        return vectors * (items != 0).unsqueeze(-1)

    def content_only(self) -> torch.Tensor:
        """(num_items, dim) content vectors of the whole catalogue, unpadded order."""
        return self.content_of(torch.arange(1, self.text_vectors.shape[0], device=self.text_vectors.device))

    def all_items(self) -> torch.Tensor:
        """(num_items, dim) vectors of the whole catalogue, unpadded order."""
        return self.forward(torch.arange(1, self.text_vectors.shape[0], device=self.text_vectors.device))


MAX_TAGS = 8  # tags per item the encoder reads; more are ignored


def tag_matrix(item_tags: list[tuple[str, ...]], max_tags: int = MAX_TAGS) -> tuple[np.ndarray, list[str]]:
    """(num_items, max_tags) tag indexes (0 = none, tag t -> t + 1) and the tag vocabulary."""
    vocabulary = sorted({t for tags in item_tags for t in tags})
    return tag_rows(item_tags, vocabulary, max_tags), vocabulary


def tag_rows(item_tags: list[tuple[str, ...]], vocabulary: list[str], max_tags: int = MAX_TAGS) -> np.ndarray:
    """(num_items, max_tags) tag indexes against a fixed vocabulary; unknown tags are skipped."""
    lookup = {t: n + 1 for n, t in enumerate(vocabulary)}
    matrix = np.zeros((len(item_tags), max_tags), dtype=np.int64)
    for row, tags in enumerate(item_tags):
        ids = [lookup[t] for t in tags if t in lookup][:max_tags]
        matrix[row, : len(ids)] = ids
    return matrix
