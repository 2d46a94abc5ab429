"""Shared fixtures: a small synthetic data set, the real MiniLM text encoder, a tiny trained bundle."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ranking.config import ModelConfig, TrainConfig
from ranking.text_encoder import TextEncoder
from ranking.train import TrainResult, train
from recdata.dataset import Dataset
from recdata.synthetic import SyntheticConfig, generate

TINY_MODEL = ModelConfig(dim=32, max_len=20, layers=1, heads=2, dropout=0.1)
TINY_TRAINING = TrainConfig(
    model=TINY_MODEL, epochs=6, patience=3, batch_size=64, num_negatives=64, ranker_epochs=2,
    ranker_positions=4,
    candidates_per_channel=(("sequential", 40), ("semantic", 10), ("item2item", 10), ("popular", 5)),
    time_budget_s=120.0, threads=2,
)
TINY_DATA = SyntheticConfig(num_users=300, num_items=200, num_topics=8, mean_length=20, seed=7)


# The PostgreSQL server the store's tests use; without it they skip, naming the variable.
PG_URL = os.environ.get("RECFUNNEL_TEST_PG", "")
needs_pg = pytest.mark.skipif(not PG_URL, reason="set RECFUNNEL_TEST_PG=postgresql://postgres@127.0.0.1/test "
                                                 "to run the PostgreSQL store's tests")


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema on the test server, dropped afterwards: the URL that works in it."""
    from gateway.postgres_events import scratch_schema

    with scratch_schema(PG_URL, "recfunnel_test") as url:
        yield url


@pytest.fixture(scope="session")
def text_encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="session")
def tiny_dataset() -> Dataset:
    return generate(TINY_DATA)


@pytest.fixture(scope="session")
def tiny_training(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Dataset,
                  text_encoder: TextEncoder) -> TrainResult:
    return train(tiny_dataset, TINY_TRAINING, tmp_path_factory.mktemp("bundle"), text_encoder)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_training: TrainResult) -> Path:
    return tiny_training.folder
