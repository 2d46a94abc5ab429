"""`recfunnel bench recall`: index kinds against exact search on a clustered synthetic catalogue.

Items are unit vectors drawn around topic centres whose sizes follow a power law, with
a spread that differs per topic, as trained item embeddings cluster by genre and
audience. Queries are what a query encoder produces: the normalised, recency-weighted
mean of a user's recent items from one to three topics, plus noise. Everything (exact
search, every index kind, the sharded merge) is measured in one run, one process, so the
ratios are free of machine drift.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from bench.harness import peak_rss_gib, percentiles_ms
from retrieval.index import build_index, recall_at_k

K = 100


@dataclass(frozen=True)
class RecallBenchConfig:
    items: int = 1_000_000
    dim: int = 64
    shards: int = 4
    kinds: tuple[str, ...] = ("hnsw", "ivf", "ivfpq")
    queries: int = 1000         # evaluation queries (tuning uses a separate set)
    single_seconds: float = 5.0  # time spent measuring one-query-per-call QPS per index
    topics: int = 0             # 0 = sqrt(items)
    target_recall: float = 0.95
    upserts: int = 20           # single-item upserts timed until searchable
    seed: int = 0


def clustered_catalogue(items: int, dim: int, topics: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(items, dim) unit vectors and each item's topic."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = 1.0 / np.arange(1, topics + 1) ** 0.8   # a few big topics, a long tail of small ones
    topic = rng.choice(topics, items, p=sizes / sizes.sum()).astype(np.int64)
    spread = rng.uniform(0.5, 1.2, topics).astype(np.float32)  # tight and loose topics
    vectors = np.empty((items, dim), dtype=np.float32)
    for start in range(0, items, 500_000):  # in chunks: the noise is the peak memory
        end = min(items, start + 500_000)
        noise = rng.normal(size=(end - start, dim)).astype(np.float32) / np.sqrt(dim)
        block = centres[topic[start:end]] + spread[topic[start:end], None] * noise
        vectors[start:end] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return vectors, topic


def user_queries(vectors: np.ndarray, topic: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Query-encoder-like vectors: recency-weighted means of 10 recent items from 1-3 topics."""
    rng = np.random.default_rng(seed)
    order = np.argsort(topic, kind="stable")
    bounds = np.searchsorted(topic[order], np.arange(topic.max() + 2))
    weights = 0.8 ** np.arange(10)[::-1]
    out = np.empty((count, vectors.shape[1]), dtype=np.float32)
    for q in range(count):
        interests = rng.choice(topic[rng.integers(0, len(topic), 3)], rng.integers(1, 4), replace=True)
        recent = []
        for t in rng.choice(interests, 10):
            members = order[bounds[t] : bounds[t + 1]]
            recent.append(members[rng.integers(len(members))])
        mean = weights @ vectors[recent] + rng.normal(0, 0.3 / np.sqrt(vectors.shape[1]), vectors.shape[1])
        out[q] = mean / np.linalg.norm(mean)
    return out


