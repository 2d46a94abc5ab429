"""`recfunnel bench scale`: what every phase of training and serving costs as the data grows.

Two measurements in one run:
  * a training step's time at the same batch size over catalogues of growing size (random
    text vectors stand in for the language model's, so only the catalogue changes);
  * per data size, synthetic data from `recfunnel synth` (users and items growing with it)
    through every phase: read, text encoding, statistics, one encoder epoch, one validation,
    one ranker epoch, the bundle (its indexes measured, then written), a sampled evaluation,
    and serving at a fixed rate through the gateway of the cluster on local Ray.

Each size runs in a fresh process, and a sampler thread reads its resident memory every
20 ms, so each phase's peak is its own and the phase that holds memory is named.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil

GIB = 2**30


@dataclass(frozen=True)
class ScaleBenchConfig:
    sizes: tuple[int, ...] = (100_000, 1_000_000)   # interactions per data set
    interactions_per_user: int = 20
    interactions_per_item: int = 20                  # items = size / this, at most max_items
    max_items: int = 1_000_000
    step_items: tuple[int, ...] = (10_000, 100_000, 1_000_000)  # catalogues of the step-time comparison
    steps: int = 20                                  # timed steps per catalogue
    serving_rate: float = 100.0                      # requests/s of the serving measurement
    serving_seconds: float = 20.0
    evaluation_users: int = 2_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1_000:
            raise ValueError(f"sizes must be at least 1000 interactions each, got {self.sizes}")
        if min(self.step_items) < 100:
            raise ValueError(f"step_items must be at least 100 items each, got {self.step_items}")
        if not 0 < self.serving_rate <= 10_000 or self.serving_seconds < 0:
            raise ValueError("serving_rate must be in (0, 10000] and serving_seconds >= 0")


class PhaseMeter:
    """Seconds and peak resident memory of named phases of this process."""

    def __init__(self, interval_s: float = 0.02):
        self.process = psutil.Process()
        self.phases: dict[str, dict[str, float]] = {}
        self._peak = 0
        # The sampler reads memory and raises the peak in one step under this lock: otherwise a
        # reading taken in one phase could land after the next phase's reset and count there.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
        self._sampler.start()

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with self._lock:
                self._peak = max(self._peak, self.process.memory_info().rss)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self._lock:
            self._peak = self.process.memory_info().rss
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self._peak = max(self._peak, self.process.memory_info().rss)
            self.phases[name] = {"seconds": round(time.perf_counter() - started, 3),
                                 "peak_rss_gib": round(self._peak / GIB, 3)}

    def close(self) -> None:
        self._stop.set()
        self._sampler.join()


def growth(costs: dict[int, float]) -> dict[str, float]:
    """cost(next size) / cost(size) for each pair of neighbouring sizes, keyed "a->b"."""
    sizes = sorted(costs)
    return {f"{a}->{b}": round(costs[b] / costs[a], 3) if costs[a] > 0 else float("nan")
            for a, b in zip(sizes, sizes[1:], strict=False)}


# ---- a training step against the catalogue's size ----------------------------------------

def step_seconds(num_items: int, config: ScaleBenchConfig) -> float:
    """Median seconds of one encoder training step (batch 128) over a catalogue of `num_items`."""
    import torch

    from ranking.config import TrainConfig
    from ranking.train import Trainer, training_windows
    from recdata.synthetic import SyntheticConfig, generate

    users = 2_000  # enough windows for the steps; the catalogue alone changes between runs
    data = generate(SyntheticConfig(num_users=users, num_items=num_items, num_topics=50, mean_length=20,
                                    seed=config.seed))
    rng = np.random.default_rng(config.seed)
    text = rng.normal(size=(num_items, 384)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    trainer = Trainer(data, TrainConfig(device="cpu", validation_users=100), text_vectors=text)
    windows = torch.from_numpy(training_windows(trainer.split.train, trainer.config.model.max_len))
    params = list(trainer.model.items.parameters()) + list(trainer.model.encoder.parameters())
    optimiser = trainer.encoder_optimiser(params)
    trainer.model.train()
    times = []
    for step in range(config.steps + 3):  # the first steps warm allocators and caches
        batch = windows[torch.randint(len(windows), (trainer.config.batch_size,))]
        started = time.perf_counter()
        loss = trainer.encoder_loss(batch[:, :-1], batch[:, 1:])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step >= 3:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


# ---- one data size through every phase -------------------------------------------------------

def _size_run(size: int, config: ScaleBenchConfig, workdir: str, results: Any) -> None:
    """In a fresh process: every phase on one data size; the report goes back on `results`."""
    try:
        results.put(run_size(size, config, Path(workdir)))
    except BaseException as error:  # noqa: BLE001 - the parent reports what broke
        results.put({"size": size, "error": f"{type(error).__name__}: {error}"})


def run_size(size: int, config: ScaleBenchConfig, workdir: Path) -> dict[str, Any]:
    from bench.train import positions_per_epoch
    from ranking.config import TrainConfig
    from ranking.quality import EvaluateConfig, evaluate
    from ranking.text_encoder import TextEncoder
    from ranking.train import Trainer
    from recdata.dataset import read_interactions
    from recdata.synthetic import SyntheticConfig, write_parquet

    users = max(10, size // config.interactions_per_user)
    items = max(100, min(config.max_items, size // config.interactions_per_item))
    # Topics of about a thousand items, between 10 and 200 of them: small catalogues keep
    # enough items a topic that sequences rarely repeat an item.
    synthetic = SyntheticConfig(num_users=users, num_items=items, num_topics=int(np.clip(items // 1000, 10, 200)),
                                mean_length=config.interactions_per_user, seed=config.seed)
    interactions, item_file, written = write_parquet(synthetic, workdir / "data")
    meter = PhaseMeter()
    report: dict[str, Any] = {"size": size, "users": users, "items": items, "interactions": written}
    try:
        with meter.phase("read"):
            data = read_interactions(interactions, "parquet", item_file)
        with meter.phase("text encoding"):
            # No disk cache: the bench measures the encoding itself.
            text_vectors = TextEncoder(device="cpu").encode(data.item_texts)
        training = TrainConfig(epochs=1, time_budget_s=1e9, ranker_epochs=1, ranker_time_budget_s=1e9,
                               device="cpu", seed=config.seed)
        with meter.phase("statistics"):  # the split, popularity, recent popularity, item2item
            trainer = Trainer(data, training, text_vectors=text_vectors)
        with meter.phase("encoder epoch"):
            trainer.train_encoder()
        with meter.phase("validation"):
            trainer.evaluate(validation=True, with_ranker=False)
        encoder_s = meter.phases["encoder epoch"]["seconds"] - meter.phases["validation"]["seconds"]
        report["training_samples_per_s"] = round(positions_per_epoch(trainer) / max(encoder_s, 1e-9), 1)
        with meter.phase("ranker epoch"):
            trainer.train_ranker()
        bundle = workdir / "bundle"
        with meter.phase("bundle"):  # its indexes built and measured, then written
            trainer.export(bundle, {"scale_bench": True})
        report["bundle_mb"] = round(sum(f.stat().st_size for f in bundle.iterdir()) / 2**20, 1)
        with meter.phase("sampled evaluation"):
            evaluated = evaluate(bundle, data, EvaluateConfig(baselines=False, users=config.evaluation_users,
                                                              device="cpu"))
        report["funnel_ndcg@10"] = round(evaluated["funnel"]["full"]["ndcg@10"], 4)
        del trainer
        if config.serving_seconds > 0:
            with meter.phase("serving"):
                report["serving"] = serve_bundle(bundle, data, workdir, config)
    finally:
        meter.close()
    report["phases"] = meter.phases
    return report


def serve_bundle(bundle: Path, data: Any, workdir: Path, config: ScaleBenchConfig) -> dict[str, Any]:
    """Open-loop Recommend and Feedback at `serving_rate` through the gateway of 2 shards and a
    ranker on local Ray, the data's histories in the event log."""
    import ray

    from bench.harness import start_local_ray
    from bench.loadtest import LoadTest, Mix, run_load
    from cluster.config import ClusterConfig
    from cluster.demo import fresh_event_log
    from cluster.launch import start_cluster

    db = fresh_event_log(workdir / "events.sqlite", data)
    start_local_ray()
    try:
        cluster = start_cluster(ClusterConfig(bundle=bundle.resolve(), db_path=db, gateway_port=0))
        try:
            mix = Mix(tuple(data.user_ids), tuple(data.item_ids))
            # Ten seconds of unmeasured load first: the services' first calls on a new bundle
            # fill caches and allocator arenas, which is start-up, not steady serving.
            test = LoadTest(cluster.gateway_address, config.serving_rate, config.serving_seconds, warmup_s=10.0,
                            seed=config.seed)
            result = asyncio.run(run_load(test, mix))
            services = {s["name"]: round(s["rss_bytes"] / GIB, 3) for s in ray.get(
                cluster.controller.status.remote(), timeout=60)["services"]}
        finally:
            cluster.stop()
    finally:
        ray.shutdown()
    summary = result.summary()
    return {**{k: summary[k] for k in ("offered_rps", "achieved_rps", "p50_ms", "p99_ms", "errors")},
            "service_rss_gib": services}


