"""The serving-time model: one bundle's query encoder and ranker behind plain numpy calls.

`RankingModel` holds no gRPC: the Ranking servicer, the in-process pipeline and the
evaluation all call it. Training builds its features with the same helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ranking.config import ModelConfig
from ranking.query_encoder import QueryEncoder
from ranking.ranker import Ranker
from recdata.bundle import Bundle, load_bundle, load_weights
from recdata.channels import CHANNELS, SEMANTIC, SEQUENTIAL

SEMANTIC_RECENCY_DECAY = 0.9  # weight of the k-th most recent item's text is decay**k


def pad_left(histories: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (B, T) item rows (catalogue index + 1, 0 = padding) keeping each history's
    most recent `max_len` items, and the (B, T) padding mask."""
    T = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    rows = np.zeros((len(histories), T), dtype=np.int64)
    for b, history in enumerate(histories):
        recent = np.asarray(history[-T:], dtype=np.int64)
        if len(recent):
            rows[b, T - len(recent):] = recent + 1
    padded = torch.from_numpy(rows)
    return padded, padded == 0


def semantic_queries(text_vectors: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
    """(B, text_dim) recency-weighted mean of each history's text vectors, unit length."""
    out = np.zeros((len(histories), text_vectors.shape[1]), dtype=np.float32)
    for b, history in enumerate(histories):
        if len(history) == 0:
            continue
        weights = SEMANTIC_RECENCY_DECAY ** np.arange(len(history))[::-1]
        mean = weights @ text_vectors[np.asarray(history)]
        norm = np.linalg.norm(mean)
        out[b] = mean / norm if norm > 0 else mean
    return out


def candidate_features(
    user: torch.Tensor,        # (B, d) sequential query vectors
    semantic: torch.Tensor,    # (B, D_text) semantic query vectors
    item_vectors: torch.Tensor,  # (I, d)
    text_vectors: torch.Tensor,  # (I, D_text)
    log_popularity: torch.Tensor,  # (I,)
    candidates: torch.Tensor,  # (B, C) catalogue indexes (padding rows may hold 0)
    proposed_by: torch.Tensor, # (B, C, n_channels) 0/1 flags
) -> torch.Tensor:
    """(B, C, F) ranker side features in the order `ranker.NUM_SCORE_FEATURES` names."""
    seq_score = (item_vectors[candidates] * user.unsqueeze(1)).sum(-1)
    sem_score = (text_vectors[candidates] * semantic.unsqueeze(1)).sum(-1)
    pop = log_popularity[candidates]
    return torch.cat([torch.stack([seq_score, sem_score, pop], dim=-1), proposed_by], dim=-1)


@dataclass(frozen=True)
class RankedCandidates:
    scores: np.ndarray          # (C,) higher is better
    because: list[list[int]]    # per candidate, history positions that drove the score


class RankingModel:
    """Query encoder + ranker of one bundle, for inference on CPU or GPU."""

    def __init__(self, bundle: Bundle, query_encoder: QueryEncoder, ranker: Ranker,
                 device: torch.device):
        self.bundle = bundle
        self.version = bundle.version
        self.config = query_encoder.config
        self.device = device
        self.item_index = {item_id: n for n, item_id in enumerate(bundle.item_ids)}
        self.item_vectors = torch.from_numpy(bundle.arrays[SEQUENTIAL]).to(device)
        self.text_vectors_np = bundle.arrays[SEMANTIC]
        self.text_vectors = torch.from_numpy(self.text_vectors_np).to(device)
        self.log_popularity = torch.from_numpy(np.log1p(bundle.arrays["popularity"])).to(device)
        # Row 0 is padding for the encoder's input table.
        self.input_table = torch.cat([torch.zeros_like(self.item_vectors[:1]), self.item_vectors])
        self.query_encoder = query_encoder.to(device).eval()
        self.ranker = ranker.to(device).eval()

    @classmethod
    def load(cls, folder: Path, device: str | None = None) -> RankingModel:
        """Load a bundle folder; `device` defaults to CUDA when present, else CPU."""
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        bundle = load_bundle(folder)
        config = ModelConfig.from_dict(bundle.manifest["model"])
        encoder = QueryEncoder(config)
        encoder.load_state_dict({k: torch.from_numpy(v) for k, v in load_weights(folder, "query_encoder").items()})
        ranker = Ranker(config, num_channels=len(CHANNELS))
        ranker.load_state_dict({k: torch.from_numpy(v) for k, v in load_weights(folder, "ranker").items()})
        return cls(bundle, encoder, ranker, target)

    def indexes(self, item_ids: list[str]) -> np.ndarray:
        """Catalogue indexes of the ids this version knows, in order; unknown ids are skipped."""
        return np.asarray([self.item_index[i] for i in item_ids if i in self.item_index], dtype=np.int64)

    @torch.inference_mode()
    def encode(self, histories: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Per channel, (B, dim) query vectors; users without history get zero vectors."""
        padded, padding = pad_left(histories, self.config.max_len)
        padded, padding = padded.to(self.device), padding.to(self.device)
        users = self.query_encoder(self.input_table[padded], padding)[:, -1]  # (B, d)
        empty = torch.tensor([len(h) == 0 for h in histories], device=self.device)
        users = users.masked_fill(empty.unsqueeze(-1), 0.0)
        return {
            SEQUENTIAL: users.float().cpu().numpy(),
            SEMANTIC: semantic_queries(self.text_vectors_np, histories),
        }

    @torch.inference_mode()
    def rank(self, history: np.ndarray, candidates: np.ndarray,
             channels: list[set[str]]) -> RankedCandidates:
        """Score one user's candidates (catalogue indexes) proposed by the given channels."""
        if len(candidates) == 0:
            return RankedCandidates(np.zeros(0, np.float32), [])
        queries = self.encode([history])
        padded, padding = pad_left([history], self.config.max_len)
        padded, padding = padded.to(self.device), padding.to(self.device)
        cand = torch.from_numpy(candidates).to(self.device).unsqueeze(0)  # (1, C)
        flags = torch.tensor([[[float(c in chans) for c in CHANNELS] for chans in channels]],
                             device=self.device)  # (1, C, n_channels)
        user = torch.from_numpy(queries[SEQUENTIAL]).to(self.device)
        semantic = torch.from_numpy(queries[SEMANTIC]).to(self.device)
        features = candidate_features(user, semantic, self.item_vectors, self.text_vectors,
                                      self.log_popularity, cand, flags)
        scores, weights = self.ranker(self.input_table[padded], padding, user,
                                      self.item_vectors[cand], features)
        # Attention positions -> positions in the caller's history (left padding offset).
        offset = padded.shape[1] - min(len(history), padded.shape[1])
        start = len(history) - (padded.shape[1] - offset)
        order = weights[0].argsort(dim=-1, descending=True).cpu().numpy()  # (C, T)
        because = [[int(p - offset + start) for p in row if p >= offset] for row in order]
        return RankedCandidates(scores[0].float().cpu().numpy(), because)

    def popular(self, k: int) -> np.ndarray:
        """The k most popular catalogue indexes, most popular first."""
        return np.argsort(-self.bundle.arrays["popularity"], kind="stable")[:k]

