"""FAISS indexes over unit vectors (inner product = cosine), on GPU when FAISS sees one."""

from __future__ import annotations

import logging

import faiss
import numpy as np

from retrieval.config import IndexKind

log = logging.getLogger(__name__)


def gpu_count() -> int:
    """GPUs FAISS can use; 0 with the CPU build of FAISS."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def build_index(vectors: np.ndarray, ids: np.ndarray, kind: IndexKind = "auto",
                exact_below: int = 200_000, use_gpu: bool = True) -> faiss.IndexIDMap2:
    """An inner-product index over (N, d) float32 `vectors` labelled with int64 `ids`."""
    n, dim = vectors.shape
    if kind == "auto":
        kind = "flat" if n < exact_below else "hnsw"
    if kind == "flat":
        base: faiss.Index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efSearch = 128
    elif kind == "ivf":
        lists = max(1, int(4 * np.sqrt(max(n, 1))))
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        base.train(np.ascontiguousarray(vectors, dtype=np.float32))
        base.nprobe = max(1, lists // 8)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if use_gpu and kind == "flat" and gpu_count() > 0:
        # Exact search is what GPUs do best; graph indexes stay on the CPU.
        base = faiss.index_cpu_to_all_gpus(base)
        log.info("flat index of %d x %d moved to %d GPU(s)", n, dim, gpu_count())
    index = faiss.IndexIDMap2(base)
    if n:
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
    return index
