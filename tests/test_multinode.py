"""Two Ray nodes on one machine: the services spread over both, and the cluster keeps
answering when the second node is removed (its actors come back on the head node)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import ray

from cluster.config import ClusterConfig
from cluster.launch import start_cluster
from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc
from recdata.dataset import Dataset
from tests.ray_cluster import two_nodes

pytestmark = pytest.mark.fault


async def _answers_until(address: str, users: list[str], recovered, seconds: float  # type: ignore[no-untyped-def]
                         ) -> list[recommender_pb2.RecommendResponse]:
    """Recommend (a few users at a time, every 0.2 s) until `recovered(last answer)` holds;
    any error status fails the test."""
    replies: list[recommender_pb2.RecommendResponse] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            batch = await asyncio.gather(*(stub.Recommend(recommender_pb2.RecommendRequest(user_id=u, k=5),
                                                          timeout=10) for u in users))
            replies.extend(batch)
            if await asyncio.to_thread(recovered, batch[-1]):
                break
            await asyncio.sleep(0.2)
    return replies


def test_services_spread_over_two_nodes_and_survive_losing_one(tiny_bundle: Path, tiny_dataset: Dataset,
                                                               tmp_path: Path) -> None:
    nodes, second = two_nodes()
    ray.init(address=nodes.address, log_to_driver=False, configure_logging=False)
    try:
        running = start_cluster(ClusterConfig(bundle=tiny_bundle, db_path=tmp_path / "events.sqlite",
                                              num_shards=3, gateway_port=0))
        head = ray.get_runtime_context().get_node_id()
        services = {s["name"]: s for s in running.status()["services"]}
        placed = {s["node_id"] for s in services.values()}
        assert placed == {head, second.node_id}, "the services did not spread over both nodes"
        assert services["recfunnel-gateway-0"]["node_id"] == head  # the event log's disk is here
        lost = {name for name, s in services.items() if s["node_id"] == second.node_id}

        nodes.remove_node(second, allow_graceful=False)

        def moved_and_whole(reply: recommender_pb2.RecommendResponse) -> bool:
            """Every lost service runs again on the head node, and answers are complete."""
            now = {s["name"]: s for s in running.status()["services"]}
            back = all(now[n]["node_id"] == head and now[n]["state"] == "ALIVE" and now[n]["restarts"] >= 1
                       for n in lost)
            return back and not reply.degraded and reply.recall_coverage == 1.0

        replies = asyncio.run(_answers_until(running.gateway_address, tiny_dataset.user_ids[:5], moved_and_whole,
                                             150))
        assert replies and moved_and_whole(replies[-1]), "the lost services did not come back on the head node"
        assert all(len(r.items) == 5 for r in replies)  # degraded at worst, never failed or empty
        running.stop()
    finally:
        ray.shutdown()
        nodes.shutdown()
