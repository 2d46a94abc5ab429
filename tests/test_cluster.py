"""End to end on a small local Ray: the services as actors, called over real gRPC."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from pathlib import Path

import grpc
import psutil
import pytest
import ray

from bench.loadtest import LoadTest, Mix, soak
from cluster.config import ClusterConfig
from gateway import server as gateway_server
from gateway.client import RecommenderClient
from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc
from ranking import server as ranking_server
from recdata.dataset import Dataset
from retrieval import server as recall_server
from tests.grpc_checks import assert_health_and_reflection
from tests.ray_cluster import local_cluster
from tests.test_rollout import copy_as_version

INTERNAL_TOKEN = "cluster-test-internal-token-0123456789"
SERVICES = {"recfunnel-gateway-0", "recfunnel-gateway-1", "recfunnel-ranking-0", "recfunnel-ranking-1",
            "recfunnel-recall-0", "recfunnel-recall-1"}  # two ranker replicas, two gateways


@pytest.fixture(scope="module")
def cluster(tiny_bundle: Path, tiny_dataset: Dataset, tmp_path_factory: pytest.TempPathFactory):
    db = tmp_path_factory.mktemp("cluster") / "events.sqlite"
    with local_cluster(ClusterConfig(bundle=tiny_bundle, db_path=db, num_shards=2, ranker_replicas=2, gateways=2,
                                     gateway_port=0, internal_token=INTERNAL_TOKEN), tiny_dataset) as running:
        yield running


def test_every_server_answers_health_and_reflection(cluster) -> None:
    async def check() -> None:
        assert len(cluster.gateway_addresses) == 2 == len(set(cluster.gateway_addresses))
        for address in cluster.gateway_addresses:
            await assert_health_and_reflection(address, gateway_server.SERVICE_NAME)
        assert len(cluster.ranking_addresses) == 2
        for address in cluster.ranking_addresses:
            await assert_health_and_reflection(address, ranking_server.SERVICE_NAME, INTERNAL_TOKEN)
        for address in cluster.shard_addresses:
            await assert_health_and_reflection(address, recall_server.SERVICE_NAME, INTERNAL_TOKEN)

    asyncio.run(check())


def test_recommend_and_feedback_through_the_cluster(cluster, tiny_dataset: Dataset) -> None:
    user = tiny_dataset.user_ids[0]
    seen = {tiny_dataset.item_ids[i] for i in tiny_dataset.sequences[0]}

    async def scenario() -> None:
        client = RecommenderClient(cluster.gateway_address, timeout=10)
        try:
            reply = await client.recommend(user, k=8, exclude=["i0", "i1"], explain=True)
            ids = [i.item_id for i in reply.items]
            assert len(ids) == 8 == len(set(ids))
            assert not set(ids) & (seen | {"i0", "i1"})
            assert not reply.degraded and reply.recall_coverage == 1.0 and reply.model_version

            unknown = await client.recommend("someone-new", k=5)
            assert len(unknown.items) == 5

            await client.feedback([(user, ids[0], "click", 1.0), (user, ids[1], "click", 1.0)])
            after = await client.recommend(user, k=8)
            after_ids = [i.item_id for i in after.items]
            assert after_ids != ids
            assert not {ids[0], ids[1]} & set(after_ids)

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.recommend(user, k=1001)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "1..1000" in caught.value.details()
        finally:
            await client.close()

    asyncio.run(scenario())


def test_services_are_named_ray_actors(cluster) -> None:
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert {"recfunnel-controller", *SERVICES} <= names


def test_status_reports_every_actor_its_address_version_and_restarts(cluster) -> None:
    status = cluster.status()
    services = {s["name"]: s for s in status["services"]}
    assert set(services) == SERVICES
    for service in services.values():
        assert service["state"] == "ALIVE" and service["address"] and service["node_id"]
        assert service["model_version"] == status["model_version"] and service["restarts"] == 0
        assert 10 * 2**20 < service["rss_bytes"] < 8 * 2**30  # a real process's resident memory
    assert status["gateway"] == cluster.gateway_address


async def _recommend_until(address: str, user: str, done, seconds: float) -> list:  # type: ignore[no-untyped-def]
    """Recommend every 0.2 s until `done(reply)` or `seconds` pass; every call must succeed."""
    client = RecommenderClient(address, timeout=10)
    replies = []
    try:
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            reply = await client.recommend(user, k=5)  # raises on any error status
            replies.append(reply)
            if done(reply):
                break
            await asyncio.sleep(0.2)
    finally:
        await client.close()
    return replies


async def _load_until(address: str, users: list[str], stop: asyncio.Event, rate: float = 10.0
                      ) -> list[recommender_pb2.RecommendResponse | grpc.aio.AioRpcError]:
    """Recommend calls at `rate` per second, each sent on schedule whatever the others do,
    until `stop`; returns every answer or error."""
    outcomes: list[recommender_pb2.RecommendResponse | grpc.aio.AioRpcError] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)

        async def one(user: str) -> None:
            try:
                outcomes.append(await stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=5),
                                                     timeout=10))
            except grpc.aio.AioRpcError as error:
                outcomes.append(error)

        tasks = []
        for n in itertools.count():
            if stop.is_set():
                break
            tasks.append(asyncio.create_task(one(users[n % len(users)])))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    return outcomes


# A shard is back within 30 s; the ranker's new process must also import torch and load
# MiniLM before it answers, so it gets longer.
@pytest.mark.fault
@pytest.mark.parametrize(("name", "back_within_s"), [("recfunnel-recall-1", 30), ("recfunnel-ranking-1", 90)])
def test_a_killed_service_is_restarted_and_used_again_with_no_failed_request(
        cluster, tiny_dataset: Dataset, name: str, back_within_s: float) -> None:
    users = tiny_dataset.user_ids[:20]
    before = {s["name"]: s for s in cluster.status()["services"]}[name]

    def back(reply: recommender_pb2.RecommendResponse) -> bool:
        after = {s["name"]: s for s in cluster.status()["services"]}[name]
        return (after["state"] == "ALIVE" and after["pid"] != before["pid"] and not reply.degraded
                and reply.recall_coverage == 1.0)

    async def scenario() -> tuple[list, list]:  # type: ignore[type-arg]
        stop = asyncio.Event()
        load = asyncio.create_task(_load_until(cluster.gateway_address, users, stop))
        await asyncio.sleep(1.0)
        os.kill(before["pid"], signal.SIGKILL)  # the process dies under load; Ray builds the actor again
        await asyncio.sleep(0.5)
        probes = await _recommend_until(cluster.gateway_address, users[0], back, back_within_s)
        stop.set()
        return probes, await load

    probes, outcomes = asyncio.run(scenario())
    assert probes and not probes[-1].degraded and probes[-1].recall_coverage == 1.0
    errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert not errors, f"{len(errors)} failed requests, e.g. {errors[0].code().name}"
    replies = [*probes, *outcomes]
    assert all(len(r.items) == 5 for r in replies)  # degraded while it was down, never empty or failed
    if name.startswith("recfunnel-recall"):
        assert any(r.degraded and r.recall_coverage == 0.5 for r in replies)  # the kill took the shard away
    else:  # the other replica ranked every request meanwhile
        assert not any(r.degraded for r in replies)
    after = {s["name"]: s for s in cluster.status()["services"]}[name]
    assert after["restarts"] == before["restarts"] + 1 and after["pid"] != before["pid"]
    assert after["state"] == "ALIVE" and after["model_version"] == before["model_version"]


def test_soak_reports_load_and_every_actors_memory_growth(cluster, tiny_dataset: Dataset) -> None:
    mix = Mix(tuple(tiny_dataset.user_ids), tuple(tiny_dataset.item_ids), k=5)
    test = LoadTest(target=cluster.gateway_address, qps=10, duration_s=2, timeout_s=5, warmup_s=0)
    summary, result = soak(test, mix, cluster.status, warmup_s=1)
    assert summary["errors"] == {} and summary["requests"] == len(result.samples) > 5
    assert set(summary["memory"]) == SERVICES
    for memory in summary["memory"].values():
        assert memory["rss_mb_after_warmup"] > 10 and memory["restarts"] == 0
        assert memory["growth"] == pytest.approx(memory["rss_mb_at_end"] / memory["rss_mb_after_warmup"] - 1,
                                                 abs=1e-3)
    assert summary["rss_growth_max"] == max(m["growth"] for m in summary["memory"].values())


def test_versions_lists_what_served_and_rollback_returns_to_it(cluster, tiny_bundle: Path, tmp_path: Path) -> None:
    original = cluster.status()["model_version"]
    newer = copy_as_version(tiny_bundle, tmp_path / "v2", "tiny-v2")
    report = ray.get(cluster.controller.swap.remote(str(newer)), timeout=300)
    assert report["previous_version"] == original and report["model_version"] == "tiny-v2"
    for address in cluster.gateway_addresses:  # every gateway switched, every service holds only the new one
        reply = asyncio.run(_recommend_until(address, "u-swap", lambda r: True, 5))[0]
        assert reply.model_version == "tiny-v2" and not reply.degraded
    for service in cluster.status()["services"]:
        assert service["model_version"] == "tiny-v2"
        assert service["loaded_versions"] == ["tiny-v2"] or service["name"].startswith("recfunnel-gateway")
    listed = ray.get(cluster.controller.versions.remote(), timeout=30)
    assert [(v["version"], v["serving"]) for v in listed] == [(original, False), ("tiny-v2", True)]
    assert listed[0]["metrics"]["test"]["funnel"]["ndcg@10"] > 0  # the bundle's own test metrics

    back = ray.get(cluster.controller.rollback.remote(original), timeout=300)
    assert back["model_version"] == original and cluster.status()["model_version"] == original
    reply = asyncio.run(_recommend_until(cluster.gateway_address, "u-rollback", lambda r: True, 5))[0]
    assert reply.model_version == original and not reply.degraded
    with pytest.raises(ray.exceptions.RayTaskError, match="was never served here"):
        ray.get(cluster.controller.rollback.remote("no-such-version"), timeout=30)


@pytest.mark.fault
def test_a_killed_controller_comes_back_adopts_the_services_and_watches_them_again(
        cluster, tiny_dataset: Dataset) -> None:
    before = cluster.status()
    history = ray.get(cluster.controller.versions.remote(), timeout=30)
    controller = [p for p in psutil.process_iter(["cmdline"]) if "ray::Controller" in " ".join(p.info["cmdline"] or ())]
    assert len(controller) == 1

    async def scenario() -> list:  # type: ignore[type-arg]
        stop = asyncio.Event()
        load = asyncio.create_task(_load_until(cluster.gateway_address, tiny_dataset.user_ids[:20], stop))
        await asyncio.sleep(1.0)
        controller[0].send_signal(signal.SIGKILL)  # the services answer on without it
        await asyncio.sleep(3.0)
        stop.set()
        return await load

    outcomes = asyncio.run(scenario())
    assert outcomes and not [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]

    deadline = time.monotonic() + 60
    while True:  # Ray builds the controller again; it adopts the running services
        try:
            after = cluster.status()
            break
        except ray.exceptions.RayError:
            assert time.monotonic() < deadline, "the controller did not come back within 60 s"
            time.sleep(0.5)
    assert after["model_version"] == before["model_version"] and after["gateways"] == before["gateways"]
    assert {s["name"]: s["pid"] for s in after["services"]} == {s["name"]: s["pid"] for s in before["services"]}
    assert ray.get(cluster.controller.versions.remote(), timeout=30) == history  # what served, kept on disk

    # It watches again: a shard killed now is restarted and used again.
    shard = {s["name"]: s for s in after["services"]}["recfunnel-recall-0"]
    os.kill(shard["pid"], signal.SIGKILL)

    def back(reply: recommender_pb2.RecommendResponse) -> bool:
        now = {s["name"]: s for s in cluster.status()["services"]}["recfunnel-recall-0"]
        return now["pid"] != shard["pid"] and now["state"] == "ALIVE" and reply.recall_coverage == 1.0

    probes = asyncio.run(_recommend_until(cluster.gateway_address, tiny_dataset.user_ids[0], back, 30))
    assert probes and back(probes[-1])
