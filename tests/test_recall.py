"""Recall shards: partitioning, exact merge equivalence, exclusions, validation and the gRPC service."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.recall import RecallBenchConfig, clustered_catalogue, run_recall_bench, user_queries
from gateway.backends import GrpcRecall
from gateway.funnel import ShardAnswer, StageFailed, merge_shards
from protos.recfunnel.v1 import recall_pb2
from recdata.bundle import load_bundle
from recdata.channels import ITEM2ITEM, POPULAR, SEMANTIC, SEQUENTIAL, ChannelQuery, popular_scores, shard_of
from retrieval import server as recall_server
from retrieval.config import RecallConfig
from retrieval.index import build_index, recall_at_k
from retrieval.shard import InvalidQuery, RecallShard
from tests.grpc_checks import assert_health_and_reflection


def shards(bundle: Path, n: int) -> list[RecallShard]:
    b = load_bundle(bundle)
    return [RecallShard(b, RecallConfig(bundle=bundle, shard_id=s, num_shards=n)) for s in range(n)]


def test_shards_partition_the_catalogue(tiny_bundle: Path) -> None:
    parts = shards(tiny_bundle, 3)
    owned = [label for p in parts for label in p.item_index.values()]
    assert sorted(owned) == list(range(200))
    assert all(p.size > 30 for p in parts)
    assert shard_of("i17", 3) == shard_of("i17", 3)


@pytest.mark.parametrize("channel", [SEQUENTIAL, SEMANTIC])
def test_merged_shards_equal_one_unsharded_index(tiny_bundle: Path, channel: str) -> None:
    single = shards(tiny_bundle, 1)[0]
    parts = shards(tiny_bundle, 3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        vector = rng.normal(size=single.dims[channel]).astype(np.float32)
        query = [ChannelQuery(channel, 25, vector)]
        expected = single.search(query)[channel]
        merged = merge_shards([ShardAnswer(p.search(query), "v") for p in parts], {channel: 25})[channel]
        assert [i for i, _ in merged] == [i for i, _ in expected]
        np.testing.assert_allclose([s for _, s in merged], [s for _, s in expected], rtol=1e-5)


def test_excluded_items_never_come_back_and_k_is_still_filled(tiny_bundle: Path) -> None:
    shard = shards(tiny_bundle, 1)[0]
    vector = load_bundle(tiny_bundle).arrays[SEQUENTIAL][0]
    first = [i for i, _ in shard.search([ChannelQuery(SEQUENTIAL, 10, vector)])[SEQUENTIAL]]
    again = shard.search([ChannelQuery(SEQUENTIAL, 10, vector), ChannelQuery(POPULAR, 10)], first)
    assert len(again[SEQUENTIAL]) == 10 and not set(first) & {i for i, _ in again[SEQUENTIAL]}
    assert len(again[POPULAR]) == 10 and not set(first) & {i for i, _ in again[POPULAR]}


def test_popular_channel_is_ordered_by_popularity(tiny_bundle: Path) -> None:
    shard = shards(tiny_bundle, 1)[0]
    scores = [s for _, s in shard.search([ChannelQuery(POPULAR, 50)])[POPULAR]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (ChannelQuery("nope", 5), "unknown"),
        (ChannelQuery(POPULAR, 0), "out of range 1..10000"),
        (ChannelQuery(POPULAR, 10_001), "out of range 1..10000"),
        (ChannelQuery(SEQUENTIAL, 5, np.zeros(7, np.float32)), r"shape \(32,\)"),
        (ChannelQuery(SEQUENTIAL, 5, None), r"shape \(32,\)"),
        (ChannelQuery(SEMANTIC, 5, np.full(384, np.nan, np.float32)), "NaN"),
        (ChannelQuery(SEMANTIC, 5, np.full(384, np.inf, np.float32)), "infinite"),
    ],
)
def test_bad_queries_are_named(tiny_bundle: Path, query: ChannelQuery, message: str) -> None:
    with pytest.raises(InvalidQuery, match=message):
        shards(tiny_bundle, 1)[0].search([query])


async def test_recall_service_over_grpc(tiny_bundle: Path) -> None:
    handle = await recall_server.start(RecallConfig(bundle=tiny_bundle, shard_id=1, num_shards=2))
    client = GrpcRecall(handle.address)
    try:
        await assert_health_and_reflection(handle.address, recall_server.SERVICE_NAME)
        vector = np.ones(32, np.float32) / np.sqrt(32)
        reply = await client.search([ChannelQuery(SEQUENTIAL, 5, vector), ChannelQuery(POPULAR, 3)], [], 5.0, "")
        assert {c: len(hits) for c, hits in reply.hits.items()} == {SEQUENTIAL: 5, POPULAR: 3}
        info = await client.stub.ShardInfo(recall_pb2.ShardInfoRequest(), timeout=5)
        assert info.shard_id == 1 and info.num_shards == 2 and info.model_version == reply.model_version

        for bad, needle in [
            (recall_pb2.ChannelQuery(channel=SEQUENTIAL, k=5), "shape"),
            (recall_pb2.ChannelQuery(channel=POPULAR, k=-1), "k=-1"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.stub.Search(recall_pb2.SearchRequest(queries=[bad]), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert needle in caught.value.details()
        with pytest.raises(StageFailed, match="FAILED_PRECONDITION"):
            await client.search([ChannelQuery(POPULAR, 3)], [], 5.0, model_version="other")
    finally:
        await client.close()
        await handle.stop(0)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_added_items_are_found_and_removed_items_never_return(tiny_bundle: Path, kind: str) -> None:
    shard = RecallShard(load_bundle(tiny_bundle), RecallConfig(bundle=tiny_bundle, index_kind=kind))
    rng = np.random.default_rng(1)
    vectors = {SEQUENTIAL: unit_rows(rng, 2, 32), SEMANTIC: unit_rows(rng, 2, 384)}
    assert shard.add_items(["new-a", "new-b"], vectors) == 2
    hits = shard.search([ChannelQuery(SEMANTIC, 1, vectors[SEMANTIC][0])])[SEMANTIC]
    assert hits[0][0] == "new-a" and hits[0][1] == pytest.approx(1.0, abs=1e-4)
    assert "new-b" in [i for i, _ in shard.search([ChannelQuery(POPULAR, 500)])[POPULAR]]

    # Replacing an item moves it to its new vector and keeps it once.
    moved = {SEQUENTIAL: unit_rows(rng, 1, 32), SEMANTIC: unit_rows(rng, 1, 384)}
    shard.add_items(["new-a"], moved)
    hits = shard.search([ChannelQuery(SEMANTIC, 5, moved[SEMANTIC][0])])[SEMANTIC]
    assert hits[0][0] == "new-a" and [i for i, _ in hits].count("new-a") == 1

    assert shard.remove_items(["new-a", "i3", "not-here"]) == 2
    for channel, vector in ((SEMANTIC, moved[SEMANTIC][0]), (SEQUENTIAL, moved[SEQUENTIAL][0])):
        found = [i for i, _ in shard.search([ChannelQuery(channel, 250, vector)])[channel]]
        assert "new-a" not in found and "i3" not in found
    assert "i3" not in [i for i, _ in shard.search([ChannelQuery(POPULAR, 500)])[POPULAR]]


def test_add_items_rejects_bad_vectors(tiny_bundle: Path) -> None:
    shard = shards(tiny_bundle, 1)[0]
    with pytest.raises(InvalidQuery, match=r"shape \(1, 384\)"):
        shard.add_items(["x"], {SEQUENTIAL: np.zeros((1, 32), np.float32), SEMANTIC: np.zeros((1, 3), np.float32)})
    with pytest.raises(InvalidQuery, match="NaN"):
        shard.add_items(["x"], {SEQUENTIAL: np.full((1, 32), np.nan, np.float32),
                                SEMANTIC: np.zeros((1, 384), np.float32)})
    with pytest.raises(InvalidQuery, match="distinct"):
        shard.add_items(["x", "x"], {})


def test_searches_during_upserts_and_deletes_never_fail(tiny_bundle: Path) -> None:
    import threading

    shard = shards(tiny_bundle, 1)[0]
    rng = np.random.default_rng(2)
    errors: list[BaseException] = []
    stop = threading.Event()

    def search_loop() -> None:
        query = [ChannelQuery(SEQUENTIAL, 20, unit_rows(rng, 1, 32)[0]), ChannelQuery(POPULAR, 20)]
        while not stop.is_set():
            try:
                result = shard.search(query)
                assert len(result[SEQUENTIAL]) == 20 and len(result[POPULAR]) == 20
            except BaseException as error:  # noqa: BLE001 - collected and re-raised in the test thread
                errors.append(error)
                return

    readers = [threading.Thread(target=search_loop) for _ in range(3)]
    for thread in readers:
        thread.start()
    for n in range(200):
        ids = [f"live-{n}-{j}" for j in range(3)]
        shard.add_items(ids, {SEQUENTIAL: unit_rows(rng, 3, 32), SEMANTIC: unit_rows(rng, 3, 384)})
        shard.remove_items(ids[:2])
    stop.set()
    for thread in readers:
        thread.join()
    assert not errors
    assert shard.size == 200 + 200


def test_auto_index_is_exact_when_small_and_tuned_ann_when_large() -> None:
    vectors, topic = clustered_catalogue(20_000, 32, 100, seed=0)
    ids = np.arange(len(vectors))
    budget = 1000 * 32 * 4  # a thousand 32-d vectors
    small, small_report = build_index(vectors[:1000], ids[:1000], "auto", exact_scan_bytes=budget, use_gpu=False)
    assert small_report.kind == "flat" and small_report.recall_at_k == 1.0 and small.ntotal == 1000
    # The same items at twice the width scan twice the bytes: approximate.
    wide = np.hstack([vectors[:1000], vectors[:1000]]) / np.sqrt(2)
    assert build_index(wide, ids[:1000], "auto", exact_scan_bytes=budget, use_gpu=False)[1].kind == "ivf"

    index, report = build_index(vectors, ids, "auto", exact_scan_bytes=budget, use_gpu=False, target_recall=0.95)
    assert report.kind == "ivf" and report.recall_at_k >= 0.95 and report.bytes > 0
    assert 1 <= report.params["nprobe"] <= report.params["nlist"]
    # Held-out queries of the same kind reach about the tuned recall too.
    queries = user_queries(vectors, topic, 100, seed=5)
    exact, _ = build_index(vectors, ids, "flat", use_gpu=False)
    _, truth = exact.search(queries, 100)
    _, found = index.search(queries, 100)
    assert recall_at_k(found, truth) >= 0.9

    compressed, pq_report = build_index(vectors, ids, "ivfpq", use_gpu=False)
    assert pq_report.kind == "ivfpq" and pq_report.bytes < report.bytes / 3 and compressed.ntotal == len(vectors)
    assert 0.3 < pq_report.recall_at_k <= 1.0


def test_recall_bench_reports_every_figure() -> None:
    report = run_recall_bench(RecallBenchConfig(items=4000, dim=16, shards=3, kinds=("ivf", "hnsw"), queries=50,
                                                single_seconds=0.05, upserts=3))
    assert report["sharded"]["topk_equal_to_single"] is True
    assert report["exact"]["qps_single"] > 0 and report["exact"]["qps_batch"] > 0
    for kind in ("ivf", "hnsw"):
        entry = report["indexes"][kind]
        assert 0 < entry["recall_at_100"] <= 1 and entry["build_s"] >= 0 and entry["bytes"] > 0
        assert entry["upsert_to_searchable_ms"]["max_ms"] > 0


def test_item2item_proposes_neighbours_of_recent_items_owned_by_the_shard(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    neighbours, scores = bundle.arrays["item2item_ids"], bundle.arrays["item2item_scores"]
    single, parts = shards(tiny_bundle, 1)[0], shards(tiny_bundle, 3)
    recent = ("i4", "i9", "i17")
    query = [ChannelQuery(ITEM2ITEM, 15, item_ids=recent)]
    expected = single.search(query)[ITEM2ITEM]
    assert len(expected) == 15
    # The latest item's strongest neighbour is proposed, and scores fall.
    top_of_latest = bundle.item_ids[int(neighbours[17, 0])]
    assert scores[17, 0] > 0 and top_of_latest in [i for i, _ in expected]
    assert [s for _, s in expected] == sorted((s for _, s in expected), reverse=True)
    # Each shard returns only what it owns; merged they equal the single shard.
    for n, part in enumerate(parts):
        assert all(shard_of(i, 3) == n for i, _ in part.search(query)[ITEM2ITEM])
    merged = merge_shards([ShardAnswer(p.search(query), "v") for p in parts], {ITEM2ITEM: 15})[ITEM2ITEM]
    assert [i for i, _ in merged] == [i for i, _ in expected]
    # Excluded and deleted items never come back; unknown ids only add nothing.
    first = expected[0][0]
    assert first not in [i for i, _ in single.search(query, [first])[ITEM2ITEM]]
    single.remove_items([expected[1][0]])
    again = single.search([ChannelQuery(ITEM2ITEM, 15, item_ids=("never-seen", *recent))])[ITEM2ITEM]
    assert expected[1][0] not in [i for i, _ in again]


def test_item2item_needs_recent_items(tiny_bundle: Path) -> None:
    shard = shards(tiny_bundle, 1)[0]
    with pytest.raises(InvalidQuery, match=r"1\.\.100 recent item_ids, got 0"):
        shard.search([ChannelQuery(ITEM2ITEM, 5)])
    with pytest.raises(InvalidQuery, match="got 101"):
        shard.search([ChannelQuery(ITEM2ITEM, 5, item_ids=tuple(f"i{n}" for n in range(101)))])


def test_popular_channel_blends_all_time_and_recent_popularity(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    blended = popular_scores(bundle.arrays["popularity"], bundle.arrays["recent_popularity"],
                             bundle.manifest["recent_share"])
    shard = shards(tiny_bundle, 1)[0]
    top = [i for i, _ in shard.search([ChannelQuery(POPULAR, 10)])[POPULAR]]
    assert top == [bundle.item_ids[n] for n in np.argsort(-blended, kind="stable")[:10]]
    assert bundle.arrays["recent_popularity"].sum() > 0


def test_shards_tune_their_indexes_on_the_bundles_real_queries(tiny_bundle: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Training writes real query vectors into the bundle; each shard's approximate index is
    tuned on them, not on query-like mixes of its items."""
    import retrieval.shard as shard_module
    from recdata.channels import tuning_queries_name

    bundle = load_bundle(tiny_bundle)
    for channel in (SEQUENTIAL, SEMANTIC):
        queries = bundle.arrays[tuning_queries_name(channel)]
        assert queries.shape[0] > 0 and queries.shape[1] == bundle.arrays[channel].shape[1]
    tuned_on: dict[int, np.ndarray | None] = {}

    def recording_build(vectors: np.ndarray, ids: np.ndarray, *args, queries=None, **kwargs):  # type: ignore[no-untyped-def]
        tuned_on[vectors.shape[1]] = queries
        return build_index(vectors, ids, *args, queries=queries, **kwargs)

    monkeypatch.setattr(shard_module, "build_index", recording_build)
    RecallShard(bundle, RecallConfig(bundle=tiny_bundle, shard_id=0, num_shards=2, index_kind="ivf"))
    for channel in (SEQUENTIAL, SEMANTIC):
        np.testing.assert_array_equal(tuned_on[bundle.arrays[channel].shape[1]],
                                      bundle.arrays[tuning_queries_name(channel)])


async def test_a_search_with_less_budget_left_than_it_takes_is_not_started(tiny_bundle: Path) -> None:
    handle = await recall_server.start(RecallConfig(bundle=tiny_bundle, shard_id=0, num_shards=1))
    client = GrpcRecall(handle.address)
    try:
        await client.search([ChannelQuery(POPULAR, 3)], [], 5.0, "")
        handle.servicer.search_s = 10.0  # searches have been taking 10 s: a 1 s budget cannot pay
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.Search(recall_pb2.SearchRequest(queries=[recall_pb2.ChannelQuery(
                channel=POPULAR, k=3)]), timeout=1)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "not started" in caught.value.details()
        assert handle.servicer.expired == 1
    finally:
        await client.close()
        await handle.stop(0)
