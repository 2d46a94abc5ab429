"""The ranking service over real gRPC: Encode, Rank, explanations, limits, health."""

from __future__ import annotations

import gc
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.backends import GrpcRanking
from gateway.events import ItemChange
from gateway.funnel import StageFailed
from protos.recfunnel.v1 import ranking_pb2
from ranking import server as ranking_server
from ranking.config import RankingConfig
from ranking.inference import RankingModel
from recdata.channels import SEMANTIC, SEQUENTIAL, channel_mask
from tests.grpc_checks import assert_health_and_reflection


async def test_encode_and_rank_over_grpc(tiny_bundle: Path) -> None:
    handle = await ranking_server.start(RankingConfig(bundle=tiny_bundle))
    client = GrpcRanking(handle.address)
    model = RankingModel.load(tiny_bundle, device="cpu")
    try:
        await assert_health_and_reflection(handle.address, ranking_server.SERVICE_NAME)
        history = ["i1", "i5", "unknown-item", "i9"]
        vectors, version = await client.encode(history, 5)
        assert version == model.version
        assert vectors[SEQUENTIAL].shape == (32,) and vectors[SEMANTIC].shape == (384,)
        expected = model.encode([model.indexes(history)])
        np.testing.assert_allclose(vectors[SEQUENTIAL], expected[SEQUENTIAL][0], atol=1e-5)

        candidates = [("i20", {"sequential": 0.5}), ("never-heard-of", {}), ("i30", {"popular": 2.0})]
        ranked = await client.rank(history, candidates, 0, 0.0, 2, 5, "")
        assert {item_id for item_id, _, _ in ranked[:2]} == {"i20", "i30"}
        assert ranked[0][1] >= ranked[1][1]  # best first
        assert ranked[2] == ("never-heard-of", float("-inf"), [])  # unknown candidates sink, the call succeeds
        for _, _, because in ranked[:2]:
            assert len(because) == 2 and set(because) <= {"i1", "i5", "i9"}
        assert len(await client.rank(history, candidates, 1, 0.0, 0, 5, "")) == 1

        vectors, _ = await client.encode(["nothing-known"], 5)
        assert vectors == {}  # no query vectors: recall falls back to popularity

        with pytest.raises(StageFailed, match=r"INVALID_ARGUMENT explain_top=11 out of range 0..10"):
            await client.rank(history, candidates, 0, 0.0, 11, 5, "")
        # The proposing channels reach the ranker, which reads them as features.
        by_sequential = await client.rank(history, [("i20", {"sequential": 1.0})], 0, 0.0, 0, 5, "")
        by_popular = await client.rank(history, [("i20", {"popular": 1.0})], 0, 0.0, 0, 5, "")
        by_both = await client.rank(history, [("i20", {"sequential": 1.0, "popular": 1.0})], 0, 0.0, 0, 5, "")
        assert len({by_sequential[0][1], by_popular[0][1], by_both[0][1]}) == 3

        for request, message in [
                (ranking_pb2.RankRequest(candidate_ids=["i1"] * 2001, candidate_channels=[1] * 2001),
                 "2001 candidates; allowed 0..2000"),
                (ranking_pb2.RankRequest(candidate_ids=["i1", "i2"], candidate_channels=[1]),
                 "1 candidate_channels for 2 candidate_ids"),
                (ranking_pb2.RankRequest(candidate_ids=["i1"], candidate_channels=[16]), "allowed 0..15")]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.stub.Rank(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()
    finally:
        await client.close()
        await handle.stop(0)


async def test_embedded_items_become_rankable(tiny_bundle: Path) -> None:
    handle = await ranking_server.start(RankingConfig(bundle=tiny_bundle))
    client = GrpcRanking(handle.address)
    try:
        vectors, version = await client.embed_items(
            [ItemChange("upsert", "fresh-1", "The quiet garden #999: a theme3 story", ("topic3",)),
             ItemChange("upsert", "i4", "retitled")], 10)
        assert vectors[SEQUENTIAL].shape == (2, 32) and vectors[SEMANTIC].shape == (2, 384)
        np.testing.assert_allclose(np.linalg.norm(vectors[SEQUENTIAL], axis=1), 1.0, rtol=1e-5)
        ranked = await client.rank(["i1", "fresh-1"], [("fresh-1", {"semantic": 0.9})], 0, 0.0, 1, 5, "")
        assert np.isfinite(ranked[0][1])
        with pytest.raises(StageFailed, match="INVALID_ARGUMENT"):
            await client.embed_items([ItemChange("upsert", "dup", "a"), ItemChange("upsert", "dup", "b")], 5)
    finally:
        await client.close()
        await handle.stop(0)


async def test_the_caller_chooses_the_new_items_place_or_none(tiny_bundle: Path) -> None:
    handle = await ranking_server.start(RankingConfig(bundle=tiny_bundle))
    client = GrpcRanking(handle.address)
    try:
        await client.embed_items([ItemChange("upsert", "fresh-1", "The quiet garden #999: a theme3 story")], 10)
        history = ["i1", "i5", "i9"]
        known = [(f"i{n}", {"sequential": 1.0, "item2item": 1.0}) for n in range(20, 60)]
        candidates = [*known, ("fresh-1", {"semantic": 0.1})]
        by_score = [i for i, _, _ in await client.rank(history, candidates, 0, 0.0, 0, 5, "", 0)]
        top = [i for i in by_score if i != "fresh-1"][:5]
        assert by_score.index("fresh-1") >= 5, "the new item is outscored: it needs a kept place"
        places = {place: [i for i, _, _ in await client.rank(history, candidates, 5, 0.0, 0, 5, "", place)]
                  for place in (None, 0, 1, 3, 5, 50)}
        assert places[None] == [*top[:4], "fresh-1"]  # the service's setting: the last place
        assert places[0] == top[:5]                    # none kept: relevance alone
        assert places[1] == ["fresh-1", *top[:4]]
        assert places[3] == [*top[:2], "fresh-1", *top[2:4]]
        assert places[5] == places[50] == places[None]  # beyond the list: its last place
        for bad in (-1, 1001):
            with pytest.raises(StageFailed, match=rf"INVALID_ARGUMENT new_item_place={bad} out of range 0..1000"):
                await client.rank(history, candidates, 6, 0.0, 0, 5, "", bad)
    finally:
        await client.close()
        await handle.stop(0)


def test_new_items_are_encoded_like_cold_items_in_training(tiny_bundle: Path, text_encoder) -> None:
    model = RankingModel.load(tiny_bundle, device="cpu")
    model.prepare_item_encoding(text_encoder)
    text = model.bundle.item_texts[7]
    vectors = model.upsert_items(["copy-of-7"], [text], [("topic0",)])
    np.testing.assert_allclose(vectors[SEMANTIC][0], model.tables.text_vectors[7], atol=1e-5)
    assert "copy-of-7" in model.tables.item_index and len(model.tables.item_ids) == 201
    before = model.tables
    model.upsert_items(["copy-of-7"], ["changed text"], [()])
    assert len(model.tables.item_ids) == 201 and model.tables is not before  # replaced, not edited
    assert "copy-of-7" in before.item_index  # the old snapshot is untouched


def test_mmr_trades_relevance_for_diversity() -> None:
    from ranking.inference import mmr_order

    # Items 0 and 1 are near-duplicates and the most relevant; item 2 is different.
    vectors = np.array([[1.0, 0.0], [0.999, 0.0447], [0.0, 1.0], [0.7071, 0.7071]])
    scores = np.array([1.0, 0.95, 0.5, 0.1])
    assert mmr_order(scores, vectors, 3, 0.0).tolist() == [0, 1, 2]
    assert mmr_order(scores, vectors, 3, 0.5).tolist()[:2] == [0, 2]
    assert mmr_order(scores, vectors, 4, 1.0)[0] == 0  # the first pick is always the most relevant
    assert sorted(mmr_order(scores, vectors, 4, 0.7).tolist()) == [0, 1, 2, 3]
    # The order by score needs no vectors (the ranker gathers them for MMR only); MMR does.
    assert mmr_order(scores, None, 3, 0.0).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="needs the candidates' vectors"):
        mmr_order(scores, None, 3, 0.5)


