"""Ray Train: checkpoints hold everything a replica needs to go on, a run resumed from one
ends exactly where an uninterrupted run does, a run whose worker is killed goes on from its
last checkpoint, two workers train a bundle of the same quality as one process, and workers
on two nodes stream disjoint shards of the training windows that cover all of them."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import ray
import torch

from cluster.train_ray import (
    RayTrainConfig,
    RayWindowShard,
    read_checkpoint,
    torch_trainer,
    train_on_ray,
    windows_dataset,
    write_checkpoint,
)
from ranking.train import PhaseState, Trainer, TrainResult, encoder_windows, fit
from recdata.bundle import read_manifest
from recdata.dataset import Dataset
from tests.conftest import TINY_TRAINING
from tests.ray_cluster import two_nodes


def test_a_checkpoint_restores_weights_optimiser_and_random_streams(tiny_dataset: Dataset, text_encoder,
                                                                    tmp_path: Path) -> None:
    trainer = Trainer(tiny_dataset, TINY_TRAINING, text_encoder)
    params = list(trainer.model.encoder.parameters())
    optimiser = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    optimiser.step()
    generator = torch.Generator().manual_seed(3)
    state = PhaseState("encoder", epoch=2, best=0.25, stale=1, curve=[{"stage": 0.0, "epoch": 1.0}],
                       best_state={k: v.clone() for k, v in trainer.model.state_dict().items()},
                       rng={"generator": generator.get_state(), "torch": torch.get_rng_state(),
                            "numpy": {"state": {"state": 7}}})
    write_checkpoint(tmp_path, trainer, state, optimiser)

    other = Trainer(tiny_dataset, replace(TINY_TRAINING, seed=9), text_encoder)
    restored = read_checkpoint(tmp_path, other)
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(other.model.state_dict()[key], value)
    assert (restored.phase, restored.epoch, restored.best, restored.stale) == ("encoder", 2, 0.25, 1)
    assert restored.curve == state.curve and restored.rng["numpy"] == {"state": {"state": 7}}
    again = torch.Generator()
    again.set_state(restored.rng["generator"])
    assert torch.equal(torch.rand(4, generator=again), torch.rand(4, generator=generator))
    fresh = torch.optim.AdamW(list(other.model.encoder.parameters()), lr=1e-3)
    fresh.load_state_dict(restored.optimiser)
    for index, values in optimiser.state_dict()["state"].items():
        torch.testing.assert_close(fresh.state_dict()["state"][index]["exp_avg"], values["exp_avg"])


class Interrupted(Exception):
    pass


class CheckpointingReplica:
    """A single replica that checkpoints like a Ray Train worker and, optionally, dies after
    a given number of epochs, as a killed worker does."""

    rank, world = 0, 1

    def __init__(self, folder: Path, die_after: int | None = None):
        self.folder, self.die_after, self.epochs = folder, die_after, 0

    def average_gradients(self, parameters) -> None:  # type: ignore[no-untyped-def]
        pass

    def any(self, flag: bool) -> bool:
        return flag

    def epoch_done(self, trainer: Trainer, state: PhaseState, optimiser: torch.optim.Optimizer) -> None:
        write_checkpoint(self.folder, trainer, state, optimiser)
        self.epochs += 1
        if self.epochs == self.die_after:
            raise Interrupted


def test_the_training_process_keeps_each_phases_last_epoch_on_the_dashboard() -> None:
    from cluster.metrics import TrainingMetrics

    metrics, shown = TrainingMetrics("run-1"), []
    metrics._latest = lambda phase, ndcg, loss: shown.append((phase, ndcg, loss))  # type: ignore[method-assign]
    metrics.finished([{"stage": 0.0, "ndcg@10": 0.1, "loss": 9.0}, {"stage": 0.0, "ndcg@10": 0.2, "loss": 8.0},
                      {"stage": 1.0, "ndcg@10": 0.3, "loss": 2.0}])
    assert shown == [("encoder", 0.2, 8.0), ("ranker", 0.3, 2.0)]


@pytest.mark.parametrize(("use_gpu", "backend"), [(False, "gloo"), (True, "nccl")])
def test_replicas_average_their_gradients_where_they_train(tiny_dataset: Dataset, tmp_path: Path,
                                                           use_gpu: bool, backend: str) -> None:
    """GPU workers train on their GPU, so NCCL carries their gradients; CPU workers use gloo."""
    trainer = torch_trainer(RayTrainConfig(workers=2, use_gpu=use_gpu, storage=tmp_path),
                            {"config": TINY_TRAINING, "dataset": tiny_dataset, "text_vectors": None, "out": "",
                             "warm_start": "", "metrics": {}})
    assert trainer.scaling_config.use_gpu == use_gpu
    assert trainer.backend_config.backend == backend
    assert trainer.train_loop_config["use_gpu"] == use_gpu  # each worker takes its device from it


@pytest.mark.parametrize("die_after", [2, 7])  # in the encoder phase; in the ranker phase
def test_a_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(
        tiny_dataset: Dataset, text_encoder, tmp_path: Path, die_after: int) -> None:
    config = replace(TINY_TRAINING, epochs=6, patience=6, ranker_epochs=2, time_budget_s=1e9,
                     ranker_time_budget_s=1e9)
    vectors = text_encoder.encode(tiny_dataset.item_texts)
    whole = Trainer(tiny_dataset, config, text_vectors=vectors, parallel=CheckpointingReplica(tmp_path / "a"))
    (tmp_path / "a").mkdir()
    expected, _ = fit(whole)

    (tmp_path / "b").mkdir()
    first = Trainer(tiny_dataset, config, text_vectors=vectors,
                    parallel=CheckpointingReplica(tmp_path / "b", die_after=die_after))
    with pytest.raises(Interrupted):
        fit(first)
    second = Trainer(tiny_dataset, config, text_vectors=vectors, parallel=CheckpointingReplica(tmp_path / "b"))
    second.resume = read_checkpoint(tmp_path / "b", second)
    assert len(second.resume.curve) == die_after
    resumed, curve = fit(second)
    assert len(curve) == 8  # 6 encoder + 2 ranker epochs, counted across the interruption
    for split in ("valid", "test"):
        for stage in ("recall", "funnel"):
            assert resumed[split][stage]["ndcg@10"] == pytest.approx(expected[split][stage]["ndcg@10"], abs=1e-6)


@pytest.mark.fault
def test_ray_train_with_two_workers_writes_a_bundle_of_the_same_quality(
        tiny_dataset: Dataset, text_encoder, tiny_training: TrainResult, tmp_path: Path) -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        result = train_on_ray(tiny_dataset, TINY_TRAINING, tmp_path / "bundle",
                              RayTrainConfig(workers=2, storage=tmp_path / "checkpoints"),
                              text_vectors=text_encoder.encode(tiny_dataset.item_texts))
    finally:
        ray.shutdown()
    assert result.metrics["workers"] == 2 and (tmp_path / "bundle" / "manifest.json").is_file()
    assert read_manifest(tmp_path / "bundle")["training"]["device"] == "cpu"  # CPU workers train on the CPU
    assert any((tmp_path / "checkpoints").rglob("checkpoint_*/state.json"))  # a checkpoint every epoch
    single = tiny_training.metrics["test"]["funnel"]["ndcg@10"]
    # Same seed, same data, two replicas: the same quality within noise.
    assert result.metrics["test"]["funnel"]["ndcg@10"] >= 0.8 * single


def train_workers() -> list[psutil.Process]:
    """The processes of Ray Train's worker actors on this machine."""
    return [p for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or ())]