def qps_single(search: Callable[[np.ndarray], Any], queries: np.ndarray, seconds: float) -> float:
    """Queries per second sending one query per call, as a live request does."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        search(queries[done % len(queries)][None])
        done += 1
    return done / (time.perf_counter() - started)


def qps_batch(search: Callable[[np.ndarray], Any], queries: np.ndarray) -> float:
    started = time.perf_counter()
    search(queries)
    return len(queries) / (time.perf_counter() - started)


def run_recall_bench(config: RecallBenchConfig, progress: Callable[[str], None] = lambda _: None
                     ) -> dict[str, Any]:
    topics = config.topics or max(10, int(np.sqrt(config.items)))
    progress(f"catalogue: {config.items} x {config.dim}, {topics} topics")
    vectors, topic = clustered_catalogue(config.items, config.dim, topics, config.seed)
    ids = np.arange(config.items, dtype=np.int64)
    queries = user_queries(vectors, topic, config.queries, config.seed + 1)
    tuning = user_queries(vectors, topic, 256, config.seed + 2)
    report: dict[str, Any] = {"items": config.items, "dim": config.dim, "k": K, "topics": topics,
                              "faiss_threads": faiss.omp_get_max_threads(), "indexes": {}}

    progress("exact search")
    exact, exact_report = build_index(vectors, ids, "flat", use_gpu=True)
    truth_scores, truth = exact.search(queries, K)

    def single(index: faiss.Index) -> Callable[[np.ndarray], Any]:
        return lambda q: index.search(q, K)

    report["exact"] = {
        "qps_single": round(qps_single(single(exact), queries, config.single_seconds), 2),
        "qps_batch": round(qps_batch(single(exact), queries), 2),
        "build_s": exact_report.build_s, "bytes": exact_report.bytes, "on_gpu": exact_report.on_gpu,
    }

    for kind in config.kinds:
        progress(f"{kind}: build and tune for recall@{K} >= {config.target_recall}")
        index, built = build_index(vectors, ids, kind, use_gpu=True,  # type: ignore[arg-type]
                                   target_recall=config.target_recall, queries=tuning)
        _, found = index.search(queries, K)
        entry = {
            "recall_at_100": round(recall_at_k(found, truth), 4),
            "qps_single": round(qps_single(single(index), queries, config.single_seconds), 2),
            "qps_batch": round(qps_batch(single(index), queries), 2),
            "build_s": built.build_s, "bytes": built.bytes, "params": built.params,
            "tuned_recall_at_100": round(built.recall_at_k, 4), "on_gpu": built.on_gpu,
        }
        entry["speedup_vs_exact_single"] = round(entry["qps_single"] / report["exact"]["qps_single"], 2)
        if config.upserts:
            entry["upsert_to_searchable_ms"] = _upsert_latency(index, vectors, config.upserts, config.seed)
        report["indexes"][kind] = entry
        del index
        progress(f"{kind}: {entry}")

    progress(f"{config.shards} exact shards against one index")
    report["sharded"] = _sharded(vectors, ids, queries, truth, truth_scores, config,
                                 report["exact"]["qps_batch"], report["exact"]["qps_single"])
    report["peak_rss_gib"] = round(peak_rss_gib(), 3)
    return report


def _upsert_latency(index: faiss.Index, vectors: np.ndarray, count: int, seed: int) -> dict[str, float]:
    """Milliseconds from adding one new item until a search for it finds it, over `count` items."""
    rng = np.random.default_rng(seed + 3)
    times = []
    next_id = len(vectors) + 10_000_000
    for _ in range(count):
        noise = np.asarray(rng.normal(0, 0.05, vectors.shape[1]), dtype=np.float32)
        vector = vectors[rng.integers(len(vectors))] + noise
        vector = np.asarray(vector / np.linalg.norm(vector), dtype=np.float32)[None]
        started = time.perf_counter()
        index.add_with_ids(vector, np.asarray([next_id], dtype=np.int64))
        _, found = index.search(vector, K)
        times.append((time.perf_counter() - started) * 1000)
        assert next_id in found[0], "an upserted item must be found by a search for itself"
        next_id += 1
    spread = percentiles_ms(times, (50, 100))
    return {"p50_ms": spread["p50_ms"], "max_ms": spread["p100_ms"]}


def _sharded(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, truth: np.ndarray,
             truth_scores: np.ndarray, config: RecallBenchConfig, single_batch_qps: float,
             single_qps: float) -> dict[str, Any]:
    owner = ids % config.shards
    shards = [build_index(vectors[owner == s], ids[owner == s], "flat", use_gpu=True)[0] for s in range(config.shards)]
    pool = ThreadPoolExecutor(config.shards)  # one searcher per shard, as shard processes would be

    def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        answers = list(pool.map(lambda shard: shard.search(q, K), shards))
        scores = np.concatenate([a[0] for a in answers], axis=1)
        labels = np.concatenate([a[1] for a in answers], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :K]
        return np.take_along_axis(scores, best, 1), np.take_along_axis(labels, best, 1)

    merged_scores, merged = search(queries)
    # Equal up to ties: the same ids, or the same scores where two items tie at the cut.
    same_ids = bool(all(set(m) == set(t) for m, t in zip(merged, truth, strict=True)))
    same_scores = bool(np.allclose(merged_scores, truth_scores, atol=1e-5))
    qps = qps_single(search, queries, config.single_seconds)
    batch = qps_batch(search, queries)
    pool.shutdown()
    return {"shards": config.shards, "topk_equal_to_single": same_ids or same_scores, "same_ids": same_ids,
            "qps_single": round(qps, 2), "qps_ratio_vs_single": round(qps / single_qps, 3),
            "qps_batch": round(batch, 2), "batch_qps_ratio_vs_single": round(batch / single_batch_qps, 3)}
