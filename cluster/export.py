"""`recfunnel export`: every listed user's top-k, scored in parallel with Ray Data, to one
Parquet file.

Each Ray Data actor holds the bundle's batched funnel (`ranking.evaluation.FunnelScorer`, the
served path's recall, merge, ranking and new-item place over a batch of users at once) and its
own connection to the event store; a batch of user ids becomes their histories and hidden items
read from the log, as Recommend reads them, then their lists. The answers are the ones
Recommend gives for the same history with the bundle's candidate budgets and no filter (a test
holds them equal). Cost grows with users (one history read and one row of scoring each) and,
for the scoring, with the catalogue as exact recall does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recdata.feedback import EVERY_TYPE_POSITIVE, EventTypes

ROWS_SCHEMA = (("user_id", "string"), ("rank", "int32"), ("item_id", "string"), ("score", "float32"))


@dataclass(frozen=True)
class ExportConfig:
    bundle: Path
    store: str                 # the event store: a SQLite path or a postgresql:// URL
    out: Path
    k: int = 100
    batch_size: int = 256      # users scored together
    actors: int = 2            # Ray Data actors, each with the models loaded once
    history_length: int = 200  # as the gateway reads
    device: str | None = None  # default: CUDA where torch sees one
    feedback: EventTypes = EVERY_TYPE_POSITIVE  # as the gateways read history and hidden items (`[feedback]`)


def all_users(store_location: str, chunk: int = 1_000_000) -> list[str]:
    """Every user the log holds an event of, in order of first appearance."""
    from gateway.events import open_event_store

    store = open_event_store(store_location)
    try:
        seen: dict[str, None] = {}
        last = store.last_seq()
        for start in range(0, last, chunk):  # bounded memory: the log is read a chunk at a time
            for event in store.events_between(start, min(start + chunk, last)):
                seen.setdefault(event.user_id, None)
        return list(seen)
    finally:
        store.close()


class BatchRecommender:
    """A Ray Data callable class: a batch of user ids -> their top-k rows."""

    def __init__(self, bundle: str, store: str, k: int, history_length: int, device: str | None,
                 feedback: EventTypes = EVERY_TYPE_POSITIVE):
        import torch

        from gateway.events import open_event_store
        from ranking.evaluation import FunnelScorer
        from recdata.bundle import ITEMS, read_manifest

        torch.set_num_threads(1)  # one core an actor: the actors are the parallelism
        manifest = read_manifest(Path(bundle))
        self.budgets = dict(manifest["candidates_per_channel"])
        self.scorer = FunnelScorer.from_bundle(Path(bundle), self.budgets, device)
        self.scorer.list_length = k
        self.item_ids = json.loads((Path(bundle) / ITEMS).read_text("utf-8"))["item_ids"]
        self.index = {item_id: n for n, item_id in enumerate(self.item_ids)}
        # Once an actor, not once a user without history: the catalogue by the popular score.
        self.by_popularity = np.argsort(-self.scorer.popular.cpu().numpy(), kind="stable")
        self.store = open_event_store(store)
        self.k, self.history_length, self.feedback = k, history_length, feedback

    def rows(self, ids: list[str]) -> np.ndarray:
        return np.asarray([self.index[i] for i in ids if i in self.index], dtype=np.int64)

    def popular(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A user without history as the funnel serves one: the popular channel's top
        max(budget, k) unhidden items, the first k with the recall-order score (n - rank) / n."""
        order = self.by_popularity[~np.isin(self.by_popularity, hidden)][: max(self.budgets.get("popular", 0), self.k)]
        n = len(order)
        return order[: self.k], (n - np.arange(min(n, self.k))) / max(n, 1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        users = [str(u) for u in batch["user_id"]]
        histories = [self.rows(self.store.recent_items(u, self.history_length, self.feedback)) for u in users]
        hidden = [self.rows(self.store.hidden_items(u, self.feedback)) for u in users]
        known = [b for b, h in enumerate(histories) if len(h)]
        lists: dict[int, tuple[np.ndarray, np.ndarray]] = {b: self.popular(hidden[b]) for b in range(len(users))
                                                           if not len(histories[b])}
        if known:
            with torch.no_grad():
                proposed = self.scorer.funnel_scores([histories[b] for b in known], [hidden[b] for b in known])
                scores, places = proposed.scores.topk(min(self.k, proposed.scores.shape[1]), dim=1)
                items = proposed.candidates.gather(1, places)
            for row, b in enumerate(known):
                kept = torch.isfinite(scores[row])  # fewer candidates than k: the rest are -inf
                lists[b] = items[row][kept].cpu().numpy(), scores[row][kept].cpu().numpy()
        out: dict[str, list[Any]] = {"user_id": [], "rank": [], "item_id": [], "score": []}
        for b, user in enumerate(users):
            for rank, (item, score) in enumerate(zip(*lists[b], strict=True), 1):
                out["user_id"].append(user)
                out["rank"].append(rank)
                out["item_id"].append(self.item_ids[int(item)])
                out["score"].append(float(score))
        return {"user_id": np.asarray(out["user_id"], dtype=object), "rank": np.asarray(out["rank"], np.int32),
                "item_id": np.asarray(out["item_id"], dtype=object), "score": np.asarray(out["score"], np.float32)}


def export(config: ExportConfig, users: list[str], progress: Callable[[int, int], None] = lambda d, t: None
           ) -> dict[str, Any]:
    """Score `users` on the Ray the caller connected to and write `config.out`; what was done."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    started = time.perf_counter()
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in ROWS_SCHEMA])
    dataset = ray.data.from_items([{"user_id": u} for u in users]).map_batches(
        BatchRecommender, batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=1,
        batch_format="numpy",
        fn_constructor_kwargs={"bundle": str(config.bundle), "store": config.store, "k": config.k,
                               "history_length": config.history_length, "device": config.device,
                               "feedback": config.feedback})
    rows = scored_users = first_block_users = 0
    first_rows_at: float | None = None
    config.out.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(config.out, schema) as writer:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            assert isinstance(batch, pa.Table)  # as batch_format asks
            first_rows_at = first_rows_at or time.perf_counter()
            writer.write_table(batch.cast(schema))
            rows += batch.num_rows
            block_users = len(set(batch.column("user_id").to_pylist()))
            first_block_users = first_block_users or block_users
            scored_users += block_users
            progress(min(scored_users, len(users)), len(users))
    ended = time.perf_counter()
    seconds = ended - started
    # Once the first rows are out the actors are up: the users after them, over the time after
    # them, is what the scoring sustains without the start (loading the models, Ray's workers).
    after_start = ended - (first_rows_at or ended)
    return {"users": len(users), "rows": rows, "k": config.k, "out": str(config.out), "seconds": round(seconds, 2),
            "users_per_s": round(len(users) / seconds, 1) if seconds else None,
            "seconds_to_first_rows": round((first_rows_at or ended) - started, 2),
            "users_per_s_after_start": round((scored_users - first_block_users) / after_start, 1)
            if after_start > 0 else None}


def user_lines(path: Path) -> Iterator[str]:
    for line in path.read_text("utf-8").splitlines():
        if line.strip():
            yield line.strip()
