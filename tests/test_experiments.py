"""A/B experiments: sticky assignment by a salted hash, checked configs, variants that change
the answers, and answers and exposures that name their variant for the report."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from cluster.config import ClusterConfig
from gateway.events import EventLog
from gateway.experiments import Experiment, Variant, experiments_from_config
from gateway.online_metrics import ReportConfig, online_report
from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc
from tests.grpc_checks import serving_stack

THREE_WAY = Experiment("ranking-2026", (Variant("control", 0.5), Variant("diverse", 0.3, diversity=0.8),
                                        Variant("no-popular", 0.2, channel_budgets=(("popular", 0),))))


def test_assignment_is_sticky_follows_the_shares_and_a_new_salt_reshuffles() -> None:
    users = [f"user-{n}" for n in range(20_000)]
    first = [THREE_WAY.assign(u).name for u in users]
    # Another gateway (another process, another object) assigns the same: nothing to share.
    again = Experiment("ranking-2026", THREE_WAY.variants)
    assert [again.assign(u).name for u in users] == first
    for name, share in (("control", 0.5), ("diverse", 0.3), ("no-popular", 0.2)):
        assert first.count(name) / len(users) == pytest.approx(share, abs=0.015)
    salted = Experiment("ranking-2026", THREE_WAY.variants, salt="round-2")
    moved = sum(salted.assign(u).name != v for u, v in zip(users, first, strict=True)) / len(users)
    assert 0.55 < moved < 0.70  # independent draws: 1 - (.5² + .3² + .2²) = 0.62 change
    assert THREE_WAY.assignment("user-1").label == f"ranking-2026/{first[1]}"


@pytest.mark.parametrize(("table", "message"), [
    ({"name": "x", "variants": [{"name": "control", "share": 0.5}, {"name": "b", "share": 0.4}]},
     "shares sum to 0.9; they must sum to 1"),
    ({"name": "x", "variants": [{"name": "control", "share": 0.5}, {"name": "control", "share": 0.5}]},
     "distinct names"),
    ({"name": "x", "variants": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]},
     "control 'control' is not one of its variants"),
    ({"name": "x", "variants": [{"name": "control", "share": 0.5},
                                {"name": "b", "share": 0.5, "channel_budgets": {"trending": 5}}]},
     "unknown channel 'trending'"),
    ({"name": "x", "variants": [{"name": "control", "share": 0.5}, {"name": "b", "share": 0.5, "diversity": 2}]},
     "diversity=2.0 must be in 0.0..1.0"),
    ({"name": "x", "variants": [{"name": "control", "share": 0.5},
                                {"name": "b", "share": 0.5, "new_item_place": 1001}]},
     "new_item_place=1001 must be in 0..1000"),
    ({"name": "X Y", "variants": []}, "experiment name 'X Y' must match"),
    ({"name": "x", "variants": [], "traffic": 1}, "experiment settings ['traffic'] unknown"),
])
def test_a_bad_experiment_is_refused_with_what_is_wrong(table: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        experiments_from_config([table])


def test_the_cluster_config_reads_experiments_and_runs_one_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text('bundle = "b"\ndb_path = "e.sqlite"\n'
                    '[[experiments]]\nname = "diversity"\nsalt = "s1"\n'
                    '[[experiments.variants]]\nname = "control"\nshare = 0.5\n'
                    '[[experiments.variants]]\nname = "diverse"\nshare = 0.5\ndiversity = 0.5\n'
                    '[experiments.variants.channel_budgets]\nsemantic = 60\n')
    config = ClusterConfig.from_file(path)
    (experiment,) = config.experiments
    assert experiment.salt == "s1" and experiment.variants[1] == Variant("diverse", 0.5, 0.5, (("semantic", 60),))
    two = path.read_text() + '[[experiments]]\nname = "other"\n'
    path.write_text(two)
    with pytest.raises(ValueError, match="one runs at a time"):
        ClusterConfig.from_file(path)
    from gateway.config import GatewayConfig

    with pytest.raises(ValueError, match="2 experiments given; one runs at a time"):
        GatewayConfig(("a:1",), ("b:2",), experiments=(THREE_WAY, THREE_WAY))


async def test_answers_name_their_variant_which_changes_them_and_the_report_compares_them(
        tiny_bundle: Path, tmp_path: Path) -> None:
    db = tmp_path / "events.sqlite"
    users = [f"u{n}" for n in range(40)]
    async with serving_stack(tiny_bundle, db, experiments=(THREE_WAY,)) as (gateway, _, _), \
            grpc.aio.insecure_channel(gateway.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        await stub.Feedback(recommender_pb2.FeedbackRequest(events=[  # some history to be diverse about
            recommender_pb2.Event(user_id=u, item_id=item, event_type="click")
            for u in users for item in ("i1", "i2", "i3")]))
        replies = {u: await stub.Recommend(recommender_pb2.RecommendRequest(user_id=u, k=8), timeout=10)
                   for u in users}
        plain = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="u0", k=8, diversity=0.0), timeout=10)
        for user, reply in replies.items():
            assert (reply.experiment, reply.variant) == ("ranking-2026", THREE_WAY.assign(user).name)
        assert plain.variant == replies["u0"].variant  # sticky across requests
        # The no-popular variant's answers come from the personal channels alone.
        without_popular = [r for r in replies.values() if r.variant == "no-popular"]
        assert without_popular and all(list(i.channels) != ["popular"] for r in without_popular for i in r.items)
        clicked = [r for r in replies.values() if r.variant == "diverse"][:3]
        await stub.Feedback(recommender_pb2.FeedbackRequest(events=[recommender_pb2.Event(
            user_id=u, item_id=r.items[0].item_id, event_type="click", request_id=r.request_id)
            for u, r in replies.items() if r in clicked]))
        control = next(r for r in replies.values() if r.variant == "control")
        await stub.Feedback(recommender_pb2.FeedbackRequest(events=[recommender_pb2.Event(  # a type of its own
            user_id="u0", item_id=control.items[0].item_id, event_type="wishlist", request_id=control.request_id)]))
    log = EventLog(db)
    reply = replies["u1"]
    assert {x.variant for x in log.exposures_of(reply.request_id)} == {f"ranking-2026/{reply.variant}"}
    report = online_report(log, ReportConfig(k=8))
    assert report["control"] == "ranking-2026/control"
    groups = report["groups"]
    assert sum(g["answers"] for g in groups.values()) == len(users) + 1
    assert groups["ranking-2026/diverse"]["clicks"] == 3 and groups["ranking-2026/control"]["clicks"] == 0
    assert "against_control" in groups["ranking-2026/diverse"]
    # The gateway counted the same live, for the Ray metrics (recfunnel_variant_*).
    live = gateway.exposures.groups
    assert {g: live.answers[g] for g in groups} == {g: figures["answers"] for g, figures in groups.items()}
    assert live.exposures["ranking-2026/control"] == groups["ranking-2026/control"]["exposures"]
    assert live.events == {("ranking-2026/diverse", "click"): 3, ("ranking-2026/control", "other"): 1}
    log.close()


def test_a_variant_sets_the_diversity_a_request_leaves_at_zero_and_the_channel_budgets() -> None:
    from gateway.events import UserView
    from gateway.servicer import query_of

    diverse, no_popular = THREE_WAY.variants[1], THREE_WAY.variants[2]
    request = recommender_pb2.RecommendRequest(user_id="u", k=5)
    assert query_of(request, UserView([], []), variant=diverse).diversity == 0.8
    asked = recommender_pb2.RecommendRequest(user_id="u", k=5, diversity=0.3)
    assert query_of(asked, UserView([], []), variant=diverse).diversity == pytest.approx(0.3)  # the client's
    assert query_of(request, UserView([], []), variant=no_popular).channel_budgets == {"popular": 0}
    assert query_of(request, UserView([], [])).channel_budgets is None
    first = Variant.from_dict({"name": "new-first", "share": 0.5, "new_item_place": 1})
    assert query_of(request, UserView([], []), variant=first).new_item_place == 1
    assert query_of(request, UserView([], []), variant=diverse).new_item_place is None  # the ranker's setting
    stored = json.loads(Experiment("x", (Variant("control", 0.5), first)).to_json())  # as the store keeps it
    assert Experiment.from_dict(stored).variants[1] == first


class Settings:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def setting(self, key: str) -> str | None:
        return self.values.get(key)


def test_the_stores_setting_starts_replaces_and_stops_the_configured_experiment() -> None:
    from gateway.experiments import EXPERIMENT_SETTING, RunningExperiment

    store = Settings()
    running = RunningExperiment(THREE_WAY, store)
    running.refresh()
    assert running.current == THREE_WAY  # nothing set: the config's
    other = Experiment("other", (Variant("control", 0.5), Variant("b", 0.5)))
    store.values[EXPERIMENT_SETTING] = other.to_json()
    running.refresh()
    assert running.current == other
    store.values[EXPERIMENT_SETTING] = '{"name": "broken", "variants": []}'
    running.refresh()
    assert running.current == other  # a setting that does not parse changes nothing
    store.values[EXPERIMENT_SETTING] = ""
    running.refresh()
    assert running.current is None


async def test_recfunnel_experiments_start_and_stop_reach_a_serving_gateway_without_a_restart(
        tiny_bundle: Path, tmp_path: Path) -> None:
    import asyncio

    from typer.testing import CliRunner

    from cluster.cli import app

    db = tmp_path / "events.sqlite"
    spec = tmp_path / "experiment.toml"
    spec.write_text('[[experiments]]\nname = "live"\n[[experiments.variants]]\nname = "control"\nshare = 0.5\n'
                    '[[experiments.variants]]\nname = "b"\nshare = 0.5\n')
    async with serving_stack(tiny_bundle, db, experiment_poll_s=0.05) as (gateway, _, _), \
            grpc.aio.insecure_channel(gateway.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)

        async def experiment_seen() -> str:
            for _ in range(100):  # the first request after the poll interval starts a re-read
                reply = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="u7", k=3), timeout=10)
                await asyncio.sleep(0.02)
            return reply.experiment

        assert await experiment_seen() == ""
        started = CliRunner().invoke(app, ["experiments", "start", str(spec), "--db", str(db)])
        assert started.exit_code == 0 and "experiment live started (control 0.5, b 0.5)" in started.output
        assert await experiment_seen() == "live"
        stopped = CliRunner().invoke(app, ["experiments", "stop", "--db", str(db)])
        assert stopped.exit_code == 0
        assert await experiment_seen() == ""
    bad = tmp_path / "bad.toml"
    bad.write_text('[[experiments]]\nname = "x"\n')
    refused = CliRunner().invoke(app, ["experiments", "start", str(bad), "--db", str(db)])
    assert refused.exit_code == 2 and "variants with distinct names" in refused.output
