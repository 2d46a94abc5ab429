"""`recfunnel train --workers N`: the same training, data-parallel on Ray Train.

A `TorchTrainer` runs N replicas of `ranking.train.Trainer`. The encoder's training windows
are a Ray Dataset (`datasets={"train": …}`): each replica streams its own disjoint shard of
every epoch from `ray.train.get_dataset_shard("train")`, so none holds the whole table; the
data set itself (for statistics and validation) travels once through the object store, one
copy per node. Every replica averages gradients with the others before each step (torch.distributed
over the process group Ray Train sets up: gloo on CPU workers, NCCL on GPU workers, each of
which trains on the GPU Ray gave it), so the replicas hold the same model and take the same
early-stopping decisions. After every epoch each replica reports its metrics and the
first one writes a checkpoint (safetensors and JSON) to the storage path; when a worker
dies, Ray Train starts the group again and every replica resumes from the last checkpoint.
The first replica writes the bundle at the end.

Gradients are averaged by hand rather than through DistributedDataParallel: the loss reads
the item table from one module and the query encoder from another, with a sampled softmax on
top, so there is no single forward for DDP to wrap.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ranking.config import TrainConfig
from ranking.train import PhaseProgress, PhaseState, Trainer, TrainResult, encoder_windows, fit
from recdata.bundle import read_manifest
from recdata.dataset import Dataset

# Ray Train runs the loop in a thread of the worker, which glibc would give a heap of its own
# (at most 64 MiB, trimmed eagerly), too small to keep a step's large tensors: one arena
# for the process lets `ranking.train.keep_freed_memory` keep them, as in the plain loop.
WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}

# Rows per block of the windows Dataset, the unit Ray hands to a shard: large enough to keep
# per-block overhead low; at least MIN_BLOCKS blocks, so that a small data set's shards still
# come out even (a shard takes whole blocks).
WINDOW_BLOCK_ROWS = 4096
MIN_BLOCKS = 64
# Windows the local shuffle mixes at once, on top of the blocks' randomised order.
SHUFFLE_ROWS = 16_384

MODEL, BEST, OPTIMISER, RANDOM, STATE = ("model.safetensors", "best.safetensors", "optimiser.safetensors",
                                         "random.safetensors", "state.json")


@dataclass(frozen=True)
class RayTrainConfig:
    workers: int = 2
    storage: Path = Path("ray-train")  # checkpoints, one folder per run
    # The run's folder under `storage`. Ray Train resumes a run whose folder exists, so a
    # fresh name per run (the default) starts afresh; naming an interrupted run resumes it.
    name: str = field(default_factory=lambda: f"recfunnel-train-{time.strftime('%Y%m%d-%H%M%S')}-"
                                              f"{uuid.uuid4().hex[:6]}")
    use_gpu: bool = False
    max_failures: int = 3               # worker-group restarts before the run fails
    cpus_per_worker: float = 1.0
    # "PACK" keeps the replicas on as few nodes as possible; "SPREAD" puts them on different
    # nodes when they can be (each then streams its shard from the blocks near it).
    placement: str = "PACK"

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 256:
            raise ValueError(f"workers={self.workers} must be in 1..256")
        if self.placement not in ("PACK", "SPREAD"):
            raise ValueError(f"placement={self.placement!r} must be PACK or SPREAD")


def windows_dataset(windows: np.ndarray) -> Any:
    """The training windows as a Ray Dataset of one int32 tensor column "data": each row is a
    window's number, then its max_len + 1 padded item indexes."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    numbered = np.hstack([np.arange(len(windows), dtype=np.int32)[:, None], windows.astype(np.int32)])
    parts = np.array_split(numbered, max(MIN_BLOCKS, -(-len(numbered) // WINDOW_BLOCK_ROWS)))
    # `from_blocks` reads each block's metadata here; `from_numpy` and `from_arrow` run a task
    # per block for it, which never starts where serving actors hold every CPU (the feedback
    # loop fine-tunes beside them).
    return ray.data.from_blocks([pa.table({"data": ArrowTensorArray.from_numpy(part)}) for part in parts])


def sharded_windows() -> Any:
    """How Ray Train splits the windows Dataset: `streaming_split(equal=False)`, unlike the
    default `DataConfig`, whose equal split drops the rows past the last whole share. Every
    window is trained on each epoch; `Trainer` lets a replica with one batch fewer step along."""
    from ray.train import DataConfig

    class WholeShards(DataConfig):
        def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any,
                      worker_node_ids: Any, **kwargs: Any) -> list[dict[str, Any]]:
            hints = worker_node_ids if self._enable_shard_locality else None
            shards: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, dataset in datasets.items():
                for rank, split in enumerate(dataset.streaming_split(world_size, equal=False, locality_hints=hints)):
                    shards[rank][name] = split
            return shards

    return WholeShards()


class RayWindowShard:
    """`ranking.train.WindowShard` over this worker's `get_dataset_shard("train")`."""

    def __init__(self, shard: Any, rows: int, seed: int):
        self.shard, self.rows, self.seed = shard, rows, seed

    def numbered(self, epoch: int, batch_size: int) -> Iterator[torch.Tensor]:
        """(B, 1 + max_len + 1) batches: each window's number, then the window."""
        for batch in self.shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.int64,
                                                   local_shuffle_buffer_size=max(SHUFFLE_ROWS, 4 * batch_size),
                                                   local_shuffle_seed=self.seed + epoch):
            yield batch["data"]


class RayReplicas:
    """`ranking.train.DataParallel` inside a Ray Train worker."""

    def __init__(self, model_config: TrainConfig, device: torch.device):
        import ray.train

        from cluster.metrics import TrainingMetrics

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.config = model_config
        self.device = device  # where the collectives' tensors live: NCCL takes CUDA tensors only
        self.metrics = TrainingMetrics(context.get_experiment_name()) if self.rank == 0 else None

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        import torch.distributed as dist

        if self.world == 1:
            return
        # A sparse gradient (the ID table's rows) is averaged dense: replicas touched different rows.
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.to_dense() if p.grad.is_sparse else p.grad
                 for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce per step, not one per tensor
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(parameters, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def any(self, flag: bool) -> bool:
        import torch.distributed as dist

        if self.world == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def epoch_done(self, trainer: Trainer, state: PhaseState, optimiser: torch.optim.Optimizer) -> None:
        import ray.train

        point = state.curve[-1]
        metrics = {"phase": state.phase, "epoch": state.epoch, "valid_ndcg@10": point["ndcg@10"],
                   "loss": point["loss"], "seconds": point["seconds"]}
        if self.metrics is None:  # not the first replica
            ray.train.report(metrics)
            return
        self.metrics.epoch(state.phase, point["ndcg@10"], point["loss"])
        with tempfile.TemporaryDirectory() as folder:
            write_checkpoint(Path(folder), trainer, state, optimiser)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def write_checkpoint(folder: Path, trainer: Trainer, state: PhaseState, optimiser: torch.optim.Optimizer) -> None:
    """Model weights, the phase's best weights, optimiser moments and random streams, in
    safetensors; counters, the curve and the optimiser's settings in JSON. Nothing pickled."""
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, folder / MODEL)
    if state.best_state is not None:
        save_file({k: v.contiguous() for k, v in state.best_state.items()}, folder / BEST)
    saved = optimiser.state_dict()
    moments = {f"{index}.{name}": value.contiguous() for index, values in saved["state"].items()
               for name, value in values.items() if isinstance(value, torch.Tensor)}
    save_file(moments, folder / OPTIMISER)
    tensors = {name: value for name, value in state.rng.items() if isinstance(value, torch.Tensor)}
    save_file(tensors, folder / RANDOM)
    (folder / STATE).write_text(json.dumps({
        "phase": state.phase, "epoch": state.epoch, "best": state.best, "start": state.start, "stale": state.stale,
        "curve": state.curve,
        "param_groups": saved["param_groups"], "optimiser_indexes": sorted(saved["state"]),
        "rng": {k: v for k, v in state.rng.items() if not isinstance(v, torch.Tensor)},
    }), "utf-8")


def read_checkpoint(folder: Path, trainer: Trainer) -> PhaseState:
    """Load a checkpoint's weights into `trainer.model` and return its phase state."""
    trainer.model.load_state_dict(load_file(folder / MODEL))
    meta = json.loads((folder / STATE).read_text("utf-8"))
    moments = load_file(folder / OPTIMISER)
    state: dict[int, dict[str, torch.Tensor]] = {index: {} for index in meta["optimiser_indexes"]}
    for key, value in moments.items():
        index, name = key.split(".", 1)
        state[int(index)][name] = value
    rng: dict[str, Any] = {**meta["rng"], **load_file(folder / RANDOM)}
    return PhaseState(phase=meta["phase"], epoch=meta["epoch"], best=meta["best"], start=meta.get("start", -1.0),
                      stale=meta["stale"],
                      best_state=load_file(folder / BEST) if (folder / BEST).exists() else None,
                      curve=meta["curve"], optimiser={"state": state, "param_groups": meta["param_groups"]},
                      rng=rng)


def _worker_loop(settings: dict[str, Any]) -> None:
    """One replica: train (from the last checkpoint, if any), then the first writes the bundle."""
    import ray.train
    import ray.train.torch

    # The GPU Ray assigned this worker (it sets CUDA_VISIBLE_DEVICES), or the CPU.
    device = ray.train.torch.get_device() if settings["use_gpu"] else torch.device("cpu")
    config: TrainConfig = replace(settings["config"], device=str(device))
    replicas = RayReplicas(config, device)
    warm_start = Path(settings["warm_start"]) if settings["warm_start"] else None
    shard = RayWindowShard(ray.train.get_dataset_shard("train"), settings["windows"] // replicas.world, config.seed)
    # Both arrive as object references: numpy arrays are read from the node's object store in
    # place, so the replicas on one node share one copy.
    text_vectors = ray.get(settings["text_vectors"]) if settings["text_vectors"] is not None else None
    trainer = Trainer(ray.get(settings["dataset"]), config, text_vectors=text_vectors,
                      parallel=replicas, warm_start=warm_start, shard=shard)
    checkpoint = ray.train.get_checkpoint()
    resumed_at = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.resume = read_checkpoint(Path(folder), trainer)
        resumed_at = len(trainer.resume.curve)
    metrics, curve = fit(trainer)
    if replicas.rank == 0:
        # The bundle's manifest carries the run's story: the driver reads it from there.
        bundle = trainer.export(Path(settings["out"]), {**settings["metrics"], **metrics, "workers": replicas.world,
                                                        "resumed_after_epochs": resumed_at, "curve": curve})
        ray.train.report({"phase": "done", "version": bundle.version, "resumed_after_epochs": resumed_at,
                          "test_funnel_ndcg@10": metrics["test"]["funnel"]["ndcg@10"]})
    else:
        ray.train.report({"phase": "done"})


def torch_trainer(ray_config: RayTrainConfig, settings: dict[str, Any],
                  loop: Callable[[dict[str, Any]], None] | None = None, windows: Any = None) -> Any:
    """The `TorchTrainer` running `loop` (by default `_worker_loop`) on every worker, with these
    `settings` (see `train_on_ray`) and the `windows` Dataset (`windows_dataset`) to shard."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Each replica gets its share of the cores as torch threads.
    replica = replace(settings["config"], threads=max(1, int(ray_config.cpus_per_worker)))
    return TorchTrainer(
        loop or _worker_loop,
        train_loop_config={**settings, "config": replica, "use_gpu": ray_config.use_gpu},
        datasets=None if windows is None else {"train": windows},
        dataset_config=sharded_windows(),
        scaling_config=ScalingConfig(num_workers=ray_config.workers, use_gpu=ray_config.use_gpu,
                                     resources_per_worker={"CPU": ray_config.cpus_per_worker},
                                     placement_strategy=ray_config.placement),
        # The gradients the replicas average live where they train: NCCL carries CUDA tensors
        # between GPU workers, gloo CPU tensors.
        torch_config=TorchConfig(backend="nccl" if ray_config.use_gpu else "gloo"),
        # Ray 2.60 runs Train v2, whose RunConfig takes worker_runtime_env; the type stubs are v1's.
        run_config=RunConfig(name=ray_config.name, storage_path=str(ray_config.storage.resolve()),  # type: ignore[call-arg]
                             failure_config=FailureConfig(max_failures=ray_config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env={"env_vars": WORKER_ENV}),
    )


def train_on_ray(dataset: Dataset, config: TrainConfig, out: Path, ray_config: RayTrainConfig,
                 text_vectors: np.ndarray | None = None, warm_start: Path | None = None,
                 metrics: dict[str, Any] | None = None, phase_progress: PhaseProgress | None = None) -> TrainResult:
    """Train on the connected Ray cluster with `ray_config.workers` replicas; write the bundle to `out`.

    `warm_start`: fine-tune from this bundle's weights (see `Trainer`); `metrics`: more
    entries for the bundle's manifest; `phase_progress`: how far the driver's own phases are."""
    import ray

    from cluster.metrics import TrainingMetrics
    from cluster.text_on_ray import encode_texts
    from ranking.text_encoder import TextEncoder, default_disk_cache

    show = phase_progress or (lambda phase, done, total: None)
    if text_vectors is None and config.use_text:  # once here, not once per replica
        text_vectors = encode_texts(dataset.item_texts, TextEncoder(disk_cache=default_disk_cache()),
                                    actors=ray_config.workers, use_gpu=ray_config.use_gpu,
                                    progress=lambda done, total: show("text encoding", done, total))
    show("training windows", 0, 1)
    windows = encoder_windows(dataset, config)
    show("training windows", 1, 1)
    trainer = torch_trainer(ray_config, {"config": config, "dataset": ray.put(dataset),
                                         "text_vectors": None if text_vectors is None else ray.put(text_vectors),
                                         "windows": len(windows), "out": str(out.resolve()),
                                         "warm_start": str(warm_start.resolve()) if warm_start else "",
                                         "metrics": metrics or {}},
                            windows=windows_dataset(windows))
    trainer.fit()
    manifest = read_manifest(out)
    metrics = dict(manifest["metrics"])
    curve = metrics.pop("curve")
    TrainingMetrics(ray_config.name).finished(curve)
    return TrainResult(out, manifest["version"], metrics, curve)
