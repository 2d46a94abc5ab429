"""What product pages call, over gRPC against the real services: SimilarItems, filters on
Recommend and SimilarItems, pages without repeats, and per-user hiding."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.server import Gateway
from protos.filters import filter_from_proto
from protos.recfunnel.v1 import recommender_pb2 as pb
from protos.recfunnel.v1 import recommender_pb2_grpc
from recdata.attributes import ItemAttributes
from recdata.bundle import load_bundle
from tests.grpc_checks import threaded_stack

PROPERTY_TESTS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def live(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, grpc.Channel]]:
    with threaded_stack(tiny_bundle, tmp_path_factory.mktemp("api") / "events.sqlite") as stack:
        yield stack


@pytest.fixture(scope="module")
def catalogue(tiny_bundle: Path) -> dict[str, ItemAttributes]:
    """The bundle's items; tests that upsert items add theirs."""
    bundle = load_bundle(tiny_bundle)
    return {item_id: bundle.attributes(n) for n, item_id in enumerate(bundle.item_ids)}


def stub(channel: grpc.Channel) -> recommender_pb2_grpc.RecommenderStub:
    return recommender_pb2_grpc.RecommenderStub(channel)


def refused(call, request) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)
    return caught.value


# ---- SimilarItems ------------------------------------------------------------------------------
def test_similar_items_are_like_the_given_ones_and_never_them(live) -> None:
    _, channel = live
    reply = stub(channel).SimilarItems(pb.SimilarItemsRequest(item_ids=["i3", "i4"], k=10, exclude_item_ids=["i5"]),
                                       timeout=10)
    ids = [i.item_id for i in reply.items]
    assert len(ids) == 10 == len(set(ids)) and not {"i3", "i4", "i5"} & set(ids)
    assert reply.model_version and reply.request_id and not reply.degraded
    assert {"sequential", "semantic"} <= {c for i in reply.items for c in i.channels}
    assert [i.score for i in reply.items] == sorted((i.score for i in reply.items), reverse=True)


def test_similar_items_for_a_user_leave_out_what_they_had(live) -> None:
    gateway, channel = live
    had = [f"i{n}" for n in range(40, 60)]
    stub(channel).Feedback(pb.FeedbackRequest(events=[pb.Event(user_id="reader", item_id=i) for i in had]))
    reply = stub(channel).SimilarItems(pb.SimilarItemsRequest(item_ids=["i41"], k=20, user_id="reader"), timeout=10)
    assert len(reply.items) == 20 and not set(had) & {i.item_id for i in reply.items}


def test_a_new_item_with_text_alone_gets_neighbours(live, catalogue) -> None:
    _, channel = live
    stub(channel).UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(
        item_id="fresh-1", text="The misty harbour #9000: a quiet story", tags=["topic1"])]), timeout=30)
    catalogue["fresh-1"] = ItemAttributes(("topic1",), {}, created_ms=1)
    reply = stub(channel).SimilarItems(pb.SimilarItemsRequest(item_ids=["fresh-1"], k=5), timeout=10)
    assert len(reply.items) == 5 and "fresh-1" not in {i.item_id for i in reply.items}
    assert any("semantic" in i.channels for i in reply.items)


def test_unknown_or_bad_similar_items_are_named(live) -> None:
    _, channel = live
    unknown = refused(stub(channel).SimilarItems, pb.SimilarItemsRequest(item_ids=["i1", "no-such-item"], k=5))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "no-such-item" in unknown.details()
    for bad, needle in [(pb.SimilarItemsRequest(item_ids=[], k=5), "1..100"),
                        (pb.SimilarItemsRequest(item_ids=["i1"] * 101, k=5), "1..100"),
                        (pb.SimilarItemsRequest(item_ids=["i1"], k=0), "1..1000"),
                        (pb.SimilarItemsRequest(item_ids=["i1"], k=5, user_id="x" * 300), "1..256")]:
        error = refused(stub(channel).SimilarItems, bad)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.details()


# ---- filters ------------------------------------------------------------------------------------
tags = st.sampled_from([f"topic{n}" for n in range(8)])
bound = st.one_of(st.none(), st.floats(0, 200, allow_nan=False))
filters = st.builds(
    pb.ItemFilter,
    tags_any=st.lists(tags, max_size=3), tags_none=st.lists(tags, max_size=2),
    ranges=st.lists(st.builds(lambda low, high: pb.NumberRange(property="price", min=low, max=high), bound, bound)
                    .filter(lambda r: not (r.HasField("min") and r.HasField("max") and r.min > r.max)), max_size=1),
    equals=st.lists(st.builds(lambda values: pb.PropertyEquals(property="brand", any_of=values),
                              st.lists(st.sampled_from([f"brand{n}" for n in range(20)]), min_size=1, max_size=6)),
                    max_size=1),
)


