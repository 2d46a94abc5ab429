"""Training writes a complete bundle whose models learned the data's structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ranking.config import ModelConfig, TrainConfig
from ranking.inference import RankingModel
from ranking.text_encoder import TextEncoder
from ranking.train import Trainer, TrainResult, stop_report, train
from recdata.bundle import load_bundle, load_weights
from recdata.channels import CHANNELS, SEMANTIC, SEQUENTIAL, channel_mask
from recdata.dataset import Dataset


def test_bundle_has_manifest_arrays_and_weights(tiny_training: TrainResult) -> None:
    bundle = load_bundle(tiny_training.folder)
    assert bundle.version == tiny_training.version
    manifest = json.loads((tiny_training.folder / "manifest.json").read_text())
    assert manifest["metrics"]["test"]["funnel"]["ndcg@10"] >= 0
    for channel in (SEQUENTIAL, SEMANTIC):  # the index recall serves, with its measured recall
        assert manifest["indexes"][channel]["kind"] == "flat" and manifest["indexes"][channel]["recall_at_k"] == 1.0
    assert bundle.arrays[SEQUENTIAL].shape == (200, 32)
    assert bundle.arrays[SEMANTIC].shape == (200, 384)
    for name in ("query_encoder", "ranker", "item_encoder"):
        assert load_weights(tiny_training.folder, name)
    assert not any(p.suffix in (".pkl", ".pt", ".pickle") for p in tiny_training.folder.iterdir())


def test_models_beat_random_by_a_wide_margin(tiny_training: TrainResult) -> None:
    test = tiny_training.metrics["test"]
    random_hr10 = 10 / 200
    assert test["recall"]["hr@10"] > 3 * random_hr10
    assert test["funnel"]["hr@10"] > 3 * random_hr10


def test_loaded_model_reproduces_training_vectors(tiny_training: TrainResult) -> None:
    model = RankingModel.load(tiny_training.folder, device="cpu")
    history = np.array([3, 5, 8])
    a = model.encode([history])
    b = model.encode([history, np.array([1])])
    np.testing.assert_allclose(a[SEQUENTIAL][0], b[SEQUENTIAL][0], atol=1e-5)  # batched == unbatched
    assert np.linalg.norm(a[SEQUENTIAL][0]) > 0.99
    ranked = model.rank(history, np.array([10, 11, 12]), np.array([channel_mask(["sequential"]),
                                                                    channel_mask(["popular"]), 0]))
    assert ranked.scores.shape == (3,)
    assert all(sorted(ranked.because(n, 3)) == [0, 1, 2] for n in range(3))
    assert ranked.because(0, 0) == [] and len(ranked.because(0, 2)) == 2


def test_the_ranker_reads_each_candidates_channels_from_its_mask(tiny_training: TrainResult) -> None:
    model = RankingModel.load(tiny_training.folder, device="cpu")
    seen: list[torch.Tensor] = []
    model.ranker.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[4]))
    proposed = [[["sequential", "popular"], [], ["semantic", "item2item"]], [["item2item"]]]
    model.rank_batch([np.array([3, 5]), np.array([8])], [np.array([10, 11, 12]), np.array([13])],
                     [np.array([channel_mask(c) for c in user]) for user in proposed])
    flags = seen[0][..., -len(CHANNELS):]  # (B, C, n_channels): the last side features
    for b, user in enumerate(proposed):
        for c, channels in enumerate(user):
            assert flags[b, c].tolist() == [float(channel in channels) for channel in CHANNELS]
    assert flags[1, 1:].sum() == 0  # the shorter list's padding is proposed by no channel


def test_same_seed_gives_the_same_bundle(tiny_dataset, text_encoder, tmp_path) -> None:
    from ranking.train import train
    from tests.conftest import TINY_TRAINING

    config = TINY_TRAINING.__class__(**{**TINY_TRAINING.__dict__, "epochs": 2, "ranker_epochs": 1})
    a = train(tiny_dataset, config, tmp_path / "a", text_encoder)
    b = train(tiny_dataset, config, tmp_path / "b", text_encoder)
    assert a.metrics["test"] == b.metrics["test"]
    # Equal up to the order of multi-threaded float sums.
    np.testing.assert_allclose(load_bundle(a.folder).arrays[SEQUENTIAL], load_bundle(b.folder).arrays[SEQUENTIAL],
                               atol=1e-5)


def test_early_stopping_validates_on_a_seeded_user_sample(tiny_dataset: Dataset, text_encoder: TextEncoder) -> None:
    sampled = Trainer(tiny_dataset, TrainConfig(validation_users=50), text_encoder)
    assert len(sampled.valid) == 50 and len(sampled.test) == tiny_dataset.num_users  # fewer than test_users
    tested = Trainer(tiny_dataset, TrainConfig(validation_users=50, test_users=40), text_encoder)
    assert len(tested.test) == 40 and len(tested.valid) == 50
    assert len(Trainer(tiny_dataset, TrainConfig(test_users=0), text_encoder).test) == tiny_dataset.num_users
    assert len(Trainer(tiny_dataset, TrainConfig(validation_users=0), text_encoder).valid) == tiny_dataset.num_users
    with pytest.raises(ValueError, match="validation_users=-1 must be >= 0"):
        TrainConfig(validation_users=-1)
    with pytest.raises(ValueError, match="test_users=-1 must be >= 0"):
        TrainConfig(test_users=-1)


def test_a_config_file_sets_the_model_and_training_and_the_command_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text("epochs = 7\nnum_negatives = 64\nbatch_size = 32\n[model]\ndim = 96\nheads = 3\n")
    config = TrainConfig.from_file(path, epochs=3)
    assert (config.epochs, config.num_negatives, config.batch_size) == (3, 64, 32)
    assert (config.model.dim, config.model.heads, config.model.layers) == (96, 3, ModelConfig().layers)
    path.write_text("epoch = 7\n[model]\nwidth = 3\n")
    with pytest.raises(ValueError, match=r"unknown settings \['epoch', 'model.width'\]; allowed: .*batch_size"):
        TrainConfig.from_file(path)


def test_the_example_config_file_parses() -> None:
    config = TrainConfig.from_file(Path(__file__).resolve().parent.parent / "deploy" / "train.toml")
    assert config == TrainConfig()  # it spells out the defaults


def test_a_stop_by_the_time_budget_while_improving_is_reported_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    rising = [{"ndcg@10": v} for v in (0.05, 0.06, 0.07)]
    with caplog.at_level("WARNING"):
        report = stop_report("encoder", rising, 600.0, 612.0, 3, 60)
    assert report == {"reason": "time budget", "epochs": 3, "seconds": 612.0, "still_improving": True}
    assert "stopped by its 600 s time budget after 3 epochs while validation NDCG@10 still improved" in caplog.text
    flat = [{"ndcg@10": v} for v in (0.05, 0.07, 0.06)]
    assert stop_report("encoder", flat, 600.0, 612.0, 3, 60)["still_improving"] is False
    assert stop_report("encoder", rising, 600.0, 100.0, 60, 60)["reason"] == "epochs"
    assert stop_report("encoder", flat, 600.0, 100.0, 10, 60, out_of_patience=True)["reason"] == "patience"


@pytest.mark.parametrize(("scores", "epochs", "beat_start"), [
    ((0.40, 0.45, 0.48), 3, False),            # never beats its start: patience ends it
    ((0.40, 0.60, 0.55, 0.58, 0.59), 5, True),  # beats it, then its own best stands for 3 epochs
])
def test_the_ranker_trains_until_it_beats_its_start_or_its_patience_runs_out(
        tiny_dataset: Dataset, text_encoder: TextEncoder, scores: tuple[float, ...], epochs: int,
        beat_start: bool) -> None:
    from dataclasses import replace

    from tests.conftest import TINY_TRAINING

    trainer = Trainer(tiny_dataset, replace(TINY_TRAINING, epochs=1, ranker_epochs=10, ranker_patience=3,
                                            ranker_examples_per_epoch=64), text_encoder)
    trainer.train_encoder()
    start = {k: v.clone() for k, v in trainer.model.ranker.state_dict().items()}
    validation = iter((0.5, *scores))  # the funnel before ranker training, then after each epoch

    def scripted(validation_split: bool, with_ranker: bool, when: str = "") -> dict[str, float]:
        return {"ndcg@10": next(validation), "hr@10": 0.0}

    trainer.evaluate = scripted  # type: ignore[method-assign]
    curve = trainer.train_ranker()
    assert len(curve) == epochs and trainer.stops["ranker"]["reason"] == "patience"
    assert trainer.stops["ranker"]["beat_start"] is beat_start
    kept = trainer.model.ranker.state_dict()
    assert all(torch.equal(kept[k], start[k]) for k in start) is not beat_start  # no better ranker: the start


def test_every_long_phase_reports_its_progress(tmp_path: Path) -> None:
    from recdata.synthetic import SyntheticConfig, generate

    data = generate(SyntheticConfig(num_users=60, num_items=40, num_topics=3, mean_length=8, seed=5))
    calls: dict[str, list[tuple[int, int]]] = {}
    train(data, TrainConfig(epochs=2, ranker_epochs=1, num_negatives=16), tmp_path / "bundle",
          TextEncoder(), phase_progress=lambda phase, done, total: calls.setdefault(phase, []).append((done, total)))
    assert {"text encoding", "encoder epoch 1", "validation of recall after encoder epoch 1", "encoder epoch 2",
            "ranker epoch 1", "validation of the funnel after ranker epoch 1", "test of the funnel for the report",
            "index build", "bundle write"} <= set(calls)
    for phase, seen in calls.items():
        done, total = seen[-1]
        assert done == total > 0, phase  # each ends complete
        assert [d for d, _ in seen] == sorted(d for d, _ in seen), phase  # and only moves forward
