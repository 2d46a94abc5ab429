"""Canary rollout: a new version serves a share of users, then is promoted or rolled back."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from cluster.canary import CanaryConfig, canary_experiment, canary_verdict, run_canary
from cluster.loop import LoopConfig
from gateway.events import Event, EventLog, Exposure
from gateway.experiments import CONFIGURED, EXPERIMENT_SETTING, Experiment, RunningExperiment, Variant


class RecordingSwap:
    def __init__(self) -> None:
        self.swapped: list[Path] = []

    def swap(self, bundle: Path) -> dict[str, Any]:
        self.swapped.append(bundle)
        return {"model_version": "v2"}


class SimulatedTraffic(threading.Thread):
    """Users answered by whichever experiment the store's setting runs, clicking the first
    item with each variant's click rate: what gateways and their users would log."""

    def __init__(self, log: EventLog, click_rate: dict[str, float], answers: int = 3000):
        super().__init__(daemon=True)
        self.log, self.click_rate, self.answers = log, click_rate, answers
        self.rng = random.Random(7)

    def run(self) -> None:
        experiment = None
        while experiment is None:
            raw = self.log.setting(EXPERIMENT_SETTING)
            experiment = Experiment.from_dict(json.loads(raw)) if raw and raw != CONFIGURED else None
        for n in range(self.answers):
            user = f"u{n}"
            variant = experiment.assign(user)
            request = f"r{n}"
            self.log.record_exposures([Exposure(request, user, f"i{p}", p, 1.0, "v", experiment.label(variant))
                                       for p in range(10)])
            if self.rng.random() < self.click_rate[variant.name]:
                self.log.append([Event(user, "i0", "click", request_id=request)])


def canary_run(tmp_path: Path, click_rate: dict[str, float], answers: int = 3000,
               config: CanaryConfig | None = None) -> tuple[dict[str, Any], RecordingSwap, EventLog]:
    log = EventLog(tmp_path / "events.sqlite")
    serving = RecordingSwap()
    traffic = SimulatedTraffic(log, click_rate, answers)
    traffic.start()
    config = config or CanaryConfig(share=0.3, min_answers=600, max_seconds=60, poll_s=0.05)
    outcome = run_canary(log, serving, tmp_path / "round-1", "v2", config)
    traffic.join(timeout=60)
    return outcome, serving, log


def test_a_canary_no_worse_than_the_control_is_promoted(tmp_path: Path) -> None:
    outcome, serving, log = canary_run(tmp_path, {"control": 0.2, "canary": 0.22})
    assert outcome["promote"] and serving.swapped == [tmp_path / "round-1"]
    assert outcome["answers"]["canary"] >= 600 and outcome["answers"]["control"] >= 600
    assert outcome["swap"] == {"model_version": "v2"} and "not worse" in outcome["reason"]
    assert log.setting(EXPERIMENT_SETTING) == CONFIGURED  # the gateways' own experiment again
    log.close()


def test_a_canary_worse_than_the_control_is_rolled_back(tmp_path: Path) -> None:
    outcome, serving, log = canary_run(tmp_path, {"control": 0.3, "canary": 0.1})
    assert not outcome["promote"] and serving.swapped == [] and "worse" in outcome["reason"]
    assert outcome["difference"] < 0 and outcome["p_value"] < 0.05
    assert log.setting(EXPERIMENT_SETTING) == CONFIGURED
    log.close()


def test_a_canary_without_enough_answers_is_rolled_back_and_the_running_experiment_restored(
        tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.sqlite")
    running = Experiment("diversity", (Variant("control", 0.5), Variant("diverse", 0.5, diversity=0.4)))
    log.set_setting(EXPERIMENT_SETTING, running.to_json())
    clock = iter(range(0, 1000, 10))
    outcome = run_canary(log, RecordingSwap(), tmp_path / "b", "v2", CanaryConfig(share=0.1, max_seconds=30),
                         sleep=lambda _: None, clock=lambda: float(next(clock)))
    assert not outcome["promote"] and "fewer than 1000 answers per variant after 30 s" in outcome["reason"]
    assert log.setting(EXPERIMENT_SETTING) == running.to_json()
    log.close()


def test_the_verdict_waits_for_both_variants_and_reads_the_test() -> None:
    experiment = canary_experiment("v2", Path("b"), 0.2)
    assert experiment.name.startswith("canary-") and experiment.variants[1].bundle == "b"
    assert canary_experiment("v3", Path("b"), 0.2).salt != experiment.salt  # each canary draws its own users
    config = CanaryConfig(share=0.2, min_answers=100)

    def report(answers: int, difference: float, p: float) -> dict[str, Any]:
        figures = {"ctr@10": {"value": 0.1}}
        canary = {"answers": answers, **figures,
                  "against_control": {"ctr@10": {"difference": difference, "p_value": p}}}
        return {"groups": {f"{experiment.name}/control": {"answers": 500, **figures},
                           f"{experiment.name}/canary": canary}}

    assert canary_verdict(report(99, 0.0, 1.0), experiment, config) is None
    assert canary_verdict(report(100, -0.01, 0.2), experiment, config)["promote"]  # lower, not significantly
    assert not canary_verdict(report(100, -0.01, 0.01), experiment, config)["promote"]
    assert canary_verdict(report(100, 0.02, 0.001), experiment, config)["promote"]


def test_the_loop_reads_its_canary_and_bad_settings_are_refused() -> None:
    loop = LoopConfig.from_dict({"canary": {"share": 0.1, "metric": "conversion", "click_types": ["click"]}})
    assert loop.canary == CanaryConfig(share=0.1, metric="conversion")
    for bad, message in (({"share": 1.0}, "share=1.0 must be in"), ({"metric": "ndcg"}, "metric 'ndcg' unknown"),
                         ({"alpha": 0.0}, "alpha=0.0"), ({"shares": 0.1}, "unknown settings")):
        with pytest.raises(ValueError, match=message):
            CanaryConfig.from_dict(bad)


def test_configured_in_the_setting_runs_the_gateways_own_experiment() -> None:
    configured = Experiment("mine", (Variant("control", 0.5), Variant("b", 0.5)))

    class Store:
        value: str | None = CONFIGURED

        def setting(self, key: str) -> str | None:
            return self.value

    store = Store()
    running = RunningExperiment(configured, store)
    running.refresh()
    assert running.current == configured
    store.value = ""
    running.refresh()
    assert running.current is None
