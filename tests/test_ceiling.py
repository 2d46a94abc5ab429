"""The ceiling of a synthetic set: its generator's next-item odds, checked against walks
simulated step by step and against the generators' own data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cluster.cli import app
from ranking.quality import ceiling_report
from ranking.text_encoder import TextEncoder
from ranking.train import train
from recdata.ceiling import GENERATOR_FILE, Generator, NextItemOdds
from recdata.dataset import Dataset, read_interactions
from recdata.metrics import ranking_metrics, target_rank
from recdata.split import leave_last_two
from recdata.synthetic import SyntheticConfig, catalogue_of, draw_by_popularity, generate, write_pairs, write_parquet
from tests.conftest import TINY_TRAINING

SMALL = SyntheticConfig(num_users=40, num_items=60, num_topics=4, mean_length=8, seed=5)


def topic_members(config: SyntheticConfig, topic: int) -> np.ndarray:
    """A topic's items, most popular first (the order sequels follow)."""
    catalogue = catalogue_of(config, np.random.default_rng(config.seed))
    start = catalogue.topic_start[topic]
    return catalogue.members[start: start + int((catalogue.item_topic == topic).sum())]


def test_odds_sum_to_one_and_leave_the_history_out() -> None:
    odds = NextItemOdds(Generator(SMALL, "skip"))
    history = np.array([*topic_members(SMALL, 1)[:2], *topic_members(SMALL, 0)[:3]])
    row = odds.next_item(history)
    assert row.shape == (SMALL.num_items,) and row.sum() == pytest.approx(1.0)
    assert (row[history] == 0).all() and (row >= 0).all()
    # The likeliest next item is the sequel of the last one: the next in its topic's series.
    assert row.argmax() == topic_members(SMALL, 0)[3]


def test_a_redraw_walk_by_hand() -> None:
    """No series and never leaving the topic: the next item is the topic's popularity
    (1/rank) renormalised over the items not yet taken."""
    config = SyntheticConfig(num_users=10, num_items=60, num_topics=4, mean_length=8, seed=5,
                             next_in_series=0.0, stay_in_topic=1.0)
    members = topic_members(config, 2)
    history = members[[0, 2]]
    row = NextItemOdds(Generator(config, "redraw")).next_item(history)
    weights = 1.0 / np.arange(1, len(members) + 1)
    weights[[0, 2]] = 0.0
    np.testing.assert_allclose(row[members], weights / weights.sum())
    assert row[np.setdiff1d(np.arange(config.num_items), members)].sum() == 0.0


def test_taste_weights_put_every_seen_topic_among_the_tastes() -> None:
    odds = NextItemOdds(Generator(SMALL, "skip"))   # two tastes among four topics
    np.testing.assert_allclose(odds.taste_weights(np.array([3, 1, 3])), [0, 0.5, 0, 0.5])
    # One seen: it is one of the two; the other is any of the three left, alike.
    np.testing.assert_allclose(odds.taste_weights(np.array([2])), [1 / 6, 1 / 6, 0.5, 1 / 6])


def simulated_next(config: SyntheticConfig, history: np.ndarray, tastes: list[int], walks: int,
                   seed: int) -> np.ndarray:
    """Frequencies of the next logged item over `walks` walks from the history's last item,
    step by step as the vectorised writer takes them: a taken item is walked through unlogged."""
    rng = np.random.default_rng(seed)
    catalogue = catalogue_of(config, np.random.default_rng(config.seed))
    taken, counts = set(history.tolist()), np.zeros(config.num_items)
    for _ in range(walks):
        current = int(history[-1])
        while True:
            if catalogue.sequel[current] >= 0 and rng.random() < config.next_in_series:
                current = int(catalogue.sequel[current])
            else:
                stay = rng.random() < config.stay_in_topic
                topic = int(catalogue.item_topic[current]) if stay else int(rng.choice(tastes))
                current = int(draw_by_popularity(catalogue, np.array([topic]), rng)[0])
            if current not in taken:
                counts[current] += 1
                break
    return counts / walks


def test_skip_odds_match_walks_simulated_step_by_step() -> None:
    # The last item's series and its topic's favourites are taken, so most walks pass through
    # taken items before one is logged.
    history = np.array([*topic_members(SMALL, 1)[:2], *topic_members(SMALL, 0)[1:4], topic_members(SMALL, 0)[0]])
    walks = 40_000
    frequencies = simulated_next(SMALL, history, [0, 1], walks, seed=1)
    skip = NextItemOdds(Generator(SMALL, "skip")).next_item(history)
    noise = np.sqrt(skip * (1 - skip) / walks)
    assert np.abs(frequencies - skip).max() <= (4 * noise + 1e-3).max()
    # The redraw walk's odds are far off these: the two walks are told apart.
    redraw = NextItemOdds(Generator(SMALL, "redraw")).next_item(history)
    assert np.abs(frequencies - redraw).max() > 10 * noise.max()


def top_hit_calibration(odds: NextItemOdds, data: Dataset) -> tuple[float, float, float]:
    """Over the test cases: hits of the likeliest item, the hits the odds expect, and their sd."""
    split = leave_last_two(data)
    numbers = odds.catalogue_positions(data.item_ids)
    rows = [odds.next_item(numbers[split.test_history(p)]) for p in range(len(split.users))]
    best = np.array([row.max() for row in rows])
    hits = sum(int(row.argmax() == numbers[t]) for row, t in zip(rows, split.test_targets, strict=True))
    return hits, float(best.sum()), float(np.sqrt((best * (1 - best)).sum()))


