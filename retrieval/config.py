"""Configuration of one recall shard."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

IndexKind = Literal["auto", "flat", "hnsw", "ivf", "ivfpq"]

MAX_K = 10_000  # largest per-channel candidate count one Search may ask for
MAX_RECENT_ITEMS = 100  # history items one item2item query may name
# 8 MiB: an exact search of that many float32s takes about half a millisecond on one core
# (25,000 x 384 took 1.8 ms here), a budget a request can spend in every channel and shard.
EXACT_SCAN_BYTES = 8 << 20


@dataclass(frozen=True)
class RecallConfig:
    bundle: Path
    shard_id: int = 0
    num_shards: int = 1
    host: str = "127.0.0.1"
    port: int = 0                 # 0 = any free port
    index_kind: IndexKind = "auto"
    # "auto" searches exactly while a query scans at most this many bytes of a channel's
    # vectors (items x dim x 4): 32,768 items at 64 dimensions, 5,461 at 384.
    exact_scan_bytes: int = EXACT_SCAN_BYTES
    pq_above: int = 20_000_000    # "auto" compresses (IVF-PQ) from this many items per shard
    target_recall: float = 0.95   # recall@100 vs exact that approximate indexes are tuned to
    use_gpu: bool = True          # move indexes to a GPU when FAISS sees one
    search_threads: int = 2       # executor threads for FAISS calls, off the event loop
    # OpenMP threads inside one FAISS call while serving. A search of one query gains nothing
    # from more, and idle OpenMP workers spin for the CPU the other services need: with the
    # default (one per core) Recommend p99 at 100 rps was 113-170 ms against 23-28 ms with 1
    # (two shards, a ranker and a gateway as processes on 2 cores). Set once the first build
    # is done, in a process that is the shard alone (`python -m retrieval`, the Ray actor).
    omp_threads: int = 1
    # Shards up to this many items search on the serving thread: such a search takes well
    # under a millisecond, less than handing it to an executor thread and back.
    inline_search_max_items: int = 20_000
    internal_token: str | None = field(default=None, repr=False)  # required of callers when set

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"num_shards={self.num_shards} must be >= 1")
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id={self.shard_id} must be in 0..{self.num_shards - 1}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in 0..65535")
        if self.index_kind not in ("auto", "flat", "hnsw", "ivf", "ivfpq"):
            raise ValueError(f"index_kind={self.index_kind!r}; allowed: auto, flat, hnsw, ivf, ivfpq")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall={self.target_recall} must be in (0, 1]")
        if self.search_threads < 1:
            raise ValueError(f"search_threads={self.search_threads} must be >= 1")
