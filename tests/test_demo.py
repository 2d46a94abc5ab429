"""The demo's bundle is trained once per data set and training configuration, then reused."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from cluster.demo import demo_bundle, demo_training, training_key
from recdata.bundle import FORMAT_VERSION, load_bundle
from recdata.dataset import Dataset
from recdata.synthetic import SyntheticConfig, generate

SECONDS = 2.0  # the encoder phase's budget: enough for a bundle, not for quality


def small_data() -> Dataset:
    return generate(SyntheticConfig(num_users=60, num_items=40, num_topics=3, mean_length=8, seed=3))


def test_the_key_follows_the_data_and_the_configuration() -> None:
    data = small_data()
    assert training_key(data, demo_training(SECONDS)) == training_key(small_data(), demo_training(SECONDS))
    assert training_key(data, demo_training(SECONDS)) != training_key(data, demo_training(SECONDS + 1))
    other = generate(SyntheticConfig(num_users=60, num_items=40, num_topics=3, mean_length=8, seed=4))
    assert training_key(data, demo_training(SECONDS)) != training_key(other, demo_training(SECONDS))


def test_a_new_bundle_format_retrains_the_demo_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle cached by an older recfunnel cannot be served by this one: its key differs."""
    data = small_data()
    before = training_key(data, demo_training(SECONDS))
    monkeypatch.setattr("cluster.demo.FORMAT_VERSION", FORMAT_VERSION + 1)
    assert training_key(data, demo_training(SECONDS)) != before


def test_the_same_data_and_configuration_reuse_the_bundle_and_retrain_trains_again(tmp_path: Path) -> None:
    data, console = small_data(), Console(record=True, width=200)
    first = load_bundle(demo_bundle(data, tmp_path, SECONDS, console)).version
    assert "reusing" not in console.export_text()

    again = demo_bundle(data, tmp_path, SECONDS, console)
    assert load_bundle(again).version == first
    assert "reusing the demo bundle" in console.export_text(clear=False)

    retrained = load_bundle(demo_bundle(data, tmp_path, SECONDS, console, retrain=True)).version
    assert retrained != first


def test_a_bundle_without_its_key_is_trained_again(tmp_path: Path) -> None:
    data = small_data()
    first = load_bundle(demo_bundle(data, tmp_path, SECONDS, Console(quiet=True))).version
    (tmp_path / "bundle.key").write_text("a key of other data\n")
    assert load_bundle(demo_bundle(data, tmp_path, SECONDS, Console(quiet=True))).version != first
