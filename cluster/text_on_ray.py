"""Item text vectors on Ray: a catalogue too large to encode in one process is a Ray Dataset
of texts, embedded by a pool of language-model actors (`map_batches`), one per CPU or GPU the
cluster lends, on every node. The vectors land in the driver's `TextEncoder` caches as they
come, so the disk cache keeps whatever finished if the run stops halfway.

Encoding costs one forward of the language model per distinct text, so it grows linearly with
the items and divides by the number of actors; on Ray each actor loads the model once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ranking.text_encoder import Embedder, TextEncoder

# Fewer texts than this are encoded in the driver: starting the actors (each loads the
# model) costs more than they would save.
RAY_TEXTS_AT_LEAST = 20_000
TEXTS_PER_TASK = 1024  # texts per Ray Data batch: a few seconds of one actor's work on a CPU


class EmbedTexts:
    """One actor of the pool: the language model, loaded once, applied to batch after batch."""

    def __init__(self, model_dir: str, max_tokens: int, batch_size: int, device: str | None):
        self.encoder = TextEncoder(Path(model_dir), batch_size=batch_size, max_tokens=max_tokens, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        vectors = np.concatenate([v for _, v in self.encoder.local_batches(texts)]) if texts else \
            np.zeros((0, self.encoder.dim), np.float32)
        return {"position": batch["position"], "vector": vectors}


def ray_embedder(encoder: TextEncoder, actors: int, use_gpu: bool = False) -> Embedder:
    """An `Embedder` running `actors` copies of `encoder`'s model on the connected Ray cluster
    (each with one GPU when `use_gpu`, else one CPU)."""
    if actors < 1:
        raise ValueError(f"actors={actors} must be at least 1")

    def embed(texts: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        import pyarrow as pa
        import ray.data

        if not texts:
            return
        # The texts go into the object store once, a block per task's worth.
        blocks = [pa.table({"position": np.arange(start, min(start + TEXTS_PER_TASK, len(texts))),
                            "text": texts[start : start + TEXTS_PER_TASK]})
                  for start in range(0, len(texts), TEXTS_PER_TASK)]
        vectors = ray.data.from_arrow(blocks).map_batches(
            EmbedTexts, batch_size=TEXTS_PER_TASK, batch_format="numpy", concurrency=actors,
            fn_constructor_kwargs={"model_dir": str(encoder.model_dir), "max_tokens": encoder.max_tokens,
                                   "batch_size": encoder.batch_size, "device": "cuda" if use_gpu else "cpu"},
            num_gpus=1 if use_gpu else 0, num_cpus=1)
        for batch in vectors.iter_batches(batch_size=None, batch_format="numpy"):
            yield batch["position"], batch["vector"]

    return embed


def encode_texts(texts: list[str], encoder: TextEncoder, actors: int, use_gpu: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """`encoder.encode(texts)`, on a pool of Ray actors when enough texts are missing from its
    caches to repay starting them."""
    missing = len(encoder.missing(texts))
    embedder = ray_embedder(encoder, actors, use_gpu) if missing >= RAY_TEXTS_AT_LEAST else None
    return encoder.encode(texts, progress=progress, embedder=embedder)
