"""Admission control: the latency-driven limit, the priority queue, and refusals at the gateway."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import grpc
import pytest

from gateway.admission import Admission, AdmissionConfig, GradientLimit, Overloaded, Priority
from gateway.servicer import RETRY_AFTER_KEY
from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc
from tests.grpc_checks import serving_stack


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_windows(limit: GradientLimit, clock: FakeClock, latency_s: float, windows: int, busy: bool = True) -> None:
    """Answered calls at `latency_s`, `windows` limit updates' worth; `busy`: every slot in use."""
    for _ in range(windows):
        for _ in range(limit.config.window_min_samples):
            limit.observe(latency_s, int(limit.limit) if busy else 1)
        clock.now += limit.config.window_s


def test_the_limit_falls_under_injected_latency_and_rises_back() -> None:
    clock = FakeClock()
    limit = GradientLimit(AdmissionConfig(initial_limit=16), clock)
    run_windows(limit, clock, 0.010, 10)
    healthy = limit.limit
    assert healthy > 16  # full use at no-load latency: room to grow
    run_windows(limit, clock, 0.080, 6)  # a stage got 8 x slower: far past the tolerance of 2
    assert limit.limit <= healthy / 4
    assert limit.limit >= limit.config.min_limit
    low = limit.limit
    run_windows(limit, clock, 0.010, 10)
    assert limit.limit > 2 * low


def test_latency_within_the_tolerance_does_not_shrink_the_limit() -> None:
    clock = FakeClock()
    limit = GradientLimit(AdmissionConfig(initial_limit=16, tolerance=2.0), clock)
    run_windows(limit, clock, 0.010, 3)
    before = limit.limit
    run_windows(limit, clock, 0.018, 3)
    assert limit.limit >= before


def test_a_lightly_used_limit_does_not_grow() -> None:
    clock = FakeClock()
    limit = GradientLimit(AdmissionConfig(initial_limit=16), clock)
    run_windows(limit, clock, 0.010, 20, busy=False)
    assert limit.limit == 16


def fixed(limit: int, **options: float) -> AdmissionConfig:
    return AdmissionConfig(initial_limit=limit, min_limit=limit, max_limit=limit, **options)  # type: ignore[arg-type]


async def test_a_call_that_cannot_start_in_time_is_refused_at_once() -> None:
    admission = Admission(fixed(1))
    admission.limiter.last_median_s = 0.050  # calls take 50 ms: a wait for the slot is ~50 ms
    async with admission.admit(Priority.RECOMMEND, time.monotonic() + 1):
        started = time.perf_counter()
        with pytest.raises(Overloaded) as refused:
            await admission.acquire(Priority.RECOMMEND, time.monotonic() + 1)
        assert time.perf_counter() - started < 0.005
        assert refused.value.retry_after_s == pytest.approx(0.050)
    assert admission.in_flight == 0 and admission.stats.shed == 1


async def test_a_queued_call_takes_the_next_free_slot() -> None:
    admission = Admission(fixed(1))  # no latency known yet: an expected wait of zero
    order: list[str] = []

    async def call(name: str, hold_s: float) -> None:
        async with admission.admit(Priority.RECOMMEND, time.monotonic() + 1):
            order.append(name)
            await asyncio.sleep(hold_s)

    await asyncio.gather(call("first", 0.02), call("second", 0.0))
    assert order == ["first", "second"] and admission.in_flight == 0


async def test_writes_are_admitted_before_recommend_and_displace_it_from_a_full_queue() -> None:
    admission = Admission(fixed(1, max_queue=1))
    order: list[str] = []
    outcomes: dict[str, str] = {}

    async def call(name: str, priority: Priority) -> None:
        try:
            async with admission.admit(priority, time.monotonic() + 1):
                order.append(name)
                await asyncio.sleep(0.01)
            outcomes[name] = "ok"
        except Overloaded:
            outcomes[name] = "refused"

    holder = asyncio.create_task(call("holder", Priority.RECOMMEND))
    await asyncio.sleep(0)
    queued = asyncio.create_task(call("recommend", Priority.RECOMMEND))
    await asyncio.sleep(0)
    write = asyncio.create_task(call("feedback", Priority.WRITE))
    await asyncio.gather(holder, queued, write)
    assert outcomes == {"holder": "ok", "recommend": "refused", "feedback": "ok"}
    assert order == ["holder", "feedback"]
    assert admission.stats.shed_displaced == 1


