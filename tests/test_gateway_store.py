"""A gateway on the PostgreSQL event store: the same answers as on SQLite, and what callers see
while the database cannot be reached (needs RECFUNNEL_TEST_PG; see tests/test_event_store.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest

from protos.recfunnel.v1 import recommender_pb2
from protos.recfunnel.v1 import recommender_pb2_grpc as rpc
from tests.conftest import PG_URL, needs_pg
from tests.grpc_checks import serving_stack
from tests.tcp_proxy import CuttableProxy

pytestmark = needs_pg


def through(url: str, port: int) -> str:
    """`url` with its host and port replaced by 127.0.0.1:`port`."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


def feedback(*items: str, user: str = "u1") -> recommender_pb2.FeedbackRequest:
    return recommender_pb2.FeedbackRequest(events=[
        recommender_pb2.Event(user_id=user, item_id=i, event_type="click", event_id=f"{user}/{i}") for i in items])


async def test_a_gateway_on_postgres_logs_feedback_and_reads_it_back(tiny_bundle: Path, tmp_path: Path,
                                                                     pg_schema: str) -> None:
    async with serving_stack(tiny_bundle, tmp_path / "unused.sqlite", db_url=pg_schema) as (gw, _, _), \
            grpc.aio.insecure_channel(gw.address) as channel:
        stub = rpc.RecommenderStub(channel)
        first = await stub.Feedback(feedback("i1", "i2", "i3"), timeout=5)
        again = await stub.Feedback(feedback("i1", "i2", "i3"), timeout=5)
        assert (first.accepted, first.duplicates, again.duplicates) == (3, 0, 3)
        assert gw.events.recent_items("u1", 10) == ["i1", "i2", "i3"] and not (tmp_path / "unused.sqlite").exists()
        answer = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=10), timeout=5)
        assert len(answer.items) == 10 and not answer.degraded
        assert not {"i1", "i2", "i3"} & {i.item_id for i in answer.items}  # the logged history is excluded


async def test_while_the_database_is_away_feedback_is_unavailable_and_recommend_degraded(
        tiny_bundle: Path, tmp_path: Path, pg_schema: str) -> None:
    server = urlsplit(pg_schema)
    proxy = CuttableProxy((server.hostname or "127.0.0.1", server.port or 5432))
    async with serving_stack(tiny_bundle, tmp_path / "unused.sqlite",
                             db_url=through(pg_schema, proxy.port)) as (gw, _, _), \
            grpc.aio.insecure_channel(gw.address) as channel:
        stub = rpc.RecommenderStub(channel)
        assert (await stub.Feedback(feedback("i1"), timeout=5)).accepted == 1
        proxy.cut()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Feedback(feedback("i2"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "nothing acknowledged" in refused.value.details()
        answer = await stub.Recommend(recommender_pb2.RecommendRequest(
            user_id="u1", k=5, context_item_ids=["i7"]), timeout=5)
        assert answer.degraded and len(answer.items) == 5  # from context and popularity, not INTERNAL
        proxy.restore()
        healed = None
        for _ in range(50):  # the pool replaces its broken connections by itself
            try:
                healed = await stub.Feedback(feedback("i2"), timeout=5)
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.2)
        assert healed is not None and healed.accepted == 1
        assert gw.events.recent_items("u1", 10) == ["i1", "i2"]  # the refused call wrote nothing
        answer = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=5), timeout=5)
        assert not answer.degraded
    proxy.cut()


@pytest.mark.fault
def test_gateways_on_two_nodes_share_one_postgres_store(tiny_bundle: Path, pg_schema: str) -> None:
    """With the store on the server, `gateways_per_node` puts gateways on both Ray nodes; an
    event logged through one is history for the other's next answer."""
    import ray

    from cluster.config import ClusterConfig
    from cluster.launch import start_cluster
    from tests.ray_cluster import two_nodes

    nodes, second = two_nodes()
    ray.init(address=nodes.address, log_to_driver=False, configure_logging=False)
    try:
        running = start_cluster(ClusterConfig(bundle=tiny_bundle, db_url=pg_schema, num_shards=2, gateway_port=0,
                                              gateways_per_node=1))
        head = ray.get_runtime_context().get_node_id()
        gateways = {s["name"]: s for s in running.status()["services"] if s["name"].startswith("recfunnel-gateway")}
        assert {g["node_id"] for g in gateways.values()} == {head, second.node_id}
        on_head, elsewhere = (next(g["address"] for g in gateways.values() if (g["node_id"] == head) == first)
                              for first in (True, False))

        async def logged_there_read_here() -> recommender_pb2.RecommendResponse:
            async with grpc.aio.insecure_channel(elsewhere) as far, grpc.aio.insecure_channel(on_head) as near:
                sent = await rpc.RecommenderStub(far).Feedback(feedback("i3", "i4", user="traveller"), timeout=10)
                assert sent.accepted == 2
                return await rpc.RecommenderStub(near).Recommend(
                    recommender_pb2.RecommendRequest(user_id="traveller", k=10, explain=True), timeout=10)

        answer = asyncio.run(logged_there_read_here())
        assert not answer.degraded and not {"i3", "i4"} & {i.item_id for i in answer.items}
        assert running.status()["services"]  # status works the same
        running.stop()
    finally:
        ray.shutdown()
        nodes.shutdown()