def test_diversity_raises_intra_list_diversity(tiny_bundle: Path) -> None:
    model = RankingModel.load(tiny_bundle, device="cpu")
    candidates = [(f"i{n}", channel_mask(["sequential"])) for n in range(60)]
    history = ["i1", "i2", "i3"]
    vectors = model.tables.item_vectors.numpy()

    def ild(items: list[str]) -> float:
        rows = vectors[sorted(model.tables.item_index[i] for i in items)]  # the set, not its order
        sim = rows @ rows.T
        return float((1 - sim).sum() / (len(items) * (len(items) - 1)))

    lists = [[i for i, _, _ in model.rank_items(history, candidates, 10, d)] for d in (0.0, 0.3, 0.5, 0.7, 1.0)]
    diversities = [ild(items) for items in lists]
    assert diversities == sorted(diversities)  # never less diverse with a higher knob
    # How soon the list changes depends on the model; at full diversity it must have changed.
    assert diversities[0] < diversities[4]
    scores = [s for _, s, _ in model.rank_items(history, candidates, 10, 0.0)]
    assert scores == sorted(scores, reverse=True)


async def test_a_started_service_keeps_its_loaded_objects_out_of_the_garbage_collector(tiny_bundle: Path) -> None:
    """A full collection would walk every object of torch and the models, a stall of hundreds
    of milliseconds under load; a started service has them frozen, and so has a loaded version."""
    gc.unfreeze()
    service = await ranking_server.start(RankingConfig(bundle=tiny_bundle))
    try:
        frozen_at_start = gc.get_freeze_count()
        assert frozen_at_start > 10_000
        assert len(gc.get_objects()) < frozen_at_start / 10
        client = GrpcRanking(service.address)
        try:
            await client.load_version(str(tiny_bundle), 60)
        finally:
            await client.close()
        assert gc.get_freeze_count() > frozen_at_start
    finally:
        await service.stop(0)