@PROPERTY_TESTS
@given(item_filter=filters, user=st.sampled_from(["u1", "u2", "stranger"]), k=st.integers(1, 30))
def test_no_answer_ever_holds_an_item_outside_its_filter(live, catalogue, item_filter, user, k) -> None:
    _, channel = live
    reference = filter_from_proto(item_filter)
    passing = {i for i, attributes in catalogue.items() if reference.passes(attributes)}
    reply = stub(channel).Recommend(pb.RecommendRequest(user_id=user, k=k, filter=item_filter), timeout=10)
    returned = {i.item_id for i in reply.items}
    assert returned <= passing
    if not reference.is_empty:
        assert reply.filter_passed == len(passing)
    similar = stub(channel).SimilarItems(pb.SimilarItemsRequest(item_ids=["i7"], k=k, filter=item_filter), timeout=10)
    assert {i.item_id for i in similar.items} <= passing - {"i7"}


def test_a_selective_filter_still_fills_k(live, catalogue) -> None:
    _, channel = live
    brand = pb.ItemFilter(equals=[pb.PropertyEquals(property="brand", any_of=["brand3"])])
    passing = [i for i, a in catalogue.items() if a.properties.get("brand") == "brand3"]
    assert 5 <= len(passing) <= 20  # about 5% of the catalogue
    for user in ("u1", "u5", "stranger"):
        reply = stub(channel).Recommend(pb.RecommendRequest(user_id=user, k=5, filter=brand), timeout=10)
        assert len(reply.items) == 5 and {i.item_id for i in reply.items} <= set(passing)


def test_filters_on_upserted_items_use_their_properties_and_time(live, catalogue) -> None:
    _, channel = live
    stub(channel).UpsertItems(pb.UpsertItemsRequest(items=[
        pb.Item(item_id="new-cheap", text="a bargain", properties={"price": pb.PropertyValue(number=0.5),
                                                                    "brand": pb.PropertyValue(text="acme")}),
        pb.Item(item_id="new-dear", text="a luxury", properties={"price": pb.PropertyValue(number=5000),
                                                                  "brand": pb.PropertyValue(text="acme")})]),
        timeout=30)
    catalogue["new-cheap"] = ItemAttributes((), {"price": 0.5, "brand": "acme"}, created_ms=1)
    catalogue["new-dear"] = ItemAttributes((), {"price": 5000.0, "brand": "acme"}, created_ms=1)
    acme = pb.ItemFilter(equals=[pb.PropertyEquals(property="brand", any_of=["acme"])],
                         ranges=[pb.NumberRange(property="price", max=1.0)], newer_than_ms=1_700_000_000_000)
    reply = stub(channel).Recommend(pb.RecommendRequest(user_id="u1", k=5, filter=acme), timeout=10)
    assert [i.item_id for i in reply.items] == ["new-cheap"] and reply.filter_passed == 1


@pytest.mark.parametrize(("item_filter", "needle"), [
    (pb.ItemFilter(ranges=[pb.NumberRange(property="price", min=5, max=1)]), "min=5.0 > max=1.0"),
    (pb.ItemFilter(ranges=[pb.NumberRange(property="", max=1)]), "1..64 bytes"),
    (pb.ItemFilter(equals=[pb.PropertyEquals(property="brand")]), "allowed 1..100"),
    (pb.ItemFilter(tags_any=["t"] * 33), "allowed 0..32"),
    (pb.ItemFilter(newer_than_ms=-1), ">= 0"),
])
def test_bad_filters_are_named(live, item_filter, needle) -> None:
    _, channel = live
    error = refused(stub(channel).Recommend, pb.RecommendRequest(user_id="u1", k=5, filter=item_filter))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.details()


# ---- pages ---------------------------------------------------------------------------------------
def test_ten_pages_under_concurrent_feedback_never_repeat(live) -> None:
    gateway, channel = live
    user = "pager"
    stub(channel).Feedback(pb.FeedbackRequest(events=[pb.Event(user_id=user, item_id=f"i{n}") for n in range(5)]))
    stop = threading.Event()
    clicked: list[str] = []

    def keep_clicking() -> None:  # the user interacts with items meanwhile, some of them not shown yet
        n = 100
        while not stop.is_set():
            item = f"i{n % 200}"
            stub(channel).Feedback(pb.FeedbackRequest(events=[pb.Event(user_id=user, item_id=item)]), timeout=10)
            clicked.append(item)
            n += 7

    clicker = threading.Thread(target=keep_clicking)
    clicker.start()
    served: list[str] = []
    token = ""
    try:
        for _ in range(10):
            reply = stub(channel).Recommend(pb.RecommendRequest(user_id=user, page_size=8, page_token=token),
                                            timeout=10)
            page = [i.item_id for i in reply.items]
            assert page and not set(page) & set(served)
            history = set(gateway.events.recent_items(user, 1000))
            before = set(clicked[: max(len(clicked) - 2, 0)])  # clicks surely logged before this page was cut
            assert not set(page) & (before & history)
            served += page
            token = reply.next_page_token
            assert token
    finally:
        stop.set()
        clicker.join()
    assert len(served) == len(set(served)) == 80 and not set(served) & {f"i{n}" for n in range(5)}


