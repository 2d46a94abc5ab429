"""FAISS indexes over unit vectors (inner product = cosine), chosen by size, tuned for recall.

Exact search while a query scans at most `exact_scan_bytes` of vectors (items x dim x 4:
a 384-d text channel turns approximate at a sixth of the items a 64-d one does, since a
flat search's cost is that scan); beyond, IVF-Flat (or HNSW on request) with its
search breadth (nprobe / efSearch) raised step by step until recall@k against exact search
reaches the target on held-out queries; IVF-PQ when memory matters more than recall (very
large shards, or asked for). Every build returns an `IndexReport`: kind, parameters,
measured recall@k, build seconds and bytes, which shards report and bundles record.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from retrieval.config import EXACT_SCAN_BYTES, IndexKind

log = logging.getLogger(__name__)

TUNE_QUERIES = 256   # held-out queries the search breadth is tuned on
TUNE_K = 100         # recall@k the target refers to
PQ_MIN_ITEMS = 10_000


def gpu_count() -> int:
    """GPUs FAISS can use; 0 with the CPU build of FAISS."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


@dataclass
class IndexReport:
    kind: str
    items: int
    params: dict[str, Any] = field(default_factory=dict)
    recall_at_k: float = 1.0   # measured against exact search; 1.0 by definition for "flat"
    k: int = TUNE_K
    build_s: float = 0.0
    bytes: int = 0
    on_gpu: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_kind(n: int, dim: int, kind: IndexKind, exact_scan_bytes: int, pq_above: int) -> str:
    if kind != "auto":
        return kind
    if n * dim * 4 <= exact_scan_bytes:
        return "flat"
    return "ivf" if n < pq_above else "ivfpq"


def _base(kind: str, dim: int, n: int, train: np.ndarray) -> tuple[faiss.Index, dict[str, Any]]:
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = 80
        return graph, {"M": 32, "efConstruction": 80}
    index: faiss.Index
    # About 4 * sqrt(n) lists keeps both the coarse search and the scanned lists short.
    lists = int(min(max(1, 4 * np.sqrt(max(n, 1))), max(1, n // 39)))
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        params: dict[str, Any] = {"nlist": lists}
    elif kind == "ivfpq":
        # dim/2 sub-quantizers of 8 bits: 32 bytes per 64-d vector instead of 256.
        m = max(1, dim // 2)
        while dim % m:
            m -= 1
        index = faiss.IndexIVFPQ(quantizer, dim, lists, m, 8, faiss.METRIC_INNER_PRODUCT)
        params = {"nlist": lists, "pq_m": m, "pq_bits": 8}
    else:
        raise ValueError(f"unknown index kind {kind!r}; allowed: auto, flat, hnsw, ivf, ivfpq")
    index.train(train)
    return index, params


def _set_breadth(index: faiss.Index, kind: str, value: int) -> None:
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = value  # type: ignore[attr-defined]
    else:
        faiss.extract_index_ivf(index).nprobe = value


def _breadths(kind: str, index: faiss.Index) -> list[int]:
    if kind == "hnsw":
        return [64, 128, 256, 512, 1024, 2048]
    lists = faiss.extract_index_ivf(index).nlist
    steps = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    return [s for s in steps if s < lists] + [lists]


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top-k that the index also returned."""
    hits = [len(set(f[f >= 0].tolist()) & set(e[e >= 0].tolist())) / max((e >= 0).sum(), 1)
            for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits)) if hits else 1.0


def tune_queries(vectors: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Query-like vectors for tuning when no real queries are at hand: the normalised mean of
    a few random items plus noise, as a user vector mixes the items it came from."""
    rng = np.random.default_rng(seed)
    picks = vectors[rng.integers(0, len(vectors), (count, 3))].mean(1)
    picks += rng.normal(0, 0.1 / np.sqrt(vectors.shape[1]), picks.shape).astype(np.float32)
    return (picks / np.linalg.norm(picks, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def build_index(vectors: np.ndarray, ids: np.ndarray, kind: IndexKind = "auto",
                exact_scan_bytes: int = EXACT_SCAN_BYTES,
                use_gpu: bool = True, target_recall: float = 0.95, pq_above: int = 20_000_000,
                queries: np.ndarray | None = None, seed: int = 0, measure_bytes: bool = True
                ) -> tuple[faiss.IndexIDMap2, IndexReport]:
    """An inner-product index over (N, d) float32 `vectors` labelled with int64 `ids`.

    Approximate kinds are tuned: their search breadth is the smallest that reaches
    `target_recall` (recall@100 against exact search) on held-out `queries` (query-like
    mixes of the items when none are given); the report says what was reached. Its `bytes`
    come from serialising the index, a full copy: serving shards skip it (`measure_bytes`).
    """
    started = time.perf_counter()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    chosen = choose_kind(n, dim, kind, exact_scan_bytes, pq_above)
    if chosen != "flat" and n < 2 * TUNE_K:
        chosen = "flat"  # too few items for anything but exact search
    if chosen == "ivfpq" and n < PQ_MIN_ITEMS:
        chosen = "ivf"   # too few items to train 256-entry codebooks; nor is memory a concern
    rng = np.random.default_rng(seed)
    train = vectors[rng.choice(n, min(n, 256 * 1024), replace=False)] if chosen in ("ivf", "ivfpq") else vectors
    base, params = _base(chosen, dim, n, train)
    report = IndexReport(kind=chosen, items=n, params=params)
    index = faiss.IndexIDMap2(base)
    if n:
        index.add_with_ids(vectors, ids.astype(np.int64))
    if chosen != "flat":
        held_out = queries if queries is not None else tune_queries(vectors, TUNE_QUERIES, seed)
        exact = faiss.IndexFlatIP(dim)
        exact.add(vectors)
        k = min(TUNE_K, n)
        _, truth = exact.search(held_out, k)
        del exact
        reached = -1.0
        for breadth in _breadths(chosen, base):
            _set_breadth(base, chosen, breadth)
            _, found = base.search(held_out, k)
            report.recall_at_k = recall_at_k(found, truth)
            # Stop at the target, or where searching wider stops helping (PQ's quantisation
            # error caps IVF-PQ's recall below what exact vectors reach).
            if report.recall_at_k >= target_recall or report.recall_at_k - reached < 0.002:
                break
            reached = report.recall_at_k
        report.params["efSearch" if chosen == "hnsw" else "nprobe"] = breadth
        report.k = k
    report.bytes = int(faiss.serialize_index(index).nbytes) if n and measure_bytes else 0
    if use_gpu and chosen in ("flat", "ivf", "ivfpq") and gpu_count() > 0:
        index = _to_gpus(index)  # GPUs do exact and IVF scans best; HNSW graphs stay on the CPU
        report.on_gpu = True
        log.info("%s index of %d x %d moved to %d GPU(s)", chosen, n, dim, gpu_count())
    report.build_s = round(time.perf_counter() - started, 3)
    return index, report


def _to_gpus(index: faiss.IndexIDMap2) -> faiss.IndexIDMap2:
    """The same index with its vectors on every GPU and its id map kept on the host."""
    on_gpu = faiss.IndexIDMap2(faiss.index_cpu_to_all_gpus(index.index))
    faiss.copy_array_to_vector(faiss.vector_to_array(index.id_map), on_gpu.id_map)
    on_gpu.construct_rev_map()
    return on_gpu
