"""`recfunnel bench experiment`: the simulated population and the figures drawn from it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.experiment import (
    ExperimentBenchConfig,
    Population,
    Served,
    answers_for_lift,
    arm_figures,
    p_value_curve,
    run_experiment_bench,
)
from cluster.cli import app

SMALL = ExperimentBenchConfig(users=120, items=40, topics=4, history=10, weak_history=3, aa_seeds=2, aa_answers=60,
                              ab_answers=120, log_answers=200, train_seconds=3.0)


def test_the_population_clicks_by_place_and_appeal() -> None:
    population = Population(ExperimentBenchConfig(users=60, items=40, topics=4, position_decay=1.0))
    assert population.appeal.shape == (60, 40) and np.allclose(population.appeal.max(axis=1), 1.0)
    user = population.user_ids[3]
    best = [population.item_ids[i] for i in np.argsort(-population.appeal[3])[:10]]
    rng = np.random.default_rng(0)
    clicks = np.mean([population.clicks(user, best, rng) for _ in range(4000)], axis=0)
    expected = population.propensity * population.appeal[3, np.argsort(-population.appeal[3])[:10]]
    assert np.allclose(clicks, expected, atol=0.03)  # looked at by place, clicked by appeal
    assert population.expected_clicks(user, best) == pytest.approx(expected.sum())
    assert population.ndcg(user, best, set(), 10) == pytest.approx(1.0)  # the ideal answer
    assert population.ndcg(user, best[::-1], set(), 10) < 1.0
    data = population.dataset(5, seed=1)
    assert data.num_users == 60 and all(len(s) == 5 and len(set(s)) == 5 for s in data.sequences)


def test_promoted_items_were_picked_more_often_than_their_appeal_alone_would_have_them() -> None:
    plain = Population(ExperimentBenchConfig(users=400, items=60, topics=4))
    promoted = Population(ExperimentBenchConfig(users=400, items=60, topics=4, promotion=5.0))
    np.testing.assert_array_equal(plain.appeal, promoted.appeal)  # what people like is the same
    share = {name: np.isin(np.concatenate(population.dataset(5, seed=2).sequences),
                           np.flatnonzero(promoted.promoted)).mean() for name, population in
             (("plain", plain), ("promoted", promoted))}
    assert 0 < promoted.promoted.mean() < 0.5 and share["promoted"] > 1.5 * share["plain"]


def test_the_lift_figures_and_the_power_needed_come_from_what_was_served() -> None:
    rng = np.random.default_rng(1)
    served = [Served(f"u{n}", variant, ["a"] * 10, rng.random(10) < rate, 10 * rate)
              for n in range(4000) for variant, rate in (("control", 0.05), ("better", 0.055))]
    control, better = arm_figures(served, "control"), arm_figures(served, "better")
    assert control["answers"] == 4000 and control["true_ctr"] == pytest.approx(0.05)
    assert better["clicks"] / better["exposures"] == pytest.approx(0.055, abs=0.004)
    # Clicks of an answer are independent draws here: var 10 p (1 - p) per answer, n = 2.8^2 · 2 var / (0.1 p · 10)^2
    needed = answers_for_lift(served, "control")
    assert needed == pytest.approx((1.959964 + 0.841621) ** 2 * 2 * 10 * 0.05 * 0.95 / (0.005 * 10) ** 2, rel=0.1)
    curve = p_value_curve(served, "control", "better")
    assert curve[-1][0] == len(served) and curve[-1][1] < 0.05 and curve[-1][1] < curve[0][1]  # a 10% lift, found


def test_bad_settings_are_refused_with_the_allowed_range() -> None:
    for bad, message in (({"users": 10}, "users=10 must be >= 50"), ({"weak_history": 30}, "weak_history"),
                         ({"swap_share": 0.0}, "swap_share"), ({"aa_answers": 5}, "at least 20 answers"),
                         ({"promotion": 0.5}, "promotion=0.5 must be >= 1"),
                         ({"phases": ("ab", "bb")}, "phases=ab,bb must name one or more of aa, ab, debias")):
        with pytest.raises(ValueError, match=message):
            ExperimentBenchConfig(**bad)
    result = CliRunner().invoke(app, ["bench", "experiment", "--users", "10"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "50" in " ".join(result.output.split())


@pytest.mark.slow
def test_a_small_run_measures_every_figure_through_the_cluster() -> None:
    report = run_experiment_bench(SMALL)
    assert len(report["aa"]["p_values"]) == 2 and 0 <= report["aa"]["false_positive_rate"] <= 1
    ab = report["ab"]
    assert ab["control"]["answers"] + ab["better"]["answers"] == 120 and ab["true_lift"] > 0
    assert report["debiasing"]["clicks"] > 0 and set(report["debiasing"]["true_ndcg@10"]) == {
        "naive", "inverse_propensity", "inverse_true_propensity"}
    only = run_experiment_bench(replace(SMALL, phases=("ab",)))
    assert "ab" in only and "aa" not in only and "debiasing" not in only