def test_paging_to_the_end_serves_every_passing_item_once(live, catalogue) -> None:
    _, channel = live
    item_filter = pb.ItemFilter(tags_any=["topic2"])
    passing = {i for i, a in catalogue.items() if "topic2" in a.tags}
    served: list[str] = []
    token = ""
    for _ in range(50):
        reply = stub(channel).Recommend(pb.RecommendRequest(user_id="u9", page_size=6, page_token=token,
                                                            filter=item_filter), timeout=10)
        served += [i.item_id for i in reply.items]
        token = reply.next_page_token
        if not token:
            break
    assert not token and len(served) == len(set(served))  # the last page says it is the last
    assert set(served) == passing and reply.filter_passed == len(passing)


def test_page_tokens_are_bound_to_their_request(live) -> None:
    _, channel = live
    first = stub(channel).Recommend(pb.RecommendRequest(user_id="u3", page_size=5), timeout=10)
    for bad, needle in [
        (pb.RecommendRequest(user_id="u4", page_size=5, page_token=first.next_page_token), "another user_id"),
        (pb.RecommendRequest(user_id="u3", page_size=5, page_token=first.next_page_token,
                             filter=pb.ItemFilter(tags_any=["topic1"])), "another user_id, filter"),
        (pb.RecommendRequest(user_id="u3", page_size=5, page_token="forged"), "unknown or expired"),
        (pb.RecommendRequest(user_id="u3", k=5, page_token=first.next_page_token), "without page_size"),
        (pb.RecommendRequest(user_id="u3", page_size=1001), "1..1000"),
    ]:
        error = refused(stub(channel).Recommend, bad)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.details()
    again = stub(channel).Recommend(pb.RecommendRequest(user_id="u3", page_size=5, page_token=first.next_page_token),
                                    timeout=10)
    assert len(again.items) == 5 and not {i.item_id for i in again.items} & {i.item_id for i in first.items}


# ---- hiding ----------------------------------------------------------------------------------------
def test_a_hidden_item_never_comes_back_to_its_user(live) -> None:
    gateway, channel = live
    user = "hider"
    shown = [i.item_id for i in stub(channel).Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=10).items]
    hidden = shown[:3]
    stub(channel).Feedback(pb.FeedbackRequest(events=[pb.Event(user_id=user, item_id=i, event_type="hide")
                                                      for i in hidden]))
    assert gateway.events.recent_items(user, 10) == []  # a hide is no interaction
    for _ in range(3):
        reply = stub(channel).Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=10)
        assert len(reply.items) == 10 and not set(hidden) & {i.item_id for i in reply.items}
    similar = stub(channel).SimilarItems(pb.SimilarItemsRequest(item_ids=[shown[5]], k=30, user_id=user), timeout=10)
    assert not set(hidden) & {i.item_id for i in similar.items}
    other = stub(channel).Recommend(pb.RecommendRequest(user_id="someone-else", k=10), timeout=10)
    assert set(hidden) & {i.item_id for i in other.items}  # hidden for that user only
    token, served = "", []
    for _ in range(5):
        reply = stub(channel).Recommend(pb.RecommendRequest(user_id=user, page_size=10, page_token=token), timeout=10)
        served += [i.item_id for i in reply.items]
        token = reply.next_page_token
    assert not set(hidden) & set(served)


# ---- user attributes ---------------------------------------------------------------------------------
def test_a_new_user_is_served_from_what_they_said_about_themselves(live, catalogue) -> None:
    gateway, channel = live
    plain = stub(channel).Recommend(pb.RecommendRequest(user_id="newcomer", k=10), timeout=10)
    reply = stub(channel).UpsertUsers(pb.UpsertUsersRequest(users=[pb.User(
        user_id="newcomer", properties={"favourite": pb.PropertyValue(text="topic5"),
                                        "age": pb.PropertyValue(number=31)}, text="likes quiet stories")]))
    assert reply.upserted == 1 and gateway.events.user_properties("newcomer") == {"favourite": "topic5", "age": 31.0}
    told = stub(channel).Recommend(pb.RecommendRequest(user_id="newcomer", k=10), timeout=10)
    fans = sum("topic5" in catalogue[i.item_id].tags for i in told.items)
    assert len(told.items) == 10 and fans > sum("topic5" in catalogue[i.item_id].tags for i in plain.items)
    assert stub(channel).DeleteUser(pb.DeleteUserRequest(user_id="newcomer")).events_removed == 0
    assert gateway.events.user_properties("newcomer") == {}  # erased with the user


@pytest.mark.parametrize(("users", "needle"), [
    ([], "allowed 1..1000"),
    ([pb.User(user_id="a"), pb.User(user_id="a")], "duplicate user_id"),
    ([pb.User(user_id="")], "user_id[0] is empty"),
    ([pb.User(user_id="a", properties={"age": pb.PropertyValue()})], "has no value"),
    ([pb.User(user_id="a", properties={"a=b": pb.PropertyValue(text="c")})], "holds '='"),
    ([pb.User(user_id="a", properties={"age": pb.PropertyValue(number=float("nan"))})], "must be finite"),
])
def test_bad_users_are_named_and_nothing_is_written(live, users, needle) -> None:
    gateway, channel = live
    error = refused(stub(channel).UpsertUsers, pb.UpsertUsersRequest(users=users))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.details()
    assert gateway.events.user_properties("a") == {}