def registered_checkpoints(storage: Path) -> list[dict]:
    """The checkpoints Ray Train's controller has registered (and would resume from)."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(ValueError):  # being written
            return list(json.loads(snapshot.read_text("utf-8"))["checkpoint_results"])
    return []


@pytest.mark.fault
def test_a_run_whose_worker_is_killed_goes_on_from_the_last_checkpoint(
        tiny_dataset: Dataset, text_encoder, tiny_training: TrainResult, tmp_path: Path) -> None:
    config = replace(TINY_TRAINING, epochs=12, patience=12, time_budget_s=1e9, ranker_time_budget_s=1e9)
    storage = tmp_path / "checkpoints"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(train_on_ray, tiny_dataset, config, tmp_path / "bundle",
                              RayTrainConfig(workers=1, storage=storage),
                              text_encoder.encode(tiny_dataset.item_texts))
            # Kill once Ray Train has taken a checkpoint into its registry, not merely once one
            # is on disk: a checkpoint the controller never registered is rightly not resumed from.
            deadline = time.monotonic() + 120
            while not registered_checkpoints(storage):
                assert time.monotonic() < deadline and not run.done(), "no checkpoint within 120 s"
                time.sleep(0.1)
            workers = train_workers()
            assert len(workers) == 1
            workers[0].send_signal(signal.SIGKILL)
            result = run.result(timeout=300)
    finally:
        ray.shutdown()
    assert result.metrics["resumed_after_epochs"] >= 1  # the restarted worker found the checkpoint
    assert len(result.curve) == 12 + TINY_TRAINING.ranker_epochs  # every epoch, once, across the kill
    assert [p["epoch"] for p in result.curve[:12]] == list(range(1, 13))
    assert result.metrics["test"]["funnel"]["ndcg@10"] >= 0.8 * tiny_training.metrics["test"]["funnel"]["ndcg@10"]


def _record_shard(settings: dict) -> None:
    """A Ray Train worker loop that streams its shard of the windows for two epochs, as a
    replica does, and writes down its node and every (number, window) it was given."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    shard = RayWindowShard(ray.train.get_dataset_shard("train"), rows=0, seed=0)
    epochs = [torch.cat(list(shard.numbered(epoch, batch_size=16))).tolist() for epoch in range(2)]
    Path(settings["out"], f"{rank}.json").write_text(json.dumps(
        {"node": ray.get_runtime_context().get_node_id(), "epochs": epochs}), "utf-8")


