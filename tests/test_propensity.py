"""Position bias: swapped pairs in answers, the propensity estimate, inverse-propensity weights."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import numpy as np
import pytest

from cluster.loop import LoopConfig, position_factors
from gateway.events import Event, EventLog, EventStore, Exposure, open_event_store
from gateway.online_metrics import ReportConfig, online_report
from gateway.propensity import (
    ExplorationConfig,
    Explorer,
    estimate_propensity,
    inverse_propensity_factors,
    ranked_positions,
)
from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc
from tests.conftest import needs_pg
from tests.grpc_checks import serving_stack

TRUE_PROPENSITY = [1.0 / (1 + k) ** 0.9 for k in range(10)]


def test_exploration_swaps_one_adjacent_pair_in_its_share_of_answers() -> None:
    never = Explorer(ExplorationConfig(swap_share=0.0), random.Random(1))
    assert all(never.pair_to_swap(10) is None for _ in range(500))
    always = Explorer(ExplorationConfig(swap_share=1.0, depth=4), random.Random(1))
    pairs = [always.pair_to_swap(10) for _ in range(600)]
    assert set(pairs) == {0, 1, 2}  # within the first 4 places, each pair drawn
    assert always.pair_to_swap(1) is None  # one item has no pair
    some = Explorer(ExplorationConfig(swap_share=0.3), random.Random(2))
    share = np.mean([some.pair_to_swap(10) is not None for _ in range(4000)])
    assert 0.27 < share < 0.33 and some.swapped == round(share * 4000)
    assert ranked_positions(4, 1) == [0, 2, 1, 3] and ranked_positions(3, None) == [0, 1, 2]
    for bad in ({"swap_share": 1.5}, {"swap_share": -0.1}, {"depth": 1}, {"depth": 101}):
        with pytest.raises(ValueError, match="exploration"):
            ExplorationConfig(**bad)
    with pytest.raises(ValueError, match="unknown settings"):
        ExplorationConfig.from_dict({"share": 0.1})


def test_the_cluster_config_reads_exploration_and_the_loop_its_debiasing(tmp_path: Path) -> None:
    from cluster.config import ClusterConfig

    path = tmp_path / "cluster.toml"
    path.write_text('bundle = "b"\ndb_path = "e.sqlite"\n[exploration]\nswap_share = 0.05\ndepth = 6\n'
                    '[loop]\ninverse_propensity = true\npropensity_clip = 0.2\nclick_types = ["click", "play"]\n')
    config = ClusterConfig.from_file(path)
    assert config.exploration == ExplorationConfig(0.05, 6)
    assert config.loop.inverse_propensity and config.loop.click_types == ("click", "play")
    assert config.loop.exploration_depth == 6  # the places the gateways swap
    path.write_text('bundle = "b"\ndb_path = "e.sqlite"\n[exploration]\nswap_share = 2\n')
    with pytest.raises(ValueError, match=r"swap_share=2.0 must be in 0.0..1.0"):
        ClusterConfig.from_file(path)


def simulated_log(answers: int, swap_share: float, seed: int) -> list[tuple[int, int, int, int]]:
    """Clicks of a population that looks at place k with TRUE_PROPENSITY[k] and clicks what it
    looks at with the appeal of what the ranking put there (falling with the rank)."""
    rng = np.random.default_rng(seed)
    explorer = Explorer(ExplorationConfig(swap_share=swap_share), random.Random(seed))
    ranked = np.array([ranked_positions(10, explorer.pair_to_swap(10)) for _ in range(answers)])
    appeal = -np.sort(-rng.uniform(0.05, 0.6, size=(answers, 10)), axis=1)  # the ranking's order, best first
    clicked = rng.random((answers, 10)) < np.asarray(TRUE_PROPENSITY) * np.take_along_axis(appeal, ranked, 1)
    shown = np.broadcast_to(np.arange(10), ranked.shape)
    cells = shown * 10 + ranked
    exposures = np.bincount(cells.ravel(), minlength=100)
    clicks = np.bincount(cells.ravel(), weights=clicked.ravel(), minlength=100)
    return [(cell // 10, cell % 10, int(exposures[cell]), int(clicks[cell])) for cell in np.flatnonzero(exposures)]


def test_the_propensity_of_each_place_is_recovered_from_a_simulated_log() -> None:
    log = simulated_log(answers=200_000, swap_share=0.5, seed=3)
    estimate = estimate_propensity(log, depth=10)
    assert len(estimate.propensity) == 10 and estimate.propensity[0] == 1.0
    for place in range(6):  # the chain multiplies errors; the first places are the ones that matter most
        assert estimate.propensity[place] == pytest.approx(TRUE_PROPENSITY[place], rel=0.12)
    # The naive estimate, CTR by place, mixes in the ranking's order: it is far too steep.
    ctr = {s: c / n for s, r, n, c in log if s == r}
    assert ctr[5] / ctr[0] < 0.8 * TRUE_PROPENSITY[5]
    assert estimate.at(40) == estimate.propensity[-1]  # past the estimate: the last place's


def test_without_swapped_answers_there_is_no_estimate_past_the_first_place() -> None:
    estimate = estimate_propensity(simulated_log(answers=2_000, swap_share=0.0, seed=4), depth=10)
    assert estimate.propensity == (1.0,) and estimate.pairs[0]["ratio"] is None
    assert estimate.pairs[0]["swapped_exposures"] == 0


def test_inverse_propensity_factors_are_clipped_and_self_normalised() -> None:
    estimate = estimate_propensity(simulated_log(answers=60_000, swap_share=0.5, seed=5), depth=10)
    shown_at = {1: 0, 2: 0, 3: 4, 4: 9}
    factors, summary = inverse_propensity_factors(shown_at, estimate, clip=0.25)
    assert np.mean(list(factors.values())) == pytest.approx(1.0)
    assert factors[3] > factors[1] == factors[2]
    assert factors[4] / factors[1] == pytest.approx(4.0)  # place 9's propensity (< 0.25) is clipped
    assert summary["events"] == 4 and summary["clipped"] >= 1
    assert inverse_propensity_factors({}, estimate, 0.1) == ({}, {"events": 0})
    with pytest.raises(ValueError, match="clip"):
        inverse_propensity_factors(shown_at, estimate, clip=0.0)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_pg)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> EventStore:
    location = str(tmp_path / "events.sqlite") if request.param == "sqlite" else request.getfixturevalue("pg_schema")
    return open_event_store(location)


def test_the_store_counts_clicks_by_shown_and_ranked_place(store: EventStore) -> None:
    store.record_exposures([Exposure("r1", "u", "a", 0, 0.9, "v", ranked_position=1),
                            Exposure("r1", "u", "b", 1, 0.8, "v", ranked_position=0),
                            Exposure("r2", "u", "a", 0, 0.9, "v"),  # logged before exploration: as ranked
                            Exposure("r2", "u", "b", 1, 0.8, "v", ranked_position=1)])
    store.append([Event("u", "b", "click", request_id="r1"), Event("u", "b", "click", request_id="r1"),
                  Event("u", "a", "view", request_id="r2"), Event("u", "a", "click", request_id="r2"),
                  Event("u", "z", "click", request_id="r2")])  # not shown by r2: not its outcome
    assert sorted(store.position_outcomes(("click",), depth=10)) == [(0, 0, 1, 1), (0, 1, 1, 0), (1, 0, 1, 1),
                                                                   (1, 1, 1, 0)]
    assert sorted(store.position_outcomes(("click",), depth=1)) == [(0, 0, 1, 1), (0, 1, 1, 0)]
    # seq -> the place its answer showed the clicked item at (seqs 1..5 in log order)
    assert store.shown_positions(0, 5) == {1: 1, 2: 1, 3: 0, 4: 0}
    assert store.shown_positions(2, 3) == {3: 0}
    store.close()


def test_the_loop_weighs_attributed_clicks_by_inverse_propensity_only_when_asked(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.sqlite")
    rng = random.Random(6)
    explorer = Explorer(ExplorationConfig(swap_share=0.5), rng)
    events = []
    for n in range(3000):
        ranked = ranked_positions(10, explorer.pair_to_swap(10))
        log.record_exposures([Exposure(f"r{n}", "u", f"i{r}", shown, 1.0, "v", ranked_position=r)
                              for shown, r in enumerate(ranked)])
        events += [Event("u", f"i{r}", "click", request_id=f"r{n}") for shown, r in enumerate(ranked)
                   if rng.random() < TRUE_PROPENSITY[shown] * 0.5]
    log.append(events)
    assert position_factors(log, LoopConfig(), 0, log.last_seq()) == ({}, {})
    factors, report = position_factors(log, LoopConfig(inverse_propensity=True, propensity_clip=0.2), 0,
                                       log.last_seq())
    assert len(factors) == len(events) and np.mean(list(factors.values())) == pytest.approx(1.0)
    assert report["propensity"]["propensity"][3] == pytest.approx(TRUE_PROPENSITY[3], rel=0.25)
    shown = log.shown_positions(0, log.last_seq())
    top, low = (np.mean([factors[s] for s, p in shown.items() if p == place]) for place in (0, 5))
    # 1 / place 5's propensity (as the report rounds it), clipped at 0.2
    assert low / top == pytest.approx(1 / max(report["propensity"]["propensity"][5], 0.2), rel=1e-3)
    with pytest.raises(ValueError, match="propensity_clip"):
        LoopConfig(inverse_propensity=True, propensity_clip=0.0)
    log.close()


async def test_a_gateway_exploring_every_answer_swaps_one_pair_and_logs_both_places(tiny_bundle: Path,
                                                                                  tmp_path: Path) -> None:
    db = tmp_path / "events.sqlite"
    async with serving_stack(tiny_bundle, db, exploration=ExplorationConfig(swap_share=1.0, depth=5)) as (
            gateway, _, _), grpc.aio.insecure_channel(gateway.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        replies = [await stub.Recommend(recommender_pb2.RecommendRequest(user_id=f"u{n}", k=8), timeout=10)
                   for n in range(12)]
        reply = replies[0]
        await stub.Feedback(recommender_pb2.FeedbackRequest(events=[recommender_pb2.Event(
            user_id="u0", item_id=reply.items[0].item_id, event_type="click", request_id=reply.request_id)]))
    log = EventLog(db)
    for reply in replies:
        logged = log.exposures_of(reply.request_id)
        assert [x.item_id for x in logged] == [i.item_id for i in reply.items]  # shown as answered
        moved = [(x.position, x.ranked_at) for x in logged if x.position != x.ranked_at]
        assert len(moved) == 2 and moved[0][0] < 4 and moved == [(moved[0][0], moved[0][0] + 1),
                                                                   (moved[0][0] + 1, moved[0][0])]
        scores = [x.score for x in sorted(logged, key=lambda x: x.ranked_at)]
        assert scores == sorted(scores, reverse=True)  # in ranked order the scores fall
    report = online_report(log, ReportConfig())
    assert report["position_propensity"]["swapped_exposures"] == 24
    assert online_report(EventLog(tmp_path / "other.sqlite"), ReportConfig())["position_propensity"] is None
    log.close()
