"""No acknowledged event is lost and none is written twice through the gateway: retried calls
and a gateway process killed with SIGKILL in the middle of a Feedback stream (the store's own
contract, idempotency keys and migrations included, is tests/test_event_store.py)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from protos.recfunnel.v1 import recommender_pb2
from protos.recfunnel.v1 import recommender_pb2_grpc as rpc
from tests.grpc_checks import free_port, serving_stack

REPO = Path(__file__).resolve().parents[1]


async def test_a_retried_feedback_call_is_acknowledged_and_not_duplicated(tiny_bundle: Path, tmp_path: Path) -> None:
    async with serving_stack(tiny_bundle, tmp_path / "events.sqlite", num_shards=1) as (gw, _, _), \
            grpc.aio.insecure_channel(gw.address) as channel:
        stub = rpc.RecommenderStub(channel)
        request = recommender_pb2.FeedbackRequest(events=[
            recommender_pb2.Event(user_id="u", item_id=f"i{n}", event_id=f"call-1/{n}") for n in range(4)])
        first = await stub.Feedback(request, timeout=5)
        again = await stub.Feedback(request, timeout=5)
        assert (first.accepted, first.duplicates) == (4, 0)
        assert (again.accepted, again.duplicates) == (4, 4)
        assert gw.events.count() == 4
        too_long = recommender_pb2.FeedbackRequest(events=[
            recommender_pb2.Event(user_id="u", item_id="i1", event_id="x" * 257)])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Feedback(too_long, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "events[0].event_id is 257 bytes; allowed 1..256" in (caught.value.details() or "")


def _start_gateway(db: Path, port: int) -> subprocess.Popen[bytes]:
    """The standalone gateway process; Feedback needs no recall or ranking service."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--recall", "127.0.0.1:9", "--ranking", "127.0.0.1:9",
         "--db", str(db), "--port", str(port), "--no-auth"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
    return process


@pytest.mark.fault
def test_every_acknowledged_event_survives_a_sigkilled_gateway(tmp_path: Path) -> None:
    db, port = tmp_path / "events.sqlite", free_port()
    gateway = _start_gateway(db, port)
    calls = [[recommender_pb2.Event(user_id=f"u{c % 7}", item_id=f"i{c}-{n}", event_id=f"c{c}/e{n}")
              for n in range(5)] for c in range(2000)]
    acknowledged: set[str] = set()
    short_answers: list[int] = []
    lock = threading.Lock()

    def sender(offset: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rpc.RecommenderStub(channel)
            for events in calls[offset::4]:
                try:
                    reply = stub.Feedback(recommender_pb2.FeedbackRequest(events=events), timeout=5)
                except grpc.RpcError:
                    return  # the gateway is gone: this call's events were never acknowledged
                with lock:
                    short_answers.extend([reply.accepted] if reply.accepted != len(events) else [])
                    acknowledged.update(e.event_id for e in events)

    senders = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for thread in senders:
        thread.start()
    give_up = time.monotonic() + 60
    while len(acknowledged) < 1000 and time.monotonic() < give_up:  # kill it mid-stream, calls in flight
        time.sleep(0.01)
    os.kill(gateway.pid, signal.SIGKILL)
    gateway.wait()
    for thread in senders:
        thread.join()
    assert 1000 <= len(acknowledged) < 5 * len(calls) and not short_answers

    restarted = _start_gateway(db, port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rpc.RecommenderStub(channel)
            duplicates = 0
            for events in calls:  # the clients retry everything with the same ids
                reply = stub.Feedback(recommender_pb2.FeedbackRequest(events=events), timeout=5)
                duplicates += reply.duplicates
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(timeout=30)
    stored = sqlite3.connect(db).execute("SELECT event_id FROM events").fetchall()
    ids = [row[0] for row in stored]
    assert acknowledged <= set(ids)                      # nothing acknowledged was lost
    assert len(ids) == len(set(ids)) == 5 * len(calls)   # and nothing is there twice
    assert duplicates >= len(acknowledged)