async def test_a_write_waits_ahead_of_recommends_already_queued() -> None:
    admission = Admission(fixed(1, max_queue=4))
    order: list[str] = []

    async def call(name: str, priority: Priority) -> None:
        async with admission.admit(priority, time.monotonic() + 1):
            order.append(name)
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(call("holder", Priority.RECOMMEND))]
    await asyncio.sleep(0)
    for name, priority in [("r1", Priority.RECOMMEND), ("r2", Priority.RECOMMEND), ("w", Priority.WRITE)]:
        tasks.append(asyncio.create_task(call(name, priority)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["holder", "w", "r1", "r2"]


async def test_a_queued_call_is_refused_when_its_budget_runs_out() -> None:
    admission = Admission(fixed(1))
    async with admission.admit(Priority.RECOMMEND, time.monotonic() + 1):
        with pytest.raises(Overloaded, match="budget"):
            await admission.acquire(Priority.WRITE, time.monotonic() + 0.05)
    assert admission.stats.timed_out == 1 and admission.in_flight == 0 and admission.queued == 0


async def test_with_admission_off_every_call_starts() -> None:
    admission = Admission(AdmissionConfig(enabled=False))
    tickets = [await admission.acquire(Priority.RECOMMEND, time.monotonic()) for _ in range(1000)]
    assert admission.in_flight == 1000
    for ticket in tickets:
        admission.release(ticket)
    assert admission.in_flight == 0


async def test_the_gateway_refuses_with_resource_exhausted_and_a_retry_hint(tiny_bundle: Path, tmp_path: Path
                                                                           ) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with serving_stack(tiny_bundle, tmp_path / "events.sqlite", admission=fixed(1, max_queue=4)) as (gw, _, _):
        answer = gw.funnel.recommend

        async def slow_recommend(query, deadline):  # type: ignore[no-untyped-def]  # a stage gone slow
            await asyncio.sleep(0.3)
            return await answer(query, deadline)

        gw.funnel.recommend = slow_recommend  # type: ignore[method-assign]
        gw.admission.limiter.last_median_s = 0.3
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            holder = asyncio.ensure_future(stub.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=5),
                                                        timeout=5))
            await asyncio.sleep(0.05)
            feedback = asyncio.ensure_future(stub.Feedback(recommender_pb2.FeedbackRequest(events=[
                recommender_pb2.Event(user_id="u1", item_id="i1", event_id=uuid.uuid4().hex)]), timeout=5))
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Recommend(recommender_pb2.RecommendRequest(user_id="u2", k=5), timeout=5)
            refused_in = time.perf_counter() - started
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            assert (await holder).items
            assert (await feedback).accepted == 1  # it waited for the slot rather than being refused
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after 300 ms" in (refused.value.details() or "")
    assert dict(refused.value.trailing_metadata() or ())[RETRY_AFTER_KEY] == "300"
    assert refused_in < 0.1
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_model_swap_holds_the_limit_while_its_loading_slows_every_call() -> None:
    clock = FakeClock()
    admission = Admission(AdmissionConfig(initial_limit=16, window_min_samples=1), clock)

    async def calls(count: int, latency_s: float) -> None:
        for _ in range(count):
            ticket = await admission.acquire(Priority.RECOMMEND, clock() + 1)
            clock.now += latency_s
            admission.release(ticket)
            clock.now += admission.config.window_s

    await calls(3, 0.01)  # the no-load latency is known
    with admission.limit_held():
        await calls(20, 0.3)  # 30 x slower while the new version loads
    assert admission.limit == 16
    await calls(3, 0.3)
    assert admission.limit < 16
