"""Model version swaps: services hold two versions, the gateway switches with no failed request."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import grpc
import pytest

from gateway.events import Event
from protos.recfunnel.v1 import (
    ranking_pb2_grpc,
    recall_pb2,
    recall_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
    versions_pb2,
    versions_pb2_grpc,
)
from recdata.versions import DefaultVersionInUse, LoadedVersions, VersionNotLoaded
from tests.grpc_checks import serving_stack


def copy_as_version(bundle: Path, folder: Path, version: str) -> Path:
    """The same models under another version id: what a retrained bundle looks like to a swap."""
    shutil.copytree(bundle, folder)
    manifest = json.loads((folder / "manifest.json").read_text("utf-8"))
    (folder / "manifest.json").write_text(json.dumps({**manifest, "version": version}), "utf-8")
    return folder


def test_loaded_versions_keep_a_default_and_refuse_to_drop_it() -> None:
    versions = LoadedVersions("a", lambda name: name)
    assert versions.get() == "a" and versions.add("b") == "b" and versions.get() == "b" and versions.get("a") == "a"
    with pytest.raises(DefaultVersionInUse, match="'b' is the default"):
        versions.remove("b")
    versions.remove("a")
    with pytest.raises(VersionNotLoaded, match="'a' not loaded; loaded: b"):
        versions.get("a")


@pytest.fixture
async def cluster(tiny_bundle: Path, tmp_path: Path):
    async with serving_stack(tiny_bundle, tmp_path / "events.sqlite", swap_drain_s=0.5) as stack:
        yield stack


async def test_services_load_beside_and_unload_with_clear_errors(cluster, tiny_bundle: Path, tmp_path: Path) -> None:
    _, shards, ranking = cluster
    old = json.loads((tiny_bundle / "manifest.json").read_text("utf-8"))["version"]
    new = copy_as_version(tiny_bundle, tmp_path / "v2", "tiny-v2")
    async with grpc.aio.insecure_channel(shards[0].address) as recall_channel, \
            grpc.aio.insecure_channel(ranking.address) as ranking_channel:
        for stub in (recall_pb2_grpc.RecallStub(recall_channel), ranking_pb2_grpc.RankingStub(ranking_channel)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.LoadVersion(versions_pb2.LoadVersionRequest(bundle_path=str(tmp_path / "none")), timeout=60)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a bundle" in caught.value.details()
            loaded = await stub.LoadVersion(versions_pb2.LoadVersionRequest(bundle_path=str(new)), timeout=60)
            assert loaded.model_version == "tiny-v2" and sorted(loaded.loaded_versions) == sorted([old, "tiny-v2"])
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.UnloadVersion(versions_pb2.UnloadVersionRequest(model_version="tiny-v2"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.UnloadVersion(versions_pb2.UnloadVersionRequest(model_version="nope"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        recall = recall_pb2_grpc.RecallStub(recall_channel)
        # Both versions answer while both are loaded; an unloaded one is refused by name.
        for version in (old, "tiny-v2"):
            reply = await recall.Search(recall_pb2.SearchRequest(
                queries=[recall_pb2.ChannelQuery(channel="popular", k=3)], model_version=version), timeout=5)
            assert reply.model_version == version
        await recall.UnloadVersion(versions_pb2.UnloadVersionRequest(model_version=old), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await recall.Search(recall_pb2.SearchRequest(
                queries=[recall_pb2.ChannelQuery(channel="popular", k=3)], model_version=old), timeout=5)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not loaded" in caught.value.details()
        info = await recall.ShardInfo(recall_pb2.ShardInfoRequest(), timeout=5)
        assert list(info.loaded_versions) == ["tiny-v2"] and info.model_version == "tiny-v2"


@pytest.mark.fault
async def test_swap_under_load_fails_no_request_and_keeps_catalogue_changes(
        cluster, tiny_bundle: Path, tiny_dataset, tmp_path: Path) -> None:
    gw, shards, _ = cluster
    old = json.loads((tiny_bundle / "manifest.json").read_text("utf-8"))["version"]
    new = copy_as_version(tiny_bundle, tmp_path / "v2", "tiny-v2")
    users = [f"load-{n}" for n in range(8)]
    gw.events.append([Event(u, tiny_dataset.item_ids[int(i)], timestamp_ms=t + 1)
                      for n, u in enumerate(users) for t, i in enumerate(tiny_dataset.sequences[n][:6])])
    outcomes: list[tuple[str, bool]] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async with grpc.aio.insecure_channel(gw.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        rollout = versions_pb2_grpc.RolloutStub(channel)
        # Catalogue changes made on the old version must survive the swap.
        await stub.UpsertItems(recommender_pb2.UpsertItemsRequest(items=[
            recommender_pb2.Item(item_id="added-before-swap", text=tiny_dataset.item_texts[3])]), timeout=10)
        await stub.DeleteItems(recommender_pb2.DeleteItemsRequest(item_ids=["i5"]), timeout=10)

        async def caller(user: str) -> None:
            while not stop.is_set():
                try:
                    reply = await stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=10), timeout=5)
                    outcomes.append((reply.model_version, reply.degraded))
                except grpc.aio.AioRpcError as error:
                    failures.append(error)

        callers = [asyncio.create_task(caller(u)) for u in users]
        await asyncio.sleep(0.5)
        report = await rollout.SwapVersion(versions_pb2.SwapVersionRequest(bundle_path=str(new)), timeout=120)
        served_before = len(outcomes)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*callers)

        assert not failures
        assert report.model_version == "tiny-v2" and report.previous_version == old and report.replayed_changes == 2
        assert {v for v, _ in outcomes} == {old, "tiny-v2"} and len(outcomes) > served_before
        assert not any(degraded for _, degraded in outcomes), "a swap must not degrade answers"
        assert all(v == "tiny-v2" for v, _ in outcomes[served_before:])
        serving = await rollout.ServingVersion(versions_pb2.ServingVersionRequest(), timeout=5)
        assert serving.model_version == "tiny-v2"
        for shard in shards:  # the old version is gone once drained
            async with grpc.aio.insecure_channel(shard.address) as shard_channel:
                info = await recall_pb2_grpc.RecallStub(shard_channel).ShardInfo(recall_pb2.ShardInfoRequest())
                assert list(info.loaded_versions) == ["tiny-v2"]
        # The new version holds the upserted item and not the deleted one.
        deleted = await stub.DeleteItems(recommender_pb2.DeleteItemsRequest(
            item_ids=["added-before-swap", "i5"]), timeout=10)
        assert deleted.deleted == 1


async def test_an_experiment_variant_serves_its_own_version_beside_the_serving_one(
        tiny_bundle: Path, tiny_dataset, tmp_path: Path) -> None:
    from gateway.experiments import EXPERIMENT_SETTING, Experiment, Variant

    old = json.loads((tiny_bundle / "manifest.json").read_text("utf-8"))["version"]
    new = copy_as_version(tiny_bundle, tmp_path / "v2", "tiny-v2")
    experiment = Experiment("models", (Variant("control", 0.5), Variant("candidate", 0.5, bundle=str(new))))
    batch = recommender_pb2.ItemFilter(equals=[recommender_pb2.PropertyEquals(property="batch", any_of=["late"])])

    def late_item(item_id: str) -> recommender_pb2.Item:
        return recommender_pb2.Item(item_id=item_id, text=tiny_dataset.item_texts[3],
                                    properties={"batch": recommender_pb2.PropertyValue(text="late")})

    async with serving_stack(tiny_bundle, tmp_path / "events.sqlite", swap_drain_s=0.3, experiment_poll_s=0.1) as (
            gw, shards, _), grpc.aio.insecure_channel(gw.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        await stub.UpsertItems(recommender_pb2.UpsertItemsRequest(items=[late_item("before")]), timeout=30)
        gw.events.set_setting(EXPERIMENT_SETTING, experiment.to_json())
        # Until its version is loaded everywhere the experiment is off: no answer names a variant
        # whose model did not answer it.
        for _ in range(600):
            reply = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="u0", k=5), timeout=10)
            if reply.variant:
                break
            assert reply.model_version == old
            await asyncio.sleep(0.1)
        assert reply.variant, "the variant's version never loaded"
        await stub.UpsertItems(recommender_pb2.UpsertItemsRequest(items=[late_item("during")]), timeout=30)
        replies = [await stub.Recommend(recommender_pb2.RecommendRequest(user_id=f"u{n}", k=5, filter=batch),
                                        timeout=10) for n in range(30)]
        versions = {(r.variant, r.model_version) for r in replies}
        assert versions == {("control", old), ("candidate", "tiny-v2")}
        # Both versions hold the catalogue: the change before (replayed) and the one during.
        assert all(r.filter_passed == 2 for r in replies)
        for shard in shards:  # the services' default stayed the serving version
            async with grpc.aio.insecure_channel(shard.address) as shard_channel:
                info = await recall_pb2_grpc.RecallStub(shard_channel).ShardInfo(recall_pb2.ShardInfoRequest())
                assert info.model_version == old and sorted(info.loaded_versions) == sorted([old, "tiny-v2"])
        # Stopped, the variant's version is unloaded once drained.
        gw.events.set_setting(EXPERIMENT_SETTING, "")
        for _ in range(100):
            reply = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=5), timeout=10)
            async with grpc.aio.insecure_channel(shards[0].address) as shard_channel:
                info = await recall_pb2_grpc.RecallStub(shard_channel).ShardInfo(recall_pb2.ShardInfoRequest())
            if list(info.loaded_versions) == [old]:
                break
            await asyncio.sleep(0.1)
        assert list(info.loaded_versions) == [old] and not reply.variant and reply.model_version == old


async def test_a_variant_bundle_that_does_not_load_keeps_its_experiment_off(tiny_bundle: Path, tmp_path: Path) -> None:
    from gateway.experiments import EXPERIMENT_SETTING, Experiment, Variant

    old = json.loads((tiny_bundle / "manifest.json").read_text("utf-8"))["version"]
    broken = Experiment("broken", (Variant("control", 0.5), Variant("missing", 0.5, bundle=str(tmp_path / "none"))))
    async with serving_stack(tiny_bundle, tmp_path / "events.sqlite", experiment_poll_s=0.1) as (gw, _, _), \
            grpc.aio.insecure_channel(gw.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        gw.events.set_setting(EXPERIMENT_SETTING, broken.to_json())
        replies = []
        for n in range(30):  # 3 s: the load is refused, and the experiment stays off meanwhile
            replies.append(await stub.Recommend(recommender_pb2.RecommendRequest(user_id=f"u{n}", k=5), timeout=10))
            await asyncio.sleep(0.1)
        assert all(not r.variant and r.model_version == old for r in replies)
