"""`recfunnel bench train-helpers`: what Ray Train's helper actors cost the training loop beside them.

Next to its workers, Ray Train starts six helper actors (controller, synchronisation,
placement-group cleaner, dataset manager, autoscaling coordinator, preemption watcher). Each
one's main thread wakes every 10 ms: Ray's core worker checks for signals on a fixed timer,
armed through a timerfd, so neither a Ray setting nor the timer slack stretches it. Their
CPU share is small. What they can cost is the interruption of a loop that keeps every core
busy: each wake-up displaces a training thread, and its partner waits at the next barrier.

This runs one Ray Train worker over all the cores and, in alternating windows of a few
seconds, stops the helpers (SIGSTOP) and lets them go on (SIGCONT); with `mode="idle"` it
moves them between SCHED_IDLE and normal scheduling instead. It compares the median training
step of each kind of window. The windows alternate within one run, so the machine's drift
(several percent from minute to minute on a small virtual machine) falls on both sides alike.

Stopping them is safe for a few seconds: the worker only talks to them at the end of an
epoch, and waits there until they go on. Linux only (signals, /proc).
"""

from __future__ import annotations

import bisect
import json
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness import start_local_ray
from bench.train import bench_config
from cluster.train_ray import RayReplicas, RayTrainConfig, torch_trainer
from ranking.text_encoder import TextEncoder
from ranking.train import Trainer
from recdata.dataset import Dataset

# The process titles of Ray Train's helper actors (Ray names an actor's process `ray::Class`).
HELPER_ACTORS = ("TrainController", "SynchronizationActor", "PlacementGroupCleaner", "DatasetManager",
                 "_AutoscalingCoordinatorActor", "PreemptionWatcher")
MODES = ("pause", "idle")


class StepTimedTrainer(Trainer):
    """The trainer, noting the wall-clock end of every optimiser step."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.step_ends: list[float] = []

    def _step(self, parameters: list[torch.nn.Parameter], optimiser: torch.optim.Optimizer) -> None:
        super()._step(parameters, optimiser)
        self.step_ends.append(time.time())


def _timed_encoder_loop(settings: dict[str, Any]) -> None:
    """A Ray Train worker: the encoder phase, as `recfunnel train` runs it, with step times."""
    import ray.train

    replicas = RayReplicas(settings["config"], torch.device("cpu"))
    trainer = StepTimedTrainer(settings["dataset"], settings["config"], text_vectors=settings["text_vectors"],
                               parallel=replicas)
    trainer.train_encoder()
    # The run's result carries the metrics of its last checkpoint, so this report makes one.
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "steps.json").write_text(json.dumps(trainer.step_ends), "utf-8")
        ray.train.report({"phase": "done", "step_ends": trainer.step_ends},
                         checkpoint=ray.train.Checkpoint.from_directory(folder))


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = _parent(pid)
    return False


def helper_pids(names: tuple[str, ...] = HELPER_ACTORS, ancestor: int | None = None) -> list[int]:
    """Processes under `ancestor` (by default this one, which starts the Ray it measures, and
    not another Ray on the machine) whose title is `ray::<name>`, a task's method perhaps
    following: `ray::Class.method`."""
    ancestor = os.getpid() if ancestor is None else ancestor
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == ancestor:
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            if (title.startswith("ray::") and title[5:].split(".", 1)[0].split(" ", 1)[0] in names
                    and _descends_from(int(entry.name), ancestor)):
                found.append(int(entry.name))
        except (OSError, ValueError):  # gone meanwhile
            continue
    return found


def _hold(pids: list[int], mode: str, held: bool) -> None:
    """Stop or go on (mode "pause"), or idle or normal scheduling (mode "idle"), for every thread."""
    for pid in pids:
        try:
            if mode == "pause":
                os.kill(pid, signal.SIGSTOP if held else signal.SIGCONT)
                continue
            policy = os.SCHED_IDLE if held else os.SCHED_OTHER
            for thread in os.listdir(f"/proc/{pid}/task"):
                os.sched_setscheduler(int(thread), policy, os.sched_param(0))
        except (ProcessLookupError, FileNotFoundError):  # the actor has exited
            continue


def split_steps(step_ends: list[float], windows: list[tuple[float, bool]]) -> tuple[list[float], list[float]]:
    """Step durations (ms) that lie wholly inside a window with the helpers running, and
    inside one with them held. `windows`: (start time, held) in order; a step that spans a
    switch, or comes before the first window, counts for neither."""
    running: list[float] = []
    held: list[float] = []
    starts = [start for start, _ in windows]
    for begin, end in zip(step_ends, step_ends[1:], strict=False):
        index = bisect.bisect_right(starts, end) - 1  # the window the step ends in
        if index < 0 or begin < starts[index]:
            continue
        (held if windows[index][1] else running).append((end - begin) * 1000)
    return running, held


def run_helpers_bench(dataset: Dataset, epochs: int, window_s: float = 2.0, mode: str = "pause",
                      seed: int = 0) -> dict[str, Any]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not 0.5 <= window_s <= 30:
        raise ValueError(f"window_s must be in [0.5, 30], got {window_s}")
    if epochs < 2:
        raise ValueError(f"epochs must be at least 2 (the first is not measured), got {epochs}")
    import ray

    cores = os.cpu_count() or 2
    settings = {"config": bench_config(epochs, seed, cores), "dataset": dataset,
                "text_vectors": TextEncoder().encode(dataset.item_texts)}
    windows: list[tuple[float, bool]] = []
    seen: set[int] = set()  # every helper process held at least once
    done = threading.Event()

    def alternate() -> None:
        # Wait for Ray Train's controller, then past the worker's start and first epoch: a new
        # process's first steps fault in its memory and would all land in the first window.
        while not done.is_set() and not helper_pids(("TrainController",)):
            done.wait(0.2)
        done.wait(2 * window_s + 10.0)
        held = False
        try:
            while not done.is_set():
                held = not held
                pids = helper_pids()
                seen.update(pids)
                _hold(pids, mode, held)
                windows.append((time.time(), held))
                done.wait(window_s)
        finally:
            _hold(helper_pids(), mode, False)

    start_local_ray(cores)
    switcher = threading.Thread(target=alternate, name="helper-switcher", daemon=True)
    try:
        with tempfile.TemporaryDirectory() as folder:
            trainer = torch_trainer(RayTrainConfig(workers=1, storage=Path(folder), cpus_per_worker=cores,
                                                   name="bench-helpers"), settings, loop=_timed_encoder_loop)
            switcher.start()
            result = trainer.fit()
    finally:
        done.set()
        if switcher.is_alive():
            switcher.join()
        ray.shutdown()
    running, held = split_steps(result.metrics["step_ends"], windows)
    if not running or not held:
        raise RuntimeError(f"too few steps in both kinds of window ({len(running)} running, {len(held)} held): "
                           f"train more epochs or shorten window_s")
    median_running, median_held = statistics.median(running), statistics.median(held)
    return {"dataset": dataset.name, "epochs": epochs, "cores": cores, "mode": mode, "window_s": window_s,
            "helper_processes_held": len(seen), "steps_helpers_running": len(running), "steps_helpers_held": len(held),
            "median_step_ms_helpers_running": round(median_running, 1),
            "median_step_ms_helpers_held": round(median_held, 1),
            # How much slower a step is with the helpers running than with them held.
            "slowdown_from_helpers": round(median_running / median_held - 1, 4)}
