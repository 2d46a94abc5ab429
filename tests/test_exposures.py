"""The exposure log: answers never wait for it, a full queue drops and counts, a graceful stop
writes everything, and feedback names the answer that showed its item."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest

from gateway.events import EventLog, Exposure
from gateway.exposures import ExposureConfig, ExposureLog
from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc
from tests.grpc_checks import serving_stack


class HeldStore:
    """Writes wait until released, as a store that stalls would."""

    def __init__(self) -> None:
        self.written: list[Exposure] = []
        self.release = threading.Event()
        self.fail = False

    def record_exposures(self, exposures: list[Exposure]) -> int:
        self.release.wait(10)
        if self.fail:
            raise OSError("disk full")
        self.written += exposures
        return len(exposures)


def answer(n: int) -> list[tuple[str, float]]:
    return [(f"i{n}-{p}", 1.0 - p / 10) for p in range(5)]


async def test_a_full_queue_drops_whole_answers_and_counts_them_without_waiting() -> None:
    store = HeldStore()
    log = ExposureLog(store, ExposureConfig(capacity=12, batch=5, flush_interval_s=0.01))  # type: ignore[arg-type]
    log.offer("r0", "u", answer(0), "v1")        # 5 queued, then taken by the first (held) write
    await asyncio.sleep(0.05)
    for n in range(1, 5):                        # 10 fit in the queue behind it, the next 10 do not
        log.offer(f"r{n}", "u", answer(n), "v1")
    assert log.stats.dropped == 10 and log.stats.offered == 25
    store.release.set()
    await log.close()
    assert log.stats.logged == 15 and log.stats.queued == 0
    assert {x.request_id for x in store.written} == {"r0", "r1", "r2"}  # never half an answer
    assert [x.position for x in store.written if x.request_id == "r1"] == [0, 1, 2, 3, 4]


async def test_close_writes_everything_queued_and_a_failed_write_is_counted() -> None:
    store = HeldStore()
    store.release.set()
    log = ExposureLog(store, ExposureConfig(batch=3, flush_interval_s=5.0))  # type: ignore[arg-type]
    for n in range(4):
        log.offer(f"r{n}", "u", answer(n), "v1")
    await log.close()  # long before the flush interval: the stop writes them
    assert len(store.written) == 20 and log.stats.logged == 20
    failing = HeldStore()
    failing.release.set()
    failing.fail = True
    log = ExposureLog(failing, ExposureConfig(flush_interval_s=0.01))  # type: ignore[arg-type]
    log.offer("r", "u", answer(0), "v1")
    await log.close()
    assert log.stats.dropped == 5 and log.stats.logged == 0


async def test_answers_are_logged_with_positions_and_feedback_names_its_answer(tiny_bundle: Path,
                                                                              tmp_path: Path) -> None:
    db = tmp_path / "events.sqlite"
    async with serving_stack(tiny_bundle, db) as (gateway, _, _), grpc.aio.insecure_channel(gateway.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        replies = [await stub.Recommend(recommender_pb2.RecommendRequest(user_id=f"u{n}", k=6), timeout=10)
                   for n in range(20)]
        shown = replies[0]
        await stub.Feedback(recommender_pb2.FeedbackRequest(events=[recommender_pb2.Event(
            user_id="u0", item_id=shown.items[2].item_id, event_type="click", request_id=shown.request_id)]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Feedback(recommender_pb2.FeedbackRequest(events=[recommender_pb2.Event(
                user_id="u0", item_id="i1", request_id="r" * 65)]))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id is longer than 64 bytes" in (refused.value.details() or "")
    # The gateway has stopped gracefully: every exposure is in the log.
    log = EventLog(db)
    for reply in replies:
        logged = log.exposures_of(reply.request_id)
        assert [(x.item_id, x.position) for x in logged] == [(i.item_id, n) for n, i in enumerate(reply.items)]
        assert all(x.model_version == reply.model_version and x.user_id for x in logged)
    assert log.attributed_events(shown.request_id) == [(shown.items[2].item_id, "click")]
    log.close()


async def test_without_exposures_nothing_is_logged(tiny_bundle: Path, tmp_path: Path) -> None:
    db = tmp_path / "events.sqlite"
    async with serving_stack(tiny_bundle, db, exposures=ExposureConfig(enabled=False)) as (gateway, _, _):
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            reply = await recommender_pb2_grpc.RecommenderStub(channel).Recommend(
                recommender_pb2.RecommendRequest(user_id="u1", k=5), timeout=10)
        assert gateway.exposures.stats.offered == 0
    log = EventLog(db)
    assert log.exposures_of(reply.request_id) == []
    log.close()
