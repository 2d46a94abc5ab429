"""Capacity and overload measurement, and the gateway's recovery from an overload of a slow stage."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.harness import LoadResult, Sample
from bench.loadtest import LoadTest, Mix
from bench.overload import Ramp, phase_report, run_overload, windowed_p99
from gateway.admission import AdmissionConfig
from gateway.exposures import ExposureConfig
from recdata.dataset import Dataset
from tests.grpc_checks import serving_stack


def test_a_ramp_is_parsed_with_its_allowed_form() -> None:
    assert Ramp.parse("50:200:50").rates() == [50.0, 100.0, 150.0, 200.0]
    for bad in ("50:200", "0:100:10", "100:50:10", "a:b:c", "1:10000:1"):
        with pytest.raises(ValueError, match="ramp"):
            Ramp.parse(bad)


def test_a_phase_counts_goodput_refusals_and_their_latency_apart() -> None:
    result = LoadResult(100.0, wall_s=1.0, samples=[
        *(Sample(0.01 * n, 10.0, "Recommend", "OK") for n in range(60)),
        *(Sample(0.01 * n, 12.0, "Recommend", "OK", degraded=True) for n in range(10)),
        *(Sample(0.01 * n, 2.0, "Recommend", "RESOURCE_EXHAUSTED") for n in range(30))])
    report = phase_report(result)
    assert report["goodput_rps"] == 60 and report["good_share"] == 0.6 and report["shed_share"] == 0.3
    assert report["refusal"]["p99_ms"] == 2.0 and report["recommend_admitted"]["p50_ms"] == 10.0


def test_windowed_p99_starts_each_window_a_second_apart() -> None:
    samples = [Sample(float(t) / 10, 100.0 if t < 20 else 10.0, "Recommend", "OK") for t in range(100)]
    windows = windowed_p99(samples, 0.0, 10.0, window_s=5.0)
    assert [w["from_s"] for w in windows] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert windows[0]["p99_ms"] == 100.0 and windows[2]["p99_ms"] == 10.0


STAGE_SLOTS, STAGE_SECONDS = 10, 0.08  # the slow stage: 125 calls/s
CAPACITY_RPS = 90.0  # the mix's rate taken as capacity: 80% Recommend, 72/s; twice that is 144/s (> 125)


class BoundedStage:
    """A stage that takes 80 ms a call and does at most 10 at once (125 calls/s), slow
    enough that the test process's own work is small beside it: the load generator and the
    gateway share this process's interpreter, and at twice the capacity it offers them 180
    calls/s, which a slow 2-core machine still serves. Without admission control an overload
    queues in front of it."""

    def __init__(self, answer: Any):
        self.answer = answer
        self.slots = asyncio.Semaphore(STAGE_SLOTS)

    async def __call__(self, query: Any, deadline: float) -> Any:
        async with self.slots:
            await asyncio.sleep(STAGE_SECONDS)
        return await self.answer(query, deadline)


@pytest.fixture
def slow_gateway(tiny_bundle: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A gateway whose funnel is a BoundedStage, on an event loop of its own thread."""
    loop = asyncio.new_event_loop()
    started: dict[str, str] = {}
    stop = asyncio.Event()

    async def serve() -> None:
        # The exposure log is off: its batched SQLite writes after the overload are load of their
        # own on these 2 cores, beside what this measures (admission control); its cost is
        # measured at 100 rps by `recfunnel bench api` (exposure_cost).
        async with serving_stack(tiny_bundle, tmp_path / "events.sqlite", admission=request.param,
                                 exposures=ExposureConfig(enabled=False)) as (gw, _, _):
            gw.funnel.recommend = BoundedStage(gw.funnel.recommend)  # type: ignore[method-assign]
            started["address"] = gw.address
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    while "address" not in started and thread.is_alive():
        threading.Event().wait(0.05)
    yield started["address"]
    loop.call_soon_threadsafe(stop.set)
    thread.join(timeout=30)


# A tolerance of 1.5 x the no-load median (2 x by default) leaves a margin between the bound
# below and the limit's own first windows, which admit a little more before it shrinks.
@pytest.mark.parametrize("slow_gateway", [AdmissionConfig(tolerance=1.5)], indirect=True)
def test_under_twice_its_capacity_the_gateway_sheds_the_excess_and_loses_no_feedback(
        slow_gateway: str, tiny_dataset: Dataset) -> None:
    mix = Mix(tuple(tiny_dataset.user_ids), tuple(tiny_dataset.item_ids), k=5)
    # Phases long enough for a p99 of a few hundred answers each, not of the slowest two.
    report = run_overload(LoadTest(slow_gateway, CAPACITY_RPS, 1.0), mix, capacity_rps=CAPACITY_RPS, phase_s=6.0,
                          recovery_s=10.0)
    overload = report["overload"]
    assert overload["shed_share"] > 0.05  # the excess was refused
    assert set(overload["errors"]) <= {"RESOURCE_EXHAUSTED"}
    assert report["goodput_over_capacity"] >= 0.9
    # What was admitted stayed fast: within the limiter's tolerance of the no-load median plus
    # its tail, while the same overload without it queues to 4 x and more (below).
    assert overload["recommend_admitted"]["p99_ms"] < 3 * report["before"]["p99_ms"]
    assert report["feedback"]["lost"] == 0 and report["feedback"]["acknowledged"] > 0


# The recovery's bound is a speed target at the 1.2 x margin, and on these 2 cores a 5 s p99
# of the same load moves by up to a fifth from one window to the next (bench/overload.py), so
# it is judged here in the slow suite and recorded by `recfunnel bench overload`, not in CI.
@pytest.mark.slow
@pytest.mark.parametrize("slow_gateway", [AdmissionConfig(tolerance=1.5)], indirect=True)
def test_after_twice_its_capacity_the_gateway_recovers_at_once(slow_gateway: str, tiny_dataset: Dataset) -> None:
    mix = Mix(tuple(tiny_dataset.user_ids), tuple(tiny_dataset.item_ids), k=5)
    report = run_overload(LoadTest(slow_gateway, CAPACITY_RPS, 1.0), mix, capacity_rps=CAPACITY_RPS, phase_s=6.0,
                          recovery_s=20.0)
    # Nothing is left to drain once the overload ends: back within 1.2 x within 10 s (each 5 s
    # window's p99 against those of the phase before, as long as the recovery) and staying there.
    assert report["recovered_after_s"] is not None and report["recovered_after_s"] <= 10.0
    assert report["p99_after_10s_over_before"] <= 1.2
    assert report["feedback"]["lost"] == 0


@pytest.mark.parametrize("slow_gateway", [AdmissionConfig(enabled=False)], indirect=True)
def test_without_admission_control_the_same_overload_queues_up(slow_gateway: str, tiny_dataset: Dataset) -> None:
    """The contrast that shows what the test above measures: every call admitted, a queue
    builds in front of the slow stage, and what is answered is answered late."""
    mix = Mix(tuple(tiny_dataset.user_ids), tuple(tiny_dataset.item_ids), k=5)
    # The queue grows for as long as the overload lasts: six seconds of it, as above, take its
    # p99 to 8-10 x the no-load one here; three took it to 4.2-7 x, too near the bound when the
    # no-load phase happens to be slow.
    report = run_overload(LoadTest(slow_gateway, CAPACITY_RPS, 1.0), mix, capacity_rps=CAPACITY_RPS, phase_s=6.0,
                          recovery_s=10.0)
    assert report["overload"]["shed_share"] == 0
    assert report["overload"]["recommend_admitted"]["p99_ms"] > 4 * report["before"]["p99_ms"]
    assert report["feedback"]["lost"] == 0