@pytest.mark.fault
def test_workers_on_two_nodes_stream_disjoint_shards_that_cover_every_window(
        tiny_dataset: Dataset, text_encoder, tiny_training: TrainResult, tmp_path: Path) -> None:
    windows = encoder_windows(tiny_dataset, TINY_TRAINING)
    nodes, _ = two_nodes()
    ray.init(address=nodes.address, log_to_driver=False, configure_logging=False)
    try:
        spread = RayTrainConfig(workers=2, storage=tmp_path / "checkpoints", placement="SPREAD")
        torch_trainer(spread, {"config": TINY_TRAINING, "out": str(tmp_path)}, loop=_record_shard,
                      windows=windows_dataset(windows)).fit()
        result = train_on_ray(tiny_dataset, TINY_TRAINING, tmp_path / "bundle", spread,
                              text_vectors=text_encoder.encode(tiny_dataset.item_texts))
    finally:
        ray.shutdown()
        nodes.shutdown()
    shards = [json.loads((tmp_path / f"{rank}.json").read_text("utf-8")) for rank in range(2)]
    assert shards[0]["node"] != shards[1]["node"]  # one worker on each node
    for epoch in range(2):
        numbers = [[row[0] for row in shard["epochs"][epoch]] for shard in shards]
        assert not set(numbers[0]) & set(numbers[1])  # disjoint
        assert sorted(numbers[0] + numbers[1]) == list(range(len(windows)))  # every window, once
        for shard in shards:
            for row in shard["epochs"][epoch]:
                assert row[1:] == windows[row[0]].tolist()  # the window itself, unchanged
    assert [row[0] for row in shards[0]["epochs"][0]] != [row[0] for row in shards[0]["epochs"][1]]  # reshuffled
    assert result.metrics["workers"] == 2
    single = tiny_training.metrics["test"]["funnel"]["ndcg@10"]
    assert result.metrics["test"]["funnel"]["ndcg@10"] >= 0.8 * single  # the same quality within noise
