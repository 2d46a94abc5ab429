"""Capacity and overload, measured on any gateway: `recfunnel loadtest --ramp` and `--overload`.

* A ramp offers rising open-loop rates, one step at a time, and finds the capacity: the
  highest offered rate whose answers kept their p99 under a bound with at least 95% of the
  calls answered well (OK and not degraded: the goodput).
* An overload run offers half the capacity (the "before" latency), then twice the capacity,
  then half again, and reports what the gateway admitted and refused during the overload and
  how soon the p99 came back afterwards. Every Feedback event acknowledged during the run is
  sent again afterwards with the same event ids: the gateway must answer all of them as
  duplicates, or an acknowledged event was lost.

`recfunnel bench overload` runs both on a stack of its own (shards, ranker and two gateways as
processes, one with admission control and one without) and compares them in one run.

Latency is counted from each call's scheduled send time (`bench.harness.open_loop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import LoadResult, Sample, open_loop, percentiles_ms, process_stack
from bench.loadtest import LoadTest, Mix, mix_call
from protos.auth import call_metadata, open_channel
from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc
from protos.serving import CHANNEL_OPTIONS, freeze_loaded_objects

REFUSED = "RESOURCE_EXHAUSTED"
GOOD_SHARE = 0.95        # of the offered calls answered well, for a step to count as within capacity
FEEDBACK_CHECK_BATCH = 1000  # events per Feedback call of the loss check (the gateway's max_events)


@dataclass(frozen=True)
class Ramp:
    start: float
    stop: float
    step: float

    @classmethod
    def parse(cls, text: str) -> Ramp:
        """FROM:TO:STEP in requests/s, e.g. 50:400:50."""
        try:
            start, stop, step = (float(part) for part in text.split(":"))
        except ValueError:
            raise ValueError(f"ramp {text!r}: give FROM:TO:STEP in requests/s, e.g. 50:400:50") from None
        if not (0 < start <= stop <= 100_000 and step > 0):
            raise ValueError(f"ramp {text!r}: need 0 < FROM <= TO <= 100000 and STEP > 0")
        if (stop - start) / step > 200:
            raise ValueError(f"ramp {text!r} has more than 200 steps")
        return cls(start, stop, step)

    def rates(self) -> list[float]:
        return [float(r) for r in np.arange(self.start, self.stop + self.step / 2, self.step)]


async def health_round_trips(test: LoadTest, every_s: float, latencies_ms: list[float]) -> None:
    """Health checks one after another on a channel of their own, until cancelled: the least
    any answer of the gateway takes under the load beside it (they are never limited)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    loop = asyncio.get_running_loop()
    async with open_channel(test.target, tls_ca=test.tls_ca, options=CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            sent = loop.time()
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            latencies_ms.append((loop.time() - sent) * 1000)
            await asyncio.sleep(every_s)


async def run_phase(test: LoadTest, mix: Mix, rate: float, seconds: float, seed: int,
                    acknowledged: list[recommender_pb2.Event] | None = None, health_ms: list[float] | None = None
                    ) -> LoadResult:
    """Open-loop load at `rate` for `seconds` on one channel, no warm-up; Feedback events
    acknowledged go to `acknowledged`, health-check round trips beside it to `health_ms`."""
    prober = (asyncio.get_running_loop().create_task(health_round_trips(test, 0.02, health_ms))
              if health_ms is not None else None)
    try:
        async with open_channel(test.target, tls_ca=test.tls_ca, options=CHANNEL_OPTIONS) as channel:
            call = mix_call(recommender_pb2_grpc.RecommenderStub(channel), test, acknowledged)
            count = min(int(rate * seconds * 1.2) + 10, 200_000)
            return await open_loop(call, mix.requests(count, seed), rate, seconds, seed)
    finally:
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober


def phase_report(result: LoadResult) -> dict[str, Any]:
    """The figures of one phase: goodput, admitted latency, refusals and their latency."""
    samples = result.samples
    wall = max(result.wall_s, 1e-9)
    good = [s for s in samples if s.status == "OK" and not s.degraded]
    refused = [s for s in samples if s.status == REFUSED]
    recommends = [s for s in samples if s.kind == "Recommend" and s.status == "OK"]
    return {
        **result.summary(),
        "goodput_rps": round(len(good) / wall, 2),
        "good_share": round(len(good) / max(len(samples), 1), 4),
        "shed_share": round(len(refused) / max(len(samples), 1), 4),
        "recommend_admitted": percentiles_ms(s.latency_ms for s in recommends),
        "refusal": percentiles_ms(s.latency_ms for s in refused),
    }


def run_ramp(test: LoadTest, mix: Mix, ramp: Ramp, p99_bound_ms: float, step_s: float,
             progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Each rate of the ramp for `step_s` seconds; the capacity is the highest rate within bounds."""
    freeze_loaded_objects()  # the sender's own full collections would show as 100 ms stalls
    steps = []
    for n, rate in enumerate(ramp.rates()):
        progress(f"ramp: {rate:g} requests/s for {step_s:g} s")
        steps.append(phase_report(asyncio.run(run_phase(test, mix, rate, step_s, test.seed + n))))
    within = [s for s in steps if s["p99_ms"] <= p99_bound_ms and s["good_share"] >= GOOD_SHARE]
    capacity = max((s["offered_rps"] for s in within), default=0.0)
    return {"target": test.target, "p99_bound_ms": p99_bound_ms, "good_share_bound": GOOD_SHARE,
            "step_s": step_s, "capacity_rps": capacity,
            "p99_at_capacity_ms": next((s["p99_ms"] for s in within if s["offered_rps"] == capacity), None),
            "steps": steps}


def windowed_p99(samples: list[Sample], start_s: float, end_s: float, window_s: float) -> list[dict[str, float]]:
    """p99 of the answers sent in each window of `window_s` seconds, from start_s to end_s."""
    out = []
    for begin in np.arange(start_s, end_s - window_s + 0.5, 1.0):  # whole windows only
        chosen = [s.latency_ms for s in samples if begin <= s.sent_s < begin + window_s and s.status == "OK"]
        if chosen:
            out.append({"from_s": round(float(begin - start_s), 2), "p99_ms": round(float(np.percentile(chosen, 99)),
                                                                                   3)})
    return out


async def lost_feedback(test: LoadTest, acknowledged: list[recommender_pb2.Event]) -> dict[str, int]:
    """Send every acknowledged event again with its id: each must be a duplicate now."""
    metadata = call_metadata(test.token)
    resent = duplicates = 0
    async with open_channel(test.target, tls_ca=test.tls_ca, options=CHANNEL_OPTIONS) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        for start in range(0, len(acknowledged), FEEDBACK_CHECK_BATCH):
            batch = acknowledged[start:start + FEEDBACK_CHECK_BATCH]
            reply = await stub.Feedback(recommender_pb2.FeedbackRequest(events=batch), timeout=30, metadata=metadata)
            resent += len(batch)
            duplicates += reply.duplicates
    return {"acknowledged": len(acknowledged), "found_again": duplicates, "lost": resent - duplicates}


def run_overload(test: LoadTest, mix: Mix, capacity_rps: float, phase_s: float, recovery_s: float,
                 p99_at_capacity_ms: float | None = None, progress: Callable[[str], None] = lambda _: None
                 ) -> dict[str, Any]:
    """Half the capacity, twice the capacity, then half again; the recovery of the p99.

    The phase before runs as long as the recovery and is cut into the same 5 s windows: a
    5 s p99 is the third-slowest of some 200 answers, which moves by a fifth from one window
    to the next at an unchanged load, and a run's first seconds are often its fastest. A
    recovery judged against the p99 of a short first phase would count that noise as a slow
    recovery; judged window against window, it measures what the overload left behind."""
    if capacity_rps <= 0:
        raise ValueError("overload needs a capacity above 0 (from --capacity or a ramp)")
    freeze_loaded_objects()
    acknowledged: list[recommender_pb2.Event] = []
    phases: dict[str, LoadResult] = {}
    health_ms: list[float] = []
    for name, factor, seconds in (("before", 0.5, recovery_s), ("overload", 2.0, phase_s), ("after", 0.5, recovery_s)):
        progress(f"overload run: {name}, {capacity_rps * factor:g} requests/s for {seconds:g} s")
        phases[name] = asyncio.run(run_phase(test, mix, capacity_rps * factor, seconds, test.seed + len(phases),
                                             acknowledged, health_ms if name == "overload" else None))
    before, overload, after = (phase_report(phases[n]) for n in ("before", "overload", "after"))
    baseline = before["p99_ms"]
    before_windows = windowed_p99(phases["before"].samples, 0.0, recovery_s, window_s=5.0)
    window_baseline = float(np.median([w["p99_ms"] for w in before_windows])) if before_windows else baseline
    windows = windowed_p99(phases["after"].samples, 0.0, recovery_s, window_s=5.0)
    recovered = next((w["from_s"] for w in windows if w["p99_ms"] <= 1.2 * window_baseline), None)
    late = [s.latency_ms for s in phases["after"].samples if s.sent_s >= 10.0 and s.status == "OK"]
    p99_after_10s = round(float(np.percentile(late, 99)), 3) if late else None
    report: dict[str, Any] = {
        "target": test.target, "capacity_rps": capacity_rps, "phase_s": phase_s, "recovery_s": recovery_s,
        "before": before, "overload": overload, "after": after,
        "goodput_over_capacity": round(overload["goodput_rps"] / capacity_rps, 4),
        "p99_after_10s_ms": p99_after_10s,
        "p99_after_10s_over_before": round(p99_after_10s / baseline, 3) if p99_after_10s else None,
        "before_window_p99_ms": round(window_baseline, 3), "before_windows": before_windows,
        "recovered_after_s": recovered, "after_windows": windows,
        # The floor under any refusal: the gateway's cheapest answer, under the same overload.
        "health_check_during_overload": percentiles_ms(health_ms),
        "feedback": asyncio.run(lost_feedback(test, acknowledged)),
    }
    if p99_at_capacity_ms:
        admitted = overload["recommend_admitted"]["p99_ms"]
        report["admitted_p99_over_capacity_p99"] = round(admitted / p99_at_capacity_ms, 3)
    return report


# ---- `recfunnel bench overload`: the same measurements with and without admission control ----

@dataclass(frozen=True)
class OverloadBenchConfig:
    bundle: Path
    ramp: Ramp = Ramp(50.0, 500.0, 50.0)
    step_s: float = 10.0
    p99_bound_ms: float = 100.0
    compare_rate: float = 100.0     # below capacity: admission on against off, at this rate
    compare_s: float = 15.0
    compare_rounds: int = 4
    phase_s: float = 20.0
    recovery_s: float = 30.0
    seed: int = 0


def run_overload_bench(config: OverloadBenchConfig, progress: Callable[[str], None] = lambda _: None
                       ) -> dict[str, Any]:
    from cluster.demo import fresh_event_log
    from recdata.movielens import load_ml100k

    dataset = load_ml100k()
    mix = Mix(tuple(dataset.user_ids), tuple(dataset.item_ids))
    workdir = Path(tempfile.mkdtemp(prefix="recfunnel-overload-bench-"))
    db_path = fresh_event_log(workdir / "events.sqlite", dataset)
    report: dict[str, Any] = {"bundle": str(config.bundle)}
    progress("starting 2 recall shards, a ranker and two gateways (admission on and off)")
    with process_stack(config.bundle, db_path, {"on": [], "off": ["--no-admission"]}) as gateways:
        tests = {name: LoadTest(address, config.compare_rate, config.compare_s, seed=config.seed)
                 for name, address in gateways.items()}
        for name, test in tests.items():
            progress(f"warm-up, admission {name}")
            asyncio.run(run_phase(test, mix, config.compare_rate, 10.0, config.seed + 100))
        report["ramp"] = run_ramp(tests["on"], mix, config.ramp, config.p99_bound_ms, config.step_s, progress)
        rounds: dict[str, list[float]] = {"on": [], "off": []}
        pooled: dict[str, list[float]] = {"on": [], "off": []}
        for n in range(config.compare_rounds):
            for name in ("on", "off") if n % 2 == 0 else ("off", "on"):  # neither always goes first
                progress(f"below capacity: {config.compare_rate:g}/s, admission {name}, round {n + 1}")
                result = asyncio.run(run_phase(tests[name], mix, config.compare_rate, config.compare_s,
                                               config.seed + 200 + n))
                rounds[name].append(result.summary()["p99_ms"])
                pooled[name].extend(result.latencies_ms)
        p99 = {name: float(np.percentile(latencies, 99)) for name, latencies in pooled.items()}
        report["below_capacity"] = {
            "rate": config.compare_rate, "p99_ms_per_round_on": rounds["on"], "p99_ms_per_round_off": rounds["off"],
            # Every round's answers together: one p99 of ~6,000 answers a side is steadier
            # than a median of per-round p99s, which the 2-core machine's noise moves by 10%.
            "p99_ms_on": round(p99["on"], 3), "p99_ms_off": round(p99["off"], 3),
            "p99_on_over_off": round(p99["on"] / p99["off"], 3)}
        capacity = report["ramp"]["capacity_rps"]
        report["overload"] = {}
        for name in ("on", "off"):  # without admission last: what it leaves behind is not measured again
            report["overload"][f"admission {name}"] = run_overload(
                tests[name], mix, capacity, config.phase_s, config.recovery_s,
                report["ramp"]["p99_at_capacity_ms"], progress)
    shutil.rmtree(workdir, ignore_errors=True)
    return report
