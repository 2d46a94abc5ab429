"""Where the models compute: training and serving take a configured device, CUDA by default
where torch sees one, and refuse a device the machine lacks with what it has. The CUDA tests
run only where there is a GPU (marked `gpu`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cluster.cli import app
from ranking.baselines import SASRecTrainer
from ranking.devices import resolve_device
from ranking.evaluation import Evaluation, FunnelScorer
from ranking.inference import RankCall, RankingModel
from ranking.text_encoder import TextEncoder
from ranking.train import Trainer, TrainResult, fit, train
from recdata.bundle import load_bundle, read_manifest
from recdata.channels import channel_mask
from recdata.dataset import Dataset
from recdata.split import leave_last_two
from tests.conftest import TINY_TRAINING

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_without_a_configured_device_models_go_to_cuda_where_present() -> None:
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda:99", "mps", "not a device"])
def test_a_device_this_machine_lacks_is_refused_naming_it(name: str) -> None:
    with pytest.raises(ValueError, match=repr(name)):
        resolve_device(name)


def test_the_trainer_puts_every_weight_on_its_device_and_refuses_a_missing_one(
        tiny_dataset: Dataset, text_encoder) -> None:
    trainer = Trainer(tiny_dataset, replace(TINY_TRAINING, device="cpu"), text_encoder)
    assert trainer.device == torch.device("cpu")
    tensors = [*trainer.model.parameters(), *trainer.model.buffers(), trainer.known_items, trainer.log_q,
               trainer.log_popularity, trainer.scorer().text_t, trainer.scorer().neighbour_ids]
    assert {t.device for t in tensors} == {torch.device("cpu")}
    with pytest.raises(ValueError, match="cuda:99"):
        Trainer(tiny_dataset, replace(TINY_TRAINING, device="cuda:99"), text_encoder)


def test_train_refuses_a_bad_device_before_it_loads_anything(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "b"), "--device", "quantum"])
    assert result.exit_code == 2 and "not a torch device" in result.output
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "b"), "--workers", "2", "--device", "cpu"])
    assert result.exit_code == 2 and "--gpu" in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.gpu
@needs_cuda
def test_training_on_cuda_gives_the_quality_of_the_cpu(tiny_dataset: Dataset, text_encoder,
                                                        tiny_training: TrainResult, tmp_path: Path) -> None:
    result = train(tiny_dataset, replace(TINY_TRAINING, device="cuda"), tmp_path / "bundle", text_encoder)
    assert read_manifest(result.folder)["training"]["device"] == "cuda"
    # Same seed and data; CUDA kernels sum in another order, so within noise, not equal.
    cpu = tiny_training.metrics["test"]["funnel"]["ndcg@10"]
    assert result.metrics["test"]["funnel"]["ndcg@10"] >= 0.8 * cpu
    # The bundle it wrote serves on the CPU.
    model = RankingModel.load(result.folder, device="cpu")
    ranked = model.rank(np.array([3, 5, 8]), np.array([10, 11, 12]), np.zeros(3, np.int64))
    assert np.isfinite(ranked.scores).all()


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_trainer_checkpoints_the_devices_random_stream(tiny_dataset: Dataset, text_encoder) -> None:
    trainer = Trainer(tiny_dataset, replace(TINY_TRAINING, device="cuda"), text_encoder)
    assert {p.device.type for p in trainer.model.parameters()} == {"cuda"}
    saved = trainer._random_streams()
    expected = torch.rand(4, device=trainer.device)
    trainer._restore_random_streams(saved)
    assert torch.equal(torch.rand(4, device=trainer.device), expected)


@pytest.mark.gpu
@needs_cuda
def test_a_ray_train_gpu_worker_trains_on_its_gpu(tiny_dataset: Dataset, text_encoder,
                                                  tiny_training: TrainResult, tmp_path: Path) -> None:
    import ray

    from cluster.train_ray import RayTrainConfig, train_on_ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        result = train_on_ray(tiny_dataset, TINY_TRAINING, tmp_path / "bundle",
                              RayTrainConfig(workers=1, use_gpu=True, storage=tmp_path / "checkpoints"),
                              text_vectors=text_encoder.encode(tiny_dataset.item_texts))
    finally:
        ray.shutdown()
    assert read_manifest(result.folder)["training"]["device"].startswith("cuda")
    assert result.metrics["test"]["funnel"]["ndcg@10"] >= 0.8 * tiny_training.metrics["test"]["funnel"]["ndcg@10"]


def test_the_trainer_places_every_tensor_it_makes(tiny_dataset: Dataset, text_encoder) -> None:
    """What a CUDA run needs of the code, checked without a GPU. With torch's default device
    moved to `meta` (shapes, no data), any tensor the trainer made without naming a device
    would be a meta tensor; meeting the trainer's own tensors it would fail, or change the
    result. Both phases and their validation give the same metrics as with the default left alone."""
    config = replace(TINY_TRAINING, epochs=2, ranker_epochs=1, device="cpu")
    expected, _ = fit(Trainer(tiny_dataset, config, text_encoder))
    trainer = Trainer(tiny_dataset, config, text_encoder)
    torch.set_default_device("meta")
    try:
        metrics, _ = fit(trainer)
    finally:
        torch.set_default_device(None)
    assert metrics["test"] == expected["test"] and metrics["valid"] == expected["valid"]


def test_the_served_model_places_every_tensor_it_makes(tiny_training: TrainResult) -> None:
    """The same check for Encode and Rank (explanations and MMR included) on a loaded bundle."""
    items = load_bundle(tiny_training.folder).item_ids
    calls = [RankCall(items[:12], [(i, channel_mask(["sequential"])) for i in items[50:120]], 10, diversity, 3)
             for diversity in (0.0, 0.3)]
    calls.append(RankCall([], [(i, channel_mask(["popular"])) for i in items[5:30]], 5))
    histories = [np.arange(6), np.arange(0)]

    expected, model = (RankingModel.load(tiny_training.folder, device="cpu") for _ in range(2))
    expected_ranks, expected_vectors = expected.rank_many(calls), expected.encode(histories)
    torch.set_default_device("meta")  # after loading: modules built under it would hold no weights
    try:
        ranks, vectors = model.rank_many(calls), model.encode(histories)
    finally:
        torch.set_default_device(None)
    assert ranks == expected_ranks
    for channel, values in expected_vectors.items():
        np.testing.assert_array_equal(vectors[channel], values)


def test_the_language_model_runs_on_the_configured_device(text_encoder) -> None:
    assert text_encoder.device == resolve_device(None)
    assert {p.device for p in text_encoder.model.parameters()} == {text_encoder.device}
    assert TextEncoder(device="cpu").device == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda:99"):
        TextEncoder(device="cuda:99")


@pytest.mark.gpu
@needs_cuda
def test_the_language_model_on_cuda_gives_the_cpus_vectors(text_encoder) -> None:
    texts = ["A quiet film about the sea", "Space opera with lasers and a dog", ""]
    on_gpu = TextEncoder(device="cuda").encode(texts)
    np.testing.assert_allclose(on_gpu, TextEncoder(device="cpu").encode(texts), atol=1e-4)


def test_evaluation_places_every_tensor_it_makes(tiny_bundle: Path, tiny_dataset: Dataset) -> None:
    """The meta check for `recfunnel evaluate`: the bundle's funnel and the SASRec baseline."""
    split = leave_last_two(tiny_dataset)
    test = Evaluation(split, tiny_dataset.num_items, validation=False)
    valid = Evaluation(split, tiny_dataset.num_items, validation=True)
    budgets = dict(TINY_TRAINING.candidates_per_channel)
    config = replace(TINY_TRAINING, epochs=1, device="cpu")

    def run(scorer: FunnelScorer, sasrec: SASRecTrainer) -> tuple[dict, dict]:
        sasrec.train()
        return test.full(scorer.funnel_scores), test.full(sasrec.scores)

    def build() -> tuple[FunnelScorer, SASRecTrainer]:
        return (FunnelScorer.from_bundle(tiny_bundle, budgets, "cpu"),
                SASRecTrainer(split, tiny_dataset.num_items, config, valid))

    expected = run(*build())
    models = build()  # before the switch: modules built under it would hold no weights
    torch.set_default_device("meta")
    try:
        placed = run(*models)
    finally:
        torch.set_default_device(None)
    assert placed == expected
    assert FunnelScorer.from_bundle(tiny_bundle, budgets, "cpu").item_table.device == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda:99"):
        FunnelScorer.from_bundle(tiny_bundle, budgets, "cuda:99")


