"""`recfunnel bench loop`: one feedback-loop round on the embedded cluster, under load.

The feedback introduces a new taste: new users pair a few rarely consumed items of one
genre (tag) with popular items of another. The round fine-tunes on it with Ray Train,
judges and swaps; meanwhile open-loop Recommend traffic runs against the gateway. It
reports how long the round took, its verdict, the requests that failed during it, and how
many of the taste's items users of the other genre, who sent nothing, get in their top 10
before and after.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import start_local_ray
from gateway.client import RecommenderClient
from recdata.dataset import Dataset
from recdata.sources import DataSource


@dataclass(frozen=True)
class Taste:
    items: list[int]      # rarely consumed items of one tag
    partners: list[int]   # popular items of another tag, which the fans pair them with
    probes: list[int]     # users of that other tag who never consumed the taste's items
    tags: tuple[str, str]


def new_taste(data: Dataset, size: int = 6, partners: int = 15, probes: int = 100, probe_recent: int = 3,
              tags: tuple[str, str] | None = None) -> Taste:
    """The taste in tag A, paired with tag B (by default the two most common first tags of
    the catalogue); probes are users with at least `probe_recent` of their last 5 items in B."""
    first = [item_tags[0] if item_tags else "" for item_tags in data.item_tags]
    tag_a, tag_b = tags or [t for t, _ in Counter(t for t in first if t).most_common(2)]
    counts = np.bincount(np.concatenate(data.sequences), minlength=data.num_items)
    consumed = [int(i) for i in np.argsort(counts, kind="stable") if counts[i] > 0]
    items = [i for i in consumed if first[i] == tag_a][:size]
    paired = [i for i in reversed(consumed) if first[i] == tag_b][:partners]
    is_b = np.array([t == tag_b for t in first])
    chosen = [u for u, seq in enumerate(data.sequences)
              if is_b[seq[-5:]].sum() >= probe_recent and not set(seq.tolist()) & set(items)][:probes]
    return Taste(items, paired, chosen, (tag_a, tag_b))


def fan_events(data: Dataset, taste: Taste, fans: int, seed: int = 1) -> list[tuple[str, str, str, float]]:
    """Each fan takes the taste's items in an order of its own, each after a partner item."""
    rng = np.random.default_rng(seed)
    events = []
    for n in range(fans):
        for item in rng.permutation(taste.items):
            events += [(f"fan-{n}", data.item_ids[int(rng.choice(taste.partners))], "click", 1.0),
                       (f"fan-{n}", data.item_ids[int(item)], "click", 1.0)]
    return events


async def taste_in_lists(address: str, data: Dataset, taste: Taste) -> tuple[float, float]:
    """Mean number of the taste's items in the probes' top 10, and the share of degraded answers."""
    client = RecommenderClient(address, timeout=10)
    try:
        taste_ids = {data.item_ids[i] for i in taste.items}
        replies = [await client.recommend(data.user_ids[u], k=10) for u in taste.probes]
    finally:
        await client.close()
    counts = [len(taste_ids & {i.item_id for i in r.items}) for r in replies]
    return float(np.mean(counts)), float(np.mean([r.degraded for r in replies]))


def run_loop_bench(bundle: Path, source: DataSource, fans: int, qps: float, workdir: Path, seed: int = 0
                   ) -> dict[str, Any]:
    """Start the embedded cluster on `bundle` (trained on `source`), feed the new taste and
    time one round under `qps` of Recommend traffic."""
    import ray

    from bench.harness import LoadResult
    from bench.loadtest import LoadTest, Mix, run_load
    from cluster.config import ClusterConfig
    from cluster.controller import NAMESPACE
    from cluster.demo import fresh_event_log
    from cluster.launch import start_cluster
    from cluster.loop import LOOP_NAME, LoopConfig

    dataset = source.load()
    workdir.mkdir(parents=True, exist_ok=True)
    db = fresh_event_log(workdir / "events.sqlite", dataset)
    taste = new_taste(dataset)
    feedback = fan_events(dataset, taste, fans, seed + 1)
    # Rounds only when asked: the benchmark times the one it starts.
    loop = LoopConfig(source=source, every_events=10**9, every_seconds=10**9, seed=seed, output=workdir / "rounds",
                      storage=workdir / "ray-train")
    start_local_ray()
    try:
        cluster = start_cluster(ClusterConfig(bundle=bundle.resolve(), db_path=db, gateway_port=0,
                                              loop=loop.resolved()))
        try:
            before, _ = asyncio.run(taste_in_lists(cluster.gateway_address, dataset, taste))

            async def feed_round_and_load() -> tuple[dict[str, Any], LoadResult]:
                client = RecommenderClient(cluster.gateway_address, timeout=10)
                try:
                    for start in range(0, len(feedback), 500):
                        await client.feedback(feedback[start : start + 500])
                finally:
                    await client.close()
                actor = ray.get_actor(LOOP_NAME, namespace=NAMESPACE)
                started = time.monotonic()
                round_: asyncio.Future[Any] = asyncio.ensure_future(
                    asyncio.to_thread(ray.get, actor.run_round.remote()))
                mix = Mix(tuple(dataset.user_ids), tuple(dataset.item_ids), k=10)
                load = LoadResult(offered_rps=qps)
                while not round_.done():  # ten-second open-loop runs until the round is over
                    part = await run_load(LoadTest(cluster.gateway_address, qps, 10.0, warmup_s=0,
                                                   seed=len(load.samples)), mix)
                    offset = time.monotonic() - started - part.wall_s
                    load.samples += [replace(s, sent_s=s.sent_s + offset) for s in part.samples]
                load.wall_s = time.monotonic() - started
                return await round_, load

            report, load = asyncio.run(feed_round_and_load())
            after, degraded_after = asyncio.run(taste_in_lists(cluster.gateway_address, dataset, taste))
        finally:
            cluster.stop()
    finally:
        ray.shutdown()
    return {
        "dataset": dataset.name, "bundle": str(bundle), "fans": fans, "feedback_events": len(feedback),
        "taste": {"tags": list(taste.tags), "items": len(taste.items), "probes": len(taste.probes),
                  "in_probe_top10_before": round(before, 3), "in_probe_top10_after": round(after, 3),
                  "degraded_after": degraded_after},
        "round": {k: report.get(k) for k in ("decision", "seconds", "version", "parent", "feedback", "verdict")},
        "load_during_round": load.summary(),
    }