@pytest.mark.parametrize("walk", ["skip", "redraw"])
def test_odds_are_calibrated_on_each_writers_own_data(walk: str, tmp_path: Path) -> None:
    """The likeliest item is the target as often as the odds say, on data the generator wrote:
    a change to either writer's walk that the odds do not follow fails here."""
    config = SyntheticConfig(num_users=3000, num_items=300, num_topics=6, mean_length=12, seed=3)
    data = generate(config) if walk == "redraw" else read_interactions(write_parquet(config, tmp_path)[0], "parquet")
    hits, expected, sd = top_hit_calibration(NextItemOdds(Generator(config, walk)), data)
    assert abs(hits - expected) < 4 * sd, (hits, expected, sd)
    other = "redraw" if walk == "skip" else "skip"
    hits, expected, sd = top_hit_calibration(NextItemOdds(Generator(config, other)), data)
    assert abs(hits - expected) > 5 * sd, (hits, expected, sd)


def test_the_ceiling_outranks_popularity_on_the_same_cases() -> None:
    config = SyntheticConfig(num_users=400, num_items=120, num_topics=5, mean_length=10, seed=2)
    data = generate(config)
    report = ceiling_report(Generator(config, "redraw"), data)
    split = leave_last_two(data)
    popularity = np.bincount(np.concatenate(split.train), minlength=data.num_items)
    by_popularity = ranking_metrics([target_rank(popularity, int(t), split.test_history(p))
                                     for p, t in enumerate(split.test_targets)])
    assert report["evaluated_users"]["count"] == len(split.users)
    assert report["test"]["ndcg@10"] > 2 * by_popularity["ndcg@10"]
    sample = ceiling_report(Generator(config, "redraw"), data, users=50)
    assert sample["evaluated_users"] == {"sample": True, "seed": 0, "count": 50}


def test_items_that_are_not_the_generators_are_refused() -> None:
    odds = NextItemOdds(Generator(SMALL, "skip"))
    assert odds.catalogue_positions(["i3", "i0"]).tolist() == [3, 0]
    with pytest.raises(ValueError, match=r"item 'movie7' is not one of this generator's items i0..i59"):
        odds.catalogue_positions(["i1", "movie7"])
    with pytest.raises(ValueError, match=r"item 'i60' is not one"):
        odds.catalogue_positions(["i60"])


def test_synth_leaves_its_generator_and_bench_ceiling_reads_it(tmp_path: Path) -> None:
    runner = CliRunner()
    made = runner.invoke(app, ["synth", "--out", str(tmp_path), "--users", "200", "--items", "100", "--topics", "5"])
    assert made.exit_code == 0, made.output
    written = Generator.beside(tmp_path / "interactions.parquet")
    assert written == Generator(SyntheticConfig(num_users=200, num_items=100, num_topics=5, mean_length=15,
                                                min_length=5), "skip")
    result = runner.invoke(app, ["bench", "ceiling", "--interactions", str(tmp_path / "interactions.parquet"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["walk"] == "skip" and 0 < report["test"]["ndcg@10"] <= 1 and 0 < report["valid"]["ndcg@10"] <= 1
    pairs = tmp_path / "pairs"
    assert runner.invoke(app, ["synth", "--out", str(pairs), "--users", "50", "--items", "40", "--topics", "3",
                               "--format", "pairs"]).exit_code == 0
    assert Generator.beside(pairs / "interactions.txt").walk == "redraw"  # type: ignore[union-attr]


def test_bench_ceiling_without_a_generator_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "pairs.txt").write_text("u1 i1\nu1 i2\nu1 i3\n")
    result = CliRunner().invoke(app, ["bench", "ceiling", "--interactions", str(tmp_path / "pairs.txt"),
                                      "--format", "pairs"])
    assert result.exit_code == 2 and GENERATOR_FILE in result.output and "recfunnel synth" in result.output
    (tmp_path / GENERATOR_FILE).write_text('{"walk": "sideways", "config": {}}')
    result = CliRunner().invoke(app, ["bench", "ceiling", "--interactions", str(tmp_path / "pairs.txt"),
                                      "--format", "pairs"])
    assert result.exit_code == 2 and "does not describe a synthetic set's generator" in result.output


def test_evaluate_reports_the_ceiling_of_a_set_with_its_generator_beside_it(text_encoder: TextEncoder,
                                                                           tmp_path: Path) -> None:
    config = SyntheticConfig(num_users=150, num_items=100, num_topics=5, mean_length=12, seed=4)
    interactions, items = write_pairs(generate(config), tmp_path)
    bundle = train(read_interactions(interactions, "pairs", items), TINY_TRAINING, tmp_path / "bundle",
                   text_encoder).folder
    command = ["evaluate", "--bundle", str(bundle), "--interactions", str(interactions), "--items", str(items),
               "--format", "pairs", "--no-baselines", "--json"]
    first = CliRunner().invoke(app, command)
    assert first.exit_code == 0, first.output
    assert "ceiling" not in json.loads(first.stdout)   # not a set we know the generator of
    Generator(config, "redraw").write(tmp_path)
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ceiling"]["walk"] == "redraw"
    assert report["ceiling"]["full"]["ndcg@10"] > report["funnel"]["full"]["ndcg@10"]
