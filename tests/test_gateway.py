"""The gateway: funnel logic with failing stages, validation, the event log and the gRPC service."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import server as gateway_server
from gateway.backends import GrpcRanking, RankingReplicas
from gateway.config import GatewayConfig, Limits
from gateway.events import Event, EventLog
from gateway.funnel import Funnel, RecommendQuery, ShardAnswer, StageFailed, combine_channels, merge_shards
from gateway.validation import InvalidRequest, check_recommend
from protos.recfunnel.v1 import recall_pb2, recall_pb2_grpc, recommender_pb2, recommender_pb2_grpc
from recdata.attributes import NO_FILTER, ItemFilter
from recdata.channels import ITEM2ITEM_RECENT, ChannelQuery
from tests.grpc_checks import assert_health_and_reflection, free_port, serving_stack


class FakeShard:
    """A shard over a fixed list: proposes its items in order, minus exclusions."""

    def __init__(self, items: list[str], fail: bool = False, delay: float = 0.0):
        self.items, self.fail, self.delay = items, fail, delay
        self.calls: list[list[str]] = []
        self.queries: list[list[ChannelQuery]] = []

    async def search(self, queries: list[ChannelQuery], exclude: list[str], timeout: float,
                     model_version: str, item_filter: ItemFilter = NO_FILTER) -> ShardAnswer:
        self.calls.append(exclude)
        self.queries.append(queries)
        if self.fail:
            raise StageFailed("down")
        await asyncio.sleep(self.delay)
        left = [i for i in self.items if i not in exclude]
        return ShardAnswer({q.channel: [(i, 1.0 - n / 100) for n, i in enumerate(left[: q.k])] for q in queries}, "v1")


class FakeRanking:
    """Scores items by their number, so ranked order differs from recall order."""

    def __init__(self, fail_rank: bool = False):
        self.fail_rank = fail_rank

    async def encode(self, history: list[str], timeout: float, model_version: str
                     ) -> tuple[dict[str, np.ndarray], str]:
        return {"sequential": np.ones(4, np.float32)}, "v1"

    async def rank(self, history, candidates, k, diversity, explain_top, timeout, model_version, new_item_place=None):
        if self.fail_rank:
            raise StageFailed("ranker down")
        scored = [(i, float(i.removeprefix("i")), history[-explain_top:] if explain_top else []) for i, _ in candidates]
        return sorted(scored, key=lambda r: -r[1])[:k]


def funnel(shards, ranking=None) -> Funnel:
    return Funnel(shards, ranking or FakeRanking(), {"sequential": 10, "popular": 5}, explain_top=1)


def deadline(seconds: float = 1.0) -> float:
    return time.monotonic() + seconds


async def test_item2item_is_asked_for_neighbours_of_the_most_recent_items() -> None:
    shard = FakeShard([f"i{n}" for n in range(30)])
    budgets = {"sequential": 10, "item2item": 7, "popular": 5}
    history = [f"i{n}" for n in range(20, 28)]
    answer = await Funnel([shard], FakeRanking(), budgets).recommend(RecommendQuery("u", 5, history), deadline())
    asked = {q.channel: q for q in shard.queries[0]}
    assert asked["item2item"].k == 7 and asked["item2item"].item_ids == tuple(history[-ITEM2ITEM_RECENT:])
    assert asked["item2item"].vector is None and not asked["popular"].item_ids
    assert any("item2item" in r.channels for r in answer.items)
    # Without a history there is nothing to find neighbours of.
    await Funnel([shard], FakeRanking(), budgets).recommend(RecommendQuery("u", 5, []), deadline())
    assert "item2item" not in {q.channel for q in shard.queries[1]}


async def test_ranked_answer_filters_seen_and_excluded_and_honours_k() -> None:
    # Highest numbers first, so the seen and excluded items would top recall if not filtered.
    shards = [FakeShard([f"i{n}" for n in range(18, -1, -2)]), FakeShard([f"i{n}" for n in range(19, 0, -2)])]
    query = RecommendQuery("u", 4, history=["i19", "i17"], exclude_item_ids=["i18"], explain=True)
    answer = await funnel(shards).recommend(query, deadline())
    assert [r.item_id for r in answer.items] == ["i16", "i15", "i14", "i13"]
    assert not answer.degraded and answer.recall_coverage == 1.0
    assert all(r.because_item_ids == ["i17"] for r in answer.items)
    assert set(shards[0].calls[0]) == {"i17", "i18", "i19"}  # shards filter before their top-k


async def test_a_failed_shard_gives_a_degraded_partial_answer() -> None:
    shards = [FakeShard(["i1", "i2"]), FakeShard(["i3"], fail=True)]
    answer = await funnel(shards).recommend(RecommendQuery("u", 5, ["i9"]), deadline())
    assert answer.degraded and answer.recall_coverage == 0.5
    assert {r.item_id for r in answer.items} == {"i1", "i2"}


async def test_a_slow_shard_is_dropped_at_the_deadline() -> None:
    shards = [FakeShard(["i1"]), FakeShard(["i2"], delay=5.0)]

    class Slow(FakeShard):
        async def search(self, queries, exclude, timeout, model_version, item_filter=NO_FILTER):
            try:
                return await asyncio.wait_for(super().search(queries, exclude, timeout, model_version, item_filter),
                                              timeout)
            except TimeoutError as error:
                raise StageFailed("deadline") from error

    shards[1] = Slow(["i2"], delay=5.0)
    started = time.monotonic()
    answer = await funnel(shards).recommend(RecommendQuery("u", 5, ["i9"]), deadline(0.3))
    assert time.monotonic() - started < 1.0
    assert answer.degraded and answer.recall_coverage == 0.5 and answer.items[0].item_id == "i1"


async def test_ranker_failure_falls_back_to_recall_order() -> None:
    answer = await funnel([FakeShard(["i1", "i2", "i3"])], FakeRanking(fail_rank=True)).recommend(
        RecommendQuery("u", 3, ["i9"]), deadline())
    assert answer.degraded
    assert [r.item_id for r in answer.items] == ["i1", "i2", "i3"]
    assert [r.score for r in answer.items] == sorted((r.score for r in answer.items), reverse=True)


async def test_user_without_history_gets_popular_items_not_an_error() -> None:
    shard = FakeShard([f"i{n}" for n in range(30)])
    answer = await funnel([shard]).recommend(RecommendQuery("new", 20, []), deadline())
    assert len(answer.items) == 20 and not answer.degraded
    assert all(r.channels == ["popular"] for r in answer.items)


async def test_a_stage_the_remaining_budget_cannot_pay_for_is_skipped() -> None:
    class CountingRanking(FakeRanking):
        ranked = 0

        async def rank(self, *args):  # type: ignore[no-untyped-def]
            CountingRanking.ranked += 1
            return await super().rank(*args)

    f = funnel([FakeShard([f"i{n}" for n in range(20)])], CountingRanking())
    f.costs.seconds["rank"] = 0.5  # ranking has been taking 500 ms
    answer = await f.recommend(RecommendQuery("u", 5, ["i1"]), deadline(0.2))
    assert answer.skipped == ["rank"] and answer.degraded and len(answer.items) == 5
    assert CountingRanking.ranked == 0
    f.costs.seconds["encode"] = 0.5  # and encoding too: popularity alone fits
    answer = await f.recommend(RecommendQuery("u", 5, ["i1"]), deadline(0.2))
    assert answer.skipped == ["encode"] and answer.degraded and len(answer.items) == 5
    answer = await f.recommend(RecommendQuery("u", 5, ["i1"]), deadline(2.0))  # budget enough for every stage
    assert answer.skipped == [] and not answer.degraded and CountingRanking.ranked == 1


async def test_a_querys_new_item_place_reaches_the_ranker() -> None:
    places: list[int | None] = []

    class RecordingRanking(FakeRanking):
        async def rank(self, *args):  # type: ignore[no-untyped-def]
            places.append(args[7])
            return await super().rank(*args)

    f = funnel([FakeShard([f"i{n}" for n in range(20)])], RecordingRanking())
    await f.recommend(RecommendQuery("u", 5, ["i1"], new_item_place=2), deadline(2.0))  # an experiment variant's
    await f.recommend(RecommendQuery("u", 5, ["i1"]), deadline(2.0))
    assert places == [2, None]


def test_merge_keeps_each_item_once_with_its_best_score() -> None:
    a = ShardAnswer({"c": [("x", 0.9), ("y", 0.5)]}, "v")
    b = ShardAnswer({"c": [("y", 0.7), ("z", 0.1)]}, "v")
    assert merge_shards([a, b], {"c": 2}) == {"c": [("x", 0.9), ("y", 0.7)]}


@given(st.lists(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.floats(-1, 1)), max_size=8), max_size=4),
       st.integers(0, 10))
def test_merge_invariants(answers, budget) -> None:
    merged = merge_shards([ShardAnswer({"c": hits}, "v") for hits in answers], {"c": budget})["c"]
    ids = [i for i, _ in merged]
    assert len(ids) == len(set(ids)) <= budget
    assert [s for _, s in merged] == sorted((s for _, s in merged), reverse=True)
    best = {}
    for hits in answers:
        for i, s in hits:
            best[i] = max(best.get(i, -2.0), s)
    assert all(best[i] == s for i, s in merged)
    assert len(merged) == min(budget, len(best))


def test_combined_channels_interleave_and_keep_every_channel_score() -> None:
    combined = combine_channels({"a": [("x", 1.0), ("y", 0.5)], "b": [("z", 3.0), ("x", 2.0)]}, ["a", "b"])
    assert combined == [("x", {"a": 1.0, "b": 2.0}), ("z", {"b": 3.0}), ("y", {"a": 0.5})]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", 10, [], [], 0.0), "user_id is empty"),
        (("u" * 257, 10, [], [], 0.0), "allowed 1..256"),
        (("u", 0, [], [], 0.0), "k=0 out of range; allowed 1..1000"),
        (("u", 1001, [], [], 0.0), "allowed 1..1000"),
        (("u", 5, [""], [], 0.0), r"exclude_item_ids\[0\] is empty"),
        (("u", 5, ["x"] * 1001, [], 0.0), "allowed 0..1000"),
        (("u", 5, [], ["x"] * 1001, 0.0), "context_item_ids has 1001"),
        (("u", 5, [], [], 1.5), "diversity=1.5"),
        (("u", 5, [], [], float("nan")), "diversity=nan"),
    ],
)
def test_validation_names_the_field_and_range(args, message) -> None:
    with pytest.raises(InvalidRequest, match=message):
        check_recommend(*args, Limits())


def test_history_reads_do_not_wait_for_a_write_in_progress(tmp_path: Path) -> None:
    """The gateway reads histories on its event loop: a read must never wait for a write's
    commit, and must see only what is committed."""
    log = EventLog(tmp_path / "e.sqlite")
    log.append([Event("u", "a", timestamp_ms=1)])
    writer = sqlite3.connect(str(tmp_path / "e.sqlite"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a write transaction, holding the write lock, not yet committed
    writer.execute("INSERT INTO events (user_id, item_id, event_type, timestamp_ms) VALUES ('u', 'b', 'x', 2)")
    try:
        read: dict[str, list[str]] = {}
        reader = threading.Thread(target=lambda: read.setdefault("items", log.recent_items("u", 10)), daemon=True)
        with log._lock:  # and the log's own writer busy, as during a Feedback commit
            reader.start()
            reader.join(timeout=2)
            assert read.get("items") == ["a"]
        writer.execute("COMMIT")
        assert log.recent_items("u", 10) == ["a", "b"]
    finally:
        writer.close()
        log.close()


@pytest.fixture
async def gateway(tiny_bundle: Path, tmp_path: Path):
    async with serving_stack(tiny_bundle, tmp_path / "events.sqlite") as stack:
        yield stack


async def test_gateway_over_grpc(gateway) -> None:
    gw, shards, ranking = gateway
    await assert_health_and_reflection(gw.address, gateway_server.SERVICE_NAME)
    gw.events.append([Event("alice", f"i{n}", timestamp_ms=n + 1) for n in range(5)])
    async with grpc.aio.insecure_channel(gw.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        reply = await stub.Recommend(recommender_pb2.RecommendRequest(
            user_id="alice", k=7, exclude_item_ids=["i10", "i11"], explain=True), timeout=5)
        ids = [i.item_id for i in reply.items]
        assert len(ids) == 7 == len(set(ids))
        assert not set(ids) & {"i0", "i1", "i2", "i3", "i4", "i10", "i11"}
        assert reply.model_version and reply.request_id and not reply.degraded
        assert all(i.because_item_ids and i.channels for i in reply.items)

        cold = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="stranger", k=3), timeout=5)
        assert len(cold.items) == 3 and cold.model_version
        context = await stub.Recommend(recommender_pb2.RecommendRequest(
            user_id="stranger", k=3, context_item_ids=["i7"]), timeout=5)
        assert "i7" not in [i.item_id for i in context.items]

        for bad in [recommender_pb2.RecommendRequest(user_id="alice", k=0),
                    recommender_pb2.RecommendRequest(user_id="", k=5)]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Recommend(bad, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        accepted = await stub.Feedback(recommender_pb2.FeedbackRequest(events=[
            recommender_pb2.Event(user_id="alice", item_id=i, event_type="click") for i in ids[:3]]), timeout=5)
        assert accepted.accepted == 3
        after = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="alice", k=7), timeout=5)
        assert not set(ids[:3]) & {i.item_id for i in after.items}  # feedback is history at once
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Feedback(recommender_pb2.FeedbackRequest(events=[
                recommender_pb2.Event(user_id="alice", item_id="")]), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert gw.events.count() == 8  # the rejected call wrote nothing


async def test_delete_user_erases_the_history_answers_what_it_removed_and_is_idempotent(gateway) -> None:
    gw, _, _ = gateway
    async with grpc.aio.insecure_channel(gw.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        await stub.Feedback(recommender_pb2.FeedbackRequest(events=[
            recommender_pb2.Event(user_id=user, item_id=f"i{n}") for n in range(3) for user in ("leaver", "stayer")]))
        assert gw.events.recent_items("leaver", 10) == ["i0", "i1", "i2"]
        first = await stub.DeleteUser(recommender_pb2.DeleteUserRequest(user_id="leaver"))
        again = await stub.DeleteUser(recommender_pb2.DeleteUserRequest(user_id="leaver"))
        assert (first.events_removed, again.events_removed) == (3, 0)
        assert gw.events.recent_items("leaver", 10) == [] and len(gw.events.recent_items("stayer", 10)) == 3
        reply = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="leaver", k=5))
        assert len(reply.items) == 5  # served as a user without history
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.DeleteUser(recommender_pb2.DeleteUserRequest(user_id="x" * 257))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1..256" in (refused.value.details() or "")


async def test_every_recommend_gets_a_request_id_and_one_structured_log_line(gateway, caplog) -> None:
    gw, _, _ = gateway
    gw.events.append([Event("alice", f"i{n}", timestamp_ms=n + 1) for n in range(3)])
    caplog.set_level(logging.INFO, logger="recfunnel.requests")
    async with grpc.aio.insecure_channel(gw.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        replies = [await stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=4), timeout=5)
                   for user in ("alice", "stranger")]

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "recfunnel.requests"]
    assert [line["request_id"] for line in lines] == [reply.request_id for reply in replies]
    assert len({reply.request_id for reply in replies}) == 2
    alice = lines[0]
    assert alice["user_id"] == "alice" and alice["history"] == 3 and alice["returned"] == 4
    assert alice["model_version"] == replies[0].model_version and alice["degraded"] is False
    assert set(alice["stages_ms"]) == {"encode", "recall", "rank"} and alice["ms"] > 0


async def test_gateway_survives_a_dead_shard_and_a_dead_ranker(gateway) -> None:
    gw, shards, ranking = gateway
    gw.events.append([Event("bob", "i3")])
    async with grpc.aio.insecure_channel(gw.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        await shards[1].stop(0)
        reply = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="bob", k=5), timeout=5)
        assert reply.degraded and reply.recall_coverage == pytest.approx(0.5) and len(reply.items) == 5
        await ranking.stop(0)
        reply = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="bob", k=5), timeout=5)
        assert reply.degraded and len(reply.items) == 5


async def test_ranking_replicas_hand_a_failed_call_to_the_next_and_load_versions_on_all(
        gateway, tiny_bundle: Path) -> None:
    _, _, ranking = gateway
    dead = GrpcRanking(f"127.0.0.1:{free_port()}")  # nothing listens there: refused at once
    replicas = RankingReplicas([dead, GrpcRanking(ranking.address)])
    try:
        for _ in range(4):  # round-robin starts on the dead replica every other call
            vectors, version = await replicas.encode(["i1", "i2"], timeout=5)
            assert version and vectors
        replicas.retarget([ranking.address, ranking.address])
        assert replicas.addresses == [ranking.address] * 2
        assert await replicas.load_version(str(tiny_bundle), timeout=30) == version
        with pytest.raises(StageFailed, match="UNAVAILABLE"):  # every replica down
            await RankingReplicas([GrpcRanking(f"127.0.0.1:{free_port()}")]).encode(["i1"], timeout=5)
    finally:
        await replicas.close()


async def test_upserted_items_are_recommendable_at_once_and_deleted_ones_never(gateway, tiny_dataset) -> None:
    gw, _, _ = gateway
    history = [tiny_dataset.item_ids[i] for i in tiny_dataset.sequences[0][-5:]]
    gw.events.append([Event("carol", item, timestamp_ms=n + 1) for n, item in enumerate(history)])
    latest_text = tiny_dataset.item_texts[tiny_dataset.sequences[0][-1]]
    async with grpc.aio.insecure_channel(gw.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        started = time.monotonic()
        reply = await stub.UpsertItems(recommender_pb2.UpsertItemsRequest(items=[
            recommender_pb2.Item(item_id="brand-new", text=latest_text + " (new edition)")]), timeout=10)
        assert reply.upserted == 1 and reply.model_version
        answer = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="carol", k=50), timeout=5)
        assert time.monotonic() - started < 1.0
        found = {i.item_id: list(i.channels) for i in answer.items}
        assert "semantic" in found.get("brand-new", []), "a new item reaches users through its text"

        top = answer.items[0].item_id
        deleted = await stub.DeleteItems(recommender_pb2.DeleteItemsRequest(item_ids=[top, "brand-new"]), timeout=5)
        assert deleted.deleted == 2
        for user in ("carol", "stranger"):
            again = await stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=100), timeout=5)
            assert not {top, "brand-new"} & {i.item_id for i in again.items}

        for bad in [recommender_pb2.UpsertItemsRequest(),
                    recommender_pb2.UpsertItemsRequest(items=[recommender_pb2.Item(item_id="", text="x")]),
                    recommender_pb2.UpsertItemsRequest(items=[recommender_pb2.Item(item_id="x", text="y" * 20000)]),
                    recommender_pb2.UpsertItemsRequest(items=[recommender_pb2.Item(item_id="x"),
                                                              recommender_pb2.Item(item_id="x")])]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.UpsertItems(bad, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.DeleteItems(recommender_pb2.DeleteItemsRequest(item_ids=[]), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


BAD_REQUESTS = [
    ("Recommend", recommender_pb2.RecommendRequest(user_id="u", k=1001), r"k=1001 out of range; allowed 1\.\.1000"),
    ("Recommend", recommender_pb2.RecommendRequest(user_id="u", k=5, diversity=-0.1), r"allowed 0\.0\.\.1\.0"),
    ("Recommend", recommender_pb2.RecommendRequest(user_id="u", k=5, exclude_item_ids=["x"] * 1001),
     r"exclude_item_ids has 1001 entries; allowed 0\.\.1000"),
    ("Recommend", recommender_pb2.RecommendRequest(user_id="u" * 300, k=5), r"user_id is 300 bytes; allowed 1\.\.256"),
    ("Feedback", recommender_pb2.FeedbackRequest(), r"events has 0 entries; allowed 1\.\.1000"),
    ("Feedback", recommender_pb2.FeedbackRequest(events=[recommender_pb2.Event(user_id="u", item_id="i",
                                                                                 value=float("inf"))]),
     r"events\[0\]\.value=inf must be a finite number"),
    ("UpsertItems", recommender_pb2.UpsertItemsRequest(items=[recommender_pb2.Item(item_id="n", text="t")] * 2),
     "duplicate item_id"),
    ("UpsertItems", recommender_pb2.UpsertItemsRequest(items=[recommender_pb2.Item(item_id="n", tags=["t"] * 33)]),
     r"items\[0\]\.tags has 33 entries; allowed 0\.\.32"),
    ("DeleteItems", recommender_pb2.DeleteItemsRequest(item_ids=[""]), r"item_ids\[0\] is empty"),
]


@pytest.mark.parametrize(("method", "request_message", "message"), BAD_REQUESTS,
                         ids=[f"{m}-{n}" for n, (m, _, _) in enumerate(BAD_REQUESTS)])
async def test_bad_input_is_invalid_argument_and_changes_nothing(gateway, method, request_message, message) -> None:
    gw, shards, _ = gateway

    async def catalogue_sizes() -> list[int]:
        sizes = []
        for shard in shards:
            async with grpc.aio.insecure_channel(shard.address) as channel:
                info = await recall_pb2_grpc.RecallStub(channel).ShardInfo(recall_pb2.ShardInfoRequest(), timeout=5)
                sizes.append(info.channels[0].items)
        return sizes

    before = await catalogue_sizes()
    async with grpc.aio.insecure_channel(gw.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await getattr(stub, method)(request_message, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() is not None
        assert re.search(message, caught.value.details() or ""), caught.value.details()
        assert gw.events.count() == 0
    # Nothing was upserted or deleted either: every shard holds the items it held.
    assert await catalogue_sizes() == before


async def test_oversized_messages_are_refused_by_size(gateway, tmp_path: Path) -> None:
    _, shards, ranking = gateway
    small = await gateway_server.start(GatewayConfig(
        recall_addresses=tuple(s.address for s in shards), ranking_addresses=(ranking.address,),
        db_path=tmp_path / "small.sqlite", port=0, limits=Limits(max_message_bytes=4096)))
    try:
        async with grpc.aio.insecure_channel(small.address) as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.UpsertItems(recommender_pb2.UpsertItemsRequest(
                    items=[recommender_pb2.Item(item_id="big", text="x" * 5000)]), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "UpsertItems request is 5" in (caught.value.details() or "")
            assert "allowed up to 4096" in (caught.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Feedback(recommender_pb2.FeedbackRequest(events=[
                    recommender_pb2.Event(user_id="u", item_id=f"item-{n}") for n in range(400)]), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert small.events.count() == 0
    finally:
        await small.stop(0)


class RecordingObserver:
    """A GatewayObserver that keeps what it heard."""

    def __init__(self) -> None:
        self.answers: list[tuple[str, bool]] = []
        self.refusals: list[tuple[str, str]] = []
        self.events: list[tuple[int, int]] = []

    def answered(self, method: str, seconds: float, degraded: bool) -> None:
        assert 0 < seconds < 30
        self.answers.append((method, degraded))

    def refused(self, method: str, status: str) -> None:
        self.refusals.append((method, status))

    def feedback(self, written: int, duplicates: int) -> None:
        self.events.append((written, duplicates))


async def test_the_observer_hears_every_public_call(tiny_bundle: Path, tmp_path: Path) -> None:
    seen = RecordingObserver()
    async with serving_stack(tiny_bundle, tmp_path / "events.sqlite", observer=seen) as (gw, shards, _), \
            grpc.aio.insecure_channel(gw.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        await stub.Recommend(recommender_pb2.RecommendRequest(user_id="u", k=3), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Recommend(recommender_pb2.RecommendRequest(user_id="u", k=0), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):  # bytes that are no RecommendRequest
            await channel.unary_unary("/recfunnel.v1.Recommender/Recommend")(b"\x0a\x02\xff\xfe", timeout=5)
        feedback = recommender_pb2.FeedbackRequest(events=[
            recommender_pb2.Event(user_id="u", item_id="i1", event_id="e1"),
            recommender_pb2.Event(user_id="u", item_id="i2", event_id="e2")])
        await stub.Feedback(feedback, timeout=5)
        await stub.Feedback(feedback, timeout=5)
        await shards[1].stop(0)
        await stub.Recommend(recommender_pb2.RecommendRequest(user_id="u", k=3), timeout=5)
    assert seen.answers == [("Recommend", False), ("Feedback", False), ("Feedback", False), ("Recommend", True)]
    assert seen.refusals == [("Recommend", "INVALID_ARGUMENT"), ("Recommend", "INVALID_ARGUMENT")]
    assert seen.events == [(2, 0), (0, 2)]


async def test_a_second_gateway_shares_the_first_ones_port(gateway, tmp_path: Path) -> None:
    """Several gateway processes on one node listen on one fixed port (gRPC sets SO_REUSEPORT)."""
    gw, shards, ranking = gateway
    port = int(gw.address.rsplit(":", 1)[1])
    second = await gateway_server.start(GatewayConfig(
        recall_addresses=tuple(s.address for s in shards), ranking_addresses=(ranking.address,),
        db_path=tmp_path / "events.sqlite", port=port))
    try:
        assert second.address == gw.address
        for n in range(10):  # new connections each time; whichever gateway takes one answers it
            async with grpc.aio.insecure_channel(gw.address) as channel:
                reply = await recommender_pb2_grpc.RecommenderStub(channel).Recommend(
                    recommender_pb2.RecommendRequest(user_id=f"someone-{n}", k=3), timeout=5)
                assert len(reply.items) == 3
    finally:
        await second.stop(0)
