"""The data-size rule: which settings follow the data's size, and that explicit ones win."""

from __future__ import annotations

import pytest

from ranking.config import TrainConfig
from ranking.sizing import SIZED_SETTINGS, DataSize, sized_settings, with_sized_defaults
from recdata.synthetic import SyntheticConfig, generate

ML_100K = DataSize(users=943, items=1682, interactions=100_000, median_length=65.0, p90_length=244.4)


def test_movielens_100k_gets_exactly_the_defaults() -> None:
    settings, decided = with_sized_defaults(ML_100K, {})
    assert TrainConfig.from_dict(settings) == TrainConfig()
    assert sorted(decided) == sorted(SIZED_SETTINGS)


def test_larger_data_gets_more_negatives_width_and_time_and_fewer_epochs() -> None:
    million = sized_settings(DataSize(users=50_000, items=200_000, interactions=1_000_000, median_length=18.0,
                                      p90_length=31.0))
    assert million == {"epochs": 100, "time_budget_s": pytest.approx(1897.4, abs=0.1),
                       "ranker_time_budget_s": pytest.approx(948.7, abs=0.1), "ranker_epochs": 50,
                       "num_negatives": 3125,
                       "model": {"dim": 128, "max_len": 40, "encoder": "hstu"}}
    huge = sized_settings(DataSize(users=10**6, items=10**7, interactions=10**9, median_length=200.0,
                                   p90_length=900.0))
    assert (huge["epochs"], huge["time_budget_s"], huge["num_negatives"]) == (100, 3600, 8192)
    assert huge["ranker_epochs"] == 60
    assert huge["model"]["max_len"] == 200  # long histories: SASRec's length for them
    tiny = sized_settings(DataSize(users=60, items=40, interactions=480, median_length=8.0, p90_length=11.0))
    assert (tiny["epochs"], tiny["time_budget_s"], tiny["num_negatives"], tiny["ranker_epochs"]) == (200, 600, 1024, 6)
    assert tiny["model"] == {"dim": 64, "max_len": 20, "encoder": "sasrec"}


def test_the_encoder_follows_the_data_size_unless_the_config_names_one() -> None:
    below = DataSize(users=6000, items=5000, interactions=299_999, median_length=15.0, p90_length=40.0)
    at = DataSize(users=6000, items=5000, interactions=300_000, median_length=15.0, p90_length=40.0)
    assert sized_settings(below)["model"]["encoder"] == "sasrec"
    assert sized_settings(at)["model"]["encoder"] == "hstu"
    settings, decided = with_sized_defaults(at, {"model": {"encoder": "sasrec"}})
    assert TrainConfig.from_dict(settings).model.encoder == "sasrec" and "model.encoder" not in decided


def test_explicit_settings_win_and_the_ranker_budget_follows_an_explicit_encoder_budget() -> None:
    settings, decided = with_sized_defaults(ML_100K, {"epochs": 7, "time_budget_s": 100.0,
                                                      "model": {"dim": 32}})
    config = TrainConfig.from_dict(settings)
    assert (config.epochs, config.time_budget_s, config.ranker_time_budget_s) == (7, 100.0, 50.0)
    assert (config.model.dim, config.model.max_len) == (32, 50)
    assert sorted(decided) == ["model.encoder", "model.max_len", "num_negatives", "ranker_epochs",
                               "ranker_time_budget_s"]


def test_the_ranker_gets_five_passes_over_its_examples_as_the_config_counts_them() -> None:
    ten_thousand_users = DataSize(users=10_000, items=5000, interactions=200_000, median_length=20.0,
                                  p90_length=35.0)
    assert sized_settings(ten_thousand_users)["ranker_epochs"] == 10  # 80,000 examples, 40,000 an epoch
    settings, decided = with_sized_defaults(ten_thousand_users, {"ranker_positions": 16,
                                                                 "ranker_examples_per_epoch": 20_000})
    assert settings["ranker_epochs"] == 40 and "ranker_epochs" in decided
    settings, decided = with_sized_defaults(ten_thousand_users, {"ranker_epochs": 3})
    assert settings["ranker_epochs"] == 3 and "ranker_epochs" not in decided


def test_a_data_sets_size_is_measured_from_its_histories() -> None:
    data = generate(SyntheticConfig(num_users=50, num_items=30, num_topics=3, mean_length=6, seed=1))
    size = DataSize.of(data)
    lengths = sorted(len(s) for s in data.sequences)
    assert (size.users, size.items, size.interactions) == (50, 30, sum(lengths))
    assert min(lengths) <= size.median_length <= size.p90_length <= max(lengths)