def test_evaluate_refuses_a_bad_device_before_it_loads_anything(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["evaluate", "--bundle", str(tmp_path / "missing"), "--device", "quantum"])
    assert result.exit_code == 2 and "not a torch device" in result.output


@pytest.mark.gpu
@needs_cuda
def test_evaluation_on_cuda_gives_the_cpus_metrics_and_trains_its_baseline_there(
        tiny_bundle: Path, tiny_dataset: Dataset) -> None:
    test = Evaluation(leave_last_two(tiny_dataset), tiny_dataset.num_items, validation=False)
    budgets = dict(TINY_TRAINING.candidates_per_channel)
    on_gpu = test.full(FunnelScorer.from_bundle(tiny_bundle, budgets, "cuda").funnel_scores)
    on_cpu = test.full(FunnelScorer.from_bundle(tiny_bundle, budgets, "cpu").funnel_scores)
    assert on_gpu["ndcg@10"] == pytest.approx(on_cpu["ndcg@10"], abs=0.01)
    valid = Evaluation(leave_last_two(tiny_dataset), tiny_dataset.num_items, validation=True)
    sasrec = SASRecTrainer(leave_last_two(tiny_dataset), tiny_dataset.num_items,
                           replace(TINY_TRAINING, epochs=1, device="cuda"), valid)
    sasrec.train()
    assert {p.device.type for p in sasrec.model.parameters()} == {"cuda"} and test.full(sasrec.scores)["ndcg@10"] >= 0