# ---- the run ------------------------------------------------------------------------------------

def run_scale_bench(config: ScaleBenchConfig, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    report: dict[str, Any] = {"config": {"sizes": list(config.sizes), "step_items": list(config.step_items),
                                         "interactions_per_user": config.interactions_per_user,
                                         "interactions_per_item": config.interactions_per_item},
                              "step_seconds": {}}
    for items in config.step_items:
        progress(f"a training step over {items:,} items")
        report["step_seconds"][str(items)] = round(step_seconds(items, config), 5)
    steps = [report["step_seconds"][str(n)] for n in config.step_items]
    report["step_ratio_largest_vs_smallest"] = round(steps[-1] / steps[0], 3)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no peak carries over
    report["sizes"] = []
    for size in config.sizes:
        progress(f"{size:,} interactions through every phase")
        with tempfile.TemporaryDirectory(prefix="recfunnel-scale-") as workdir:
            results = context.Queue()
            process = context.Process(target=_size_run, args=(size, config, workdir, results))
            process.start()
            outcome = results.get()
            process.join()
        report["sizes"].append(outcome)
        if "error" in outcome:
            progress(f"{size:,}: {outcome['error']}")
            break
    finished = [r for r in report["sizes"] if "phases" in r]
    phases = sorted({name for r in finished for name in r["phases"]})
    report["growth"] = {name: growth({r["size"]: r["phases"][name]["seconds"] for r in finished
                                      if name in r["phases"]}) for name in phases}
    return report


def with_sizes(config: ScaleBenchConfig, sizes: str) -> ScaleBenchConfig:
    """`--sizes 1e5,1e6`: interactions per data set, in any float notation."""
    return replace(config, sizes=tuple(int(float(s)) for s in sizes.split(",") if s.strip()))
