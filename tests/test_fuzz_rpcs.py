"""Property-based bad input on every public RPC: empty, huge, negative, odd Unicode,
duplicated and unknown values, NaN/inf numbers and bytes that are no protobuf at all.

The server must never crash and never answer INTERNAL (or anything else unexplained): each
call gets a valid answer or INVALID_ARGUMENT with a message, and a refused call writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.server import Gateway
from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc, versions_pb2, versions_pb2_grpc
from tests.grpc_checks import threaded_stack

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}

# Any Unicode a client can encode (lone surrogates cannot be sent as proto strings at all),
# weighted towards the edges: empty, control and zero-width characters, and very long.
unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
ids = st.one_of(
    unicode_text,
    st.sampled_from(["", " ", "\x00", "\u200b", "é" * 129, "x" * 256, "x" * 257, "i1", "i1", "-1", "NaN"]),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=250, max_size=400),
)
# Long inputs are built, not drawn: hypothesis draws only small collections itself.
id_lists = st.one_of(st.lists(ids, max_size=8), st.integers(995, 1005).map(lambda n: ["i1", "i2"] * (n // 2)))
int32s = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, 10, 1000, 1001, -1]))
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@pytest.fixture(scope="module")
def live(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, grpc.Channel]]:
    with threaded_stack(tiny_bundle, tmp_path_factory.mktemp("fuzz") / "events.sqlite") as stack:
        yield stack


def _code(call, request):  # type: ignore[no-untyped-def]
    try:
        return grpc.StatusCode.OK, call(request, timeout=30), ""
    except grpc.RpcError as error:
        return error.code(), None, error.details() or ""


def _check(code: grpc.StatusCode, details: str) -> None:
    assert code in ALLOWED, f"{code.name}: {details}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert details.strip(), "INVALID_ARGUMENT without a message"


floats64 = st.floats(allow_nan=True, allow_infinity=True)
property_names = st.one_of(ids, st.sampled_from(["price", "brand", "year"]))
tag_lists = st.one_of(st.lists(st.one_of(ids, st.sampled_from(["topic1", "topic2"])), max_size=4),
                      st.integers(31, 34).map(lambda n: ["topic1"] * n))
item_filters = st.builds(
    recommender_pb2.ItemFilter, tags_any=tag_lists, tags_all=tag_lists, tags_none=tag_lists,
    ranges=st.lists(st.builds(recommender_pb2.NumberRange, property=property_names,
                              min=st.one_of(st.none(), floats64), max=st.one_of(st.none(), floats64)), max_size=18),
    equals=st.lists(st.builds(recommender_pb2.PropertyEquals, property=property_names,
                              any_of=st.one_of(st.lists(ids, max_size=3),
                                               st.integers(99, 102).map(lambda n: ["brand1"] * n))), max_size=3),
    newer_than_ms=st.integers(-(2**63), 2**63 - 1))
page_tokens = st.one_of(st.just(""), ids, st.text(max_size=80))


@FUZZ
@given(user_id=ids, k=int32s, exclude=id_lists, context=id_lists, diversity=floats32, explain=st.booleans(),
       item_filter=st.one_of(st.none(), item_filters), page_size=st.one_of(st.just(0), int32s), page_token=page_tokens)
def test_recommend(live, user_id, k, exclude, context, diversity, explain, item_filter, page_size, page_token) -> None:
    gateway, channel = live
    request = recommender_pb2.RecommendRequest(user_id=user_id, k=k, exclude_item_ids=exclude,
                                               context_item_ids=context, diversity=diversity, explain=explain,
                                               filter=item_filter, page_size=page_size, page_token=page_token)
    code, reply, details = _code(recommender_pb2_grpc.RecommenderStub(channel).Recommend, request)
    _check(code, details)
    if code == grpc.StatusCode.OK:
        returned = [i.item_id for i in reply.items]
        assert len(returned) <= (page_size or k) and len(set(returned)) == len(returned)
        assert not set(returned) & set(exclude)


@FUZZ
@given(item_ids=st.one_of(id_lists, st.lists(st.sampled_from(["i1", "i2", "i3"]), max_size=4)), k=int32s,
       item_filter=st.one_of(st.none(), item_filters), exclude=id_lists, user_id=st.one_of(st.just(""), ids))
def test_similar_items(live, item_ids, k, item_filter, exclude, user_id) -> None:
    _, channel = live
    request = recommender_pb2.SimilarItemsRequest(item_ids=item_ids, k=k, filter=item_filter,
                                                  exclude_item_ids=exclude, user_id=user_id)
    code, reply, details = _code(recommender_pb2_grpc.RecommenderStub(channel).SimilarItems, request)
    if code == grpc.StatusCode.NOT_FOUND:  # ids the catalogue does not hold, named
        assert "unknown item ids" in details
        return
    _check(code, details)
    if code == grpc.StatusCode.OK:
        returned = [i.item_id for i in reply.items]
        assert len(returned) <= k and len(set(returned)) == len(returned)
        assert not set(returned) & (set(exclude) | set(item_ids))


events = st.builds(recommender_pb2.Event, user_id=ids, item_id=ids, event_type=st.one_of(unicode_text, ids),
                   value=floats32, timestamp_ms=st.integers(-(2**63), 2**63 - 1), event_id=ids, request_id=ids)


@FUZZ
@given(batch=st.one_of(st.lists(events, max_size=6),
                       st.integers(999, 1002).map(lambda n: [recommender_pb2.Event(user_id="u", item_id="i")] * n)))
def test_feedback(live, batch) -> None:
    gateway, channel = live
    before = gateway.events.count()
    code, reply, details = _code(recommender_pb2_grpc.RecommenderStub(channel).Feedback,
                                 recommender_pb2.FeedbackRequest(events=batch))
    _check(code, details)
    if code == grpc.StatusCode.OK:
        assert reply.accepted == len(batch)
        assert gateway.events.count() == before + reply.accepted - reply.duplicates
    else:
        assert gateway.events.count() == before  # a refused call writes nothing


property_values = st.one_of(st.builds(recommender_pb2.PropertyValue, number=floats64),
                            st.builds(recommender_pb2.PropertyValue, text=ids),
                            st.just(recommender_pb2.PropertyValue()))
items = st.builds(recommender_pb2.Item, item_id=ids,
                  text=st.one_of(unicode_text, st.integers(16_380, 16_400).map(lambda n: "é" * (n // 2))),
                  tags=st.one_of(st.lists(ids, max_size=4), st.integers(31, 34).map(lambda n: ["t"] * n)),
                  properties=st.one_of(st.dictionaries(property_names, property_values, max_size=3),
                                       st.integers(63, 66).map(lambda n: {f"p{m}": recommender_pb2.PropertyValue(
                                           number=m) for m in range(n)})),
                  created_ms=st.integers(-(2**63), 2**63 - 1),
                  # The tiny bundle fuses no vectors: any given one is refused, but never with INTERNAL.
                  vectors=st.one_of(st.just({}), st.dictionaries(
                      st.one_of(ids, st.just("image")), st.builds(recommender_pb2.FloatVector, values=st.one_of(
                          st.lists(floats32, max_size=8), st.integers(4095, 4098).map(lambda n: [0.5] * n))),
                      max_size=3)))


@FUZZ
@given(batch=st.lists(items, max_size=4))
def test_upsert_items(live, batch) -> None:
    _, channel = live
    code, reply, details = _code(recommender_pb2_grpc.RecommenderStub(channel).UpsertItems,
                                 recommender_pb2.UpsertItemsRequest(items=batch))
    _check(code, details)
    if code == grpc.StatusCode.OK:
        assert reply.upserted == len(batch) and reply.model_version


@FUZZ
@given(batch=st.lists(st.builds(recommender_pb2.User, user_id=ids, text=unicode_text, properties=st.one_of(
    st.dictionaries(property_names, property_values, max_size=3),
    st.integers(63, 66).map(lambda n: {f"p{m}": recommender_pb2.PropertyValue(number=m) for m in range(n)}))),
    max_size=4))
def test_upsert_users(live, batch) -> None:
    _, channel = live
    code, reply, details = _code(recommender_pb2_grpc.RecommenderStub(channel).UpsertUsers,
                                 recommender_pb2.UpsertUsersRequest(users=batch))
    _check(code, details)
    if code == grpc.StatusCode.OK:
        assert reply.upserted == len(batch)


@FUZZ
@given(item_ids=id_lists)
def test_delete_items(live, item_ids) -> None:
    _, channel = live
    code, reply, details = _code(recommender_pb2_grpc.RecommenderStub(channel).DeleteItems,
                                 recommender_pb2.DeleteItemsRequest(item_ids=item_ids))
    _check(code, details)
    if code == grpc.StatusCode.OK:
        assert 0 <= reply.deleted <= len(item_ids)


@FUZZ
@given(user_id=ids)
def test_delete_user(live, user_id) -> None:
    gateway, channel = live
    before = gateway.events.count()
    code, reply, details = _code(recommender_pb2_grpc.RecommenderStub(channel).DeleteUser,
                                 recommender_pb2.DeleteUserRequest(user_id=user_id))
    _check(code, details)
    if code == grpc.StatusCode.OK:
        assert reply.events_removed == before - gateway.events.count()
    else:
        assert gateway.events.count() == before  # a refused call erases nothing


@FUZZ
@given(bundle_path=st.one_of(ids, st.integers(4000, 5000).map(lambda n: "d/" * (n // 2)),
                             st.sampled_from(["/", "/tmp", "."])))
def test_swap_version_to_something_that_is_no_bundle(live, bundle_path) -> None:
    _, channel = live
    code, _, details = _code(versions_pb2_grpc.RolloutStub(channel).SwapVersion,
                             versions_pb2.SwapVersionRequest(bundle_path=bundle_path))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert details.strip()


RECOMMENDER_METHODS = ["Recommend", "Feedback", "UpsertItems", "DeleteItems", "DeleteUser", "SimilarItems",
                      "UpsertUsers"]


@FUZZ
@given(method=st.sampled_from(RECOMMENDER_METHODS), payload=st.binary(max_size=2000))
def test_bytes_that_are_no_protobuf(live, method, payload) -> None:
    """Raw bytes straight onto the wire, past any client-side encoding: invalid UTF-8 in string
    fields, truncated varints, wrong wire types."""
    _, channel = live
    call = channel.unary_unary(f"/recfunnel.v1.Recommender/{method}")  # bytes in, bytes out
    code, _, details = _code(call, payload)
    if method == "SimilarItems" and code == grpc.StatusCode.NOT_FOUND:
        assert "unknown item ids" in details  # bytes that parse as a request for items nobody has
        return
    _check(code, details)


def test_invalid_utf8_in_a_string_field_is_invalid_argument(live) -> None:
    _, channel = live
    # RecommendRequest{user_id: b"\xff\xfe", k: 5}: field 1, length 2, then field 2 varint 5.
    payload = b"\x0a\x02\xff\xfe\x10\x05"
    code, _, details = _code(channel.unary_unary("/recfunnel.v1.Recommender/Recommend"), payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert "UTF-8" in details or "parse" in details
