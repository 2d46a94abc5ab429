"""Event types with weights: which events are history, which keep an item out of its user's
answers for good, and what the feedback loop learns from; in the stores, over gRPC and in
the loop's data set."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import ClusterConfig
from gateway.events import Event, EventStore, LoggedEvent, open_event_store
from gateway.server import Gateway
from protos.recfunnel.v1 import recommender_pb2 as pb
from protos.recfunnel.v1 import recommender_pb2_grpc
from recdata.dataset import Dataset
from recdata.feedback import EVERY_TYPE_POSITIVE, EventTypes, with_feedback
from tests.conftest import needs_pg
from tests.grpc_checks import threaded_stack

USERS = itertools.count()
TYPES = EventTypes({"purchase": 3.0, "click": 1.0, "view": 0.0, "dislike": -1.0, "skip": -0.3})


def test_weights_say_what_each_type_is() -> None:
    assert TYPES.is_history("purchase") and TYPES.is_history("rating")  # unknown: the default weight, 1.0
    assert not TYPES.is_history("view") and not TYPES.keeps_out("view")  # zero: logged, otherwise ignored
    assert TYPES.keeps_out("dislike") and TYPES.keeps_out("skip") and not TYPES.is_history("dislike")
    assert TYPES.keeps_out("hide") and not TYPES.is_history("hide") and TYPES.weight("hide") == 0.0
    assert EVERY_TYPE_POSITIVE.is_history("anything") and not EVERY_TYPE_POSITIVE.keeps_out("anything")
    assert EventTypes({"click": 1.0}, default_weight=-1.0).keeps_out("unknown")


@pytest.mark.parametrize(("values", "message"), [
    ({"event_types": {"hide": 1.0}}, "fixed meaning"),
    ({"event_types": {"click": float("nan")}}, "must be finite"),
    ({"event_types": {"it's": 1.0}}, "without quotes"),
    ({"weights": {}}, "unknown settings"),
])
def test_bad_event_type_settings_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EventTypes.from_dict(values)


def test_the_cluster_config_gives_the_gateways_and_the_loop_one_meaning_of_each_type(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text('bundle = "b"\ndb_path = "e.sqlite"\n[loop]\ndataset = "ml-100k"\n'
                    '[feedback]\ndefault_weight = 0.5\n[feedback.event_types]\ndislike = -1.0\npurchase = 3\n', "utf-8")
    config = ClusterConfig.from_file(path)
    assert config.feedback == EventTypes({"dislike": -1.0, "purchase": 3.0}, 0.5)
    assert config.loop is not None and config.loop.feedback == config.feedback


# ---- the stores ---------------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_pg)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventStore]:
    location = str(tmp_path / "events.sqlite") if request.param == "sqlite" else request.getfixturevalue("pg_schema")
    opened = open_event_store(location)
    yield opened
    opened.close()


def test_history_holds_positive_types_and_negatives_keep_items_out(store: EventStore) -> None:
    store.append([Event("u", "a", "click", timestamp_ms=1), Event("u", "b", "dislike", timestamp_ms=2),
                  Event("u", "c", "view", timestamp_ms=3), Event("u", "d", "purchase", timestamp_ms=4),
                  Event("u", "e", "hide", timestamp_ms=5), Event("u", "f", "skip", timestamp_ms=6),
                  Event("u", "g", "rating", timestamp_ms=7), Event("u", "b", "dislike", timestamp_ms=8)])
    assert store.recent_items("u", 10, TYPES) == ["a", "d", "g"]
    assert sorted(store.hidden_items("u", TYPES)) == ["b", "e", "f"]
    # Without weights every type but hide is history, as before types had weights.
    assert store.recent_items("u", 10) == ["a", "b", "c", "d", "f", "g", "b"]
    assert store.hidden_items("u") == ["e"]
    only_named = EventTypes({"purchase": 2.0, "dislike": -1.0}, default_weight=0.0)
    assert store.recent_items("u", 10, only_named) == ["d"]
    nothing_counts = EventTypes({}, default_weight=-1.0)
    assert store.recent_items("u", 10, nothing_counts) == []
    assert sorted(store.hidden_items("u", nothing_counts)) == ["a", "b", "c", "d", "e", "f", "g"]


# ---- over gRPC -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, grpc.Channel]]:
    with threaded_stack(tiny_bundle, tmp_path_factory.mktemp("types") / "events.sqlite", feedback=TYPES) as stack:
        yield stack


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(["click", "purchase", "view", "dislike", "skip", "hide", "rating"]),
                      min_size=1, max_size=12), seed=st.integers(0, 10**6))
def test_no_disliked_or_hidden_item_is_ever_returned_to_its_user(live, kinds: list[str], seed: int) -> None:
    gateway, channel = live
    stub = recommender_pb2_grpc.RecommenderStub(channel)
    user = f"typed-{next(USERS)}"  # hypothesis may draw one example twice: a new user each time
    shown = [i.item_id for i in stub.Recommend(pb.RecommendRequest(user_id=user, k=20), timeout=10).items]
    rng = np.random.default_rng(seed)
    events = [pb.Event(user_id=user, item_id=str(rng.choice(shown)), event_type=kind) for kind in kinds]
    stub.Feedback(pb.FeedbackRequest(events=events), timeout=10)
    kept_out = {e.item_id for e in events if TYPES.keeps_out(e.event_type)}
    history = [e.item_id for e in events if TYPES.is_history(e.event_type)]
    assert gateway.events.recent_items(user, 50, TYPES) == history
    for request in (pb.RecommendRequest(user_id=user, k=20), pb.RecommendRequest(user_id=user, page_size=10)):
        answer = {i.item_id for i in stub.Recommend(request, timeout=10).items}
        assert not kept_out & answer
    similar = stub.SimilarItems(pb.SimilarItemsRequest(item_ids=[shown[0]], k=30, user_id=user), timeout=10)
    assert not kept_out & {i.item_id for i in similar.items}


# ---- the loop's data set -----------------------------------------------------------------------------
def Logged(seq: int, user_id: str, item_id: str, event_type: str, value: float = 0.0) -> LoggedEvent:
    return LoggedEvent(seq, user_id, item_id, event_type, 0, value)


def test_the_loop_learns_from_positive_types_only() -> None:
    base = Dataset("d", ["u"], ["a", "b", "c", "d"], [np.asarray([0])], ["", "", "", ""])
    events = [Logged(1, "u", "b", "purchase"), Logged(2, "u", "c", "dislike"), Logged(3, "u", "d", "view"),
              Logged(4, "u", "a", "hide"), Logged(5, "u", "d", "click")]
    fed = with_feedback(base, events, None, TYPES)
    assert fed.dataset.sequences[0].tolist() == [0, 1, 3] and fed.stats.skipped_types == 3
    assert with_feedback(base, events).dataset.sequences[0].tolist() == [0, 1, 2, 3, 3]  # all but the hide


def test_the_loop_weighs_events_by_type_and_value_and_learns_dislikes_as_negatives() -> None:
    base = Dataset("d", ["u", "v"], ["a", "b", "c", "d"], [np.asarray([0]), np.asarray([1, 2])], [""] * 4)
    events = [Logged(1, "u", "b", "purchase", value=2.0), Logged(2, "u", "c", "dislike"), Logged(3, "u", "d", "click"),
              Logged(4, "v", "a", "skip"), Logged(5, "w", "a", "dislike"), Logged(6, "u", "a", "hide")]
    fed = with_feedback(base, events, None, TYPES)
    assert fed.dataset.weights is not None
    assert [w.tolist() for w in fed.dataset.weights] == [[1.0, 6.0, 1.0], [1.0, 1.0]]  # purchase 3.0 x value 2
    # Dislikes are each user's training negatives; a user known only by a dislike is not added.
    assert [n.tolist() for n in fed.dataset.negatives] == [[2], [0]] and fed.stats.dislikes == 3
    assert fed.dataset.user_ids == ["u", "v"]
    assert with_feedback(base, events).dataset.weights is None  # no weights configured: every event weighs 1