def restart_command() -> list[str] | None:
    """The command that restarts this machine's PostgreSQL cluster, where there is one."""
    import shutil

    clusters = sorted(Path("/etc/postgresql").glob("*/main"))
    if not shutil.which("pg_ctlcluster") or not clusters:
        return None
    return ["pg_ctlcluster", "--skip-systemctl-redirect", clusters[-1].parent.name, "main", "restart"]


@pytest.mark.fault
async def test_feedback_streams_across_a_database_restart_lose_and_repeat_nothing(
        tiny_bundle: Path, tmp_path: Path, pg_schema: str) -> None:
    """Four streams of keyed Feedback calls while the server restarts; a refused call is sent
    again with the same ids. Every event is then logged exactly once, and no answer was
    INTERNAL."""
    import subprocess

    import psycopg

    command = restart_command()
    if command is None:
        pytest.skip("needs pg_ctlcluster and a cluster under /etc/postgresql to restart the server")
    refusals: list[grpc.StatusCode] = []
    calls, per_call = 30, 5

    async def stream(stub: rpc.RecommenderStub, s: int) -> None:
        for c in range(calls):
            request = recommender_pb2.FeedbackRequest(events=[recommender_pb2.Event(
                user_id=f"s{s}", item_id=f"i{n}", event_type="click", event_id=f"{s}/{c}/{n}")
                for n in range(per_call)])
            for _ in range(200):  # until acknowledged: the same ids every time
                try:
                    reply = await stub.Feedback(request, timeout=5)
                    assert reply.accepted == per_call
                    break
                except grpc.aio.AioRpcError as error:
                    refusals.append(error.code())
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"stream {s} call {c} never acknowledged")
            await asyncio.sleep(0.02)

    async with serving_stack(tiny_bundle, tmp_path / "unused.sqlite", db_url=pg_schema) as (gw, _, _), \
            grpc.aio.insecure_channel(gw.address) as channel:
        stub = rpc.RecommenderStub(channel)
        streams = [asyncio.create_task(stream(stub, s)) for s in range(4)]
        await asyncio.sleep(0.5)
        restarted = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)
        assert restarted.returncode == 0, restarted.stderr
        await asyncio.gather(*streams)
    with psycopg.connect(pg_schema) as db:
        counts = db.execute("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM events").fetchone()
    assert counts == (4 * calls * per_call, 4 * calls * per_call)  # every event, each once
    assert set(refusals) <= {grpc.StatusCode.UNAVAILABLE}, refusals
    assert refusals, "the restart refused no call: it did not happen while the streams ran"


def test_the_store_bench_reports_every_figure_for_both_stores(tiny_bundle: Path, tiny_dataset) -> None:
    from bench.store import StoreBenchConfig, run_store_bench

    report = run_store_bench(tiny_dataset, StoreBenchConfig(
        bundle=tiny_bundle, pg_url=PG_URL, events=8_000, read_rates=(50.0,), read_seconds=1.0, feedback_seconds=1.0,
        feedback_callers=2, serving_rate=20.0, serving_seconds=1.0))
    assert set(report["stores"]) == {"sqlite", "postgresql"}
    for store in report["stores"].values():
        assert store["events_logged"] == 8_000 and store["history_reads"]["50/s"]["requests"] > 0
        assert store["history_reads"]["50/s"]["errors"] == {}
        assert set(store["feedback"]) == {f"batch {b}, {g} gateway(s)" for b in (1, 100) for g in (1, 2)}
        assert all(f["events_per_s"] > 0 and f["failed_calls"] == 0 for f in store["feedback"].values())
        # The concurrent callers' count is exact: what the log gained, event for event.
        assert all(f["acknowledged"] == f["logged"] > 0 for f in store["feedback"].values())
        assert store["serving"]["Recommend"]["errors"] == {}
    assert report["recommend_p99_postgresql_over_sqlite"] > 0
