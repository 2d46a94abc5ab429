"""Canary rollout: a new version serves a share of the users before it serves everyone.

Offline, the feedback loop judges a new version on held-out events; what users then do is
the judgement that counts. With `[loop.canary] share > 0` a version that passed offline is
started as an experiment (`gateway.experiments`): variant `canary` serves its bundle to
`share` of the users (salted by the version, so each canary draws its own users), `control`
the serving version to the rest. Once both have `min_answers` answers, the canary's online
metric (CTR, conversion or MRR at k, from `gateway.online_metrics`) is tested against the
control's: promoted (the live swap to everyone) unless it is worse at level `alpha`, rolled
back otherwise; too few answers by `max_seconds` rolls back too. Whatever experiment ran
before the canary runs again afterwards.

Cost: one report over the exposure log every `poll_s` while the canary runs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.events import EventStore
from gateway.experiments import CONFIGURED, EXPERIMENT_SETTING, Experiment, Variant
from gateway.online_metrics import ReportConfig, online_report

log = logging.getLogger(__name__)

METRICS = ("ctr", "conversion", "mrr")


@dataclass(frozen=True)
class CanaryConfig:
    share: float = 0.0            # of the users the canary serves; 0 = roll out to everyone at once
    metric: str = "ctr"           # ctr | conversion | mrr, at k
    k: int = 10
    click_types: tuple[str, ...] = ("click",)
    conversion_types: tuple[str, ...] = ("purchase",)
    min_answers: int = 1000       # per variant before the test is read
    max_seconds: float = 3600.0   # without enough answers by then: rolled back
    alpha: float = 0.05           # "worse" = lower with a two-sided p-value below this
    poll_s: float = 10.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.share) and 0 <= self.share < 1):
            raise ValueError(f"canary share={self.share} must be in [0, 1): the control keeps some users")
        if self.metric not in METRICS:
            raise ValueError(f"canary metric {self.metric!r} unknown; allowed: {', '.join(METRICS)}")
        if not 1 <= self.k <= 1000 or self.min_answers < 1 or self.max_seconds <= 0 or self.poll_s <= 0:
            raise ValueError("canary k must be in 1..1000, min_answers >= 1, max_seconds and poll_s > 0")
        if not 0 < self.alpha < 1 or not self.click_types:
            raise ValueError(f"canary alpha={self.alpha} must be in (0, 1) and click_types non-empty")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CanaryConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"[loop.canary]: unknown settings {sorted(unknown)}; allowed: "
                             f"{', '.join(sorted(cls.__dataclass_fields__))}")
        values = {k: tuple(v) if k.endswith("_types") else v for k, v in values.items()}
        return cls(**values)


class Swapper(Protocol):
    def swap(self, bundle: Path) -> dict[str, Any]: ...


def canary_experiment(version: str, bundle: Path, share: float) -> Experiment:
    """The canary as an experiment named (and salted) by the version: its answers are apart
    from any earlier canary's in the exposure log."""
    name = "canary-" + hashlib.sha256(version.encode()).hexdigest()[:12]
    return Experiment(name, (Variant("control", 1.0 - share), Variant("canary", share, bundle=str(bundle))),
                      salt=name)


def canary_verdict(report: dict[str, Any], experiment: Experiment, config: CanaryConfig) -> dict[str, Any] | None:
    """The decision from an online report, or None while a variant has too few answers."""
    groups = report["groups"]
    control, canary = (groups.get(f"{experiment.name}/{v}") for v in ("control", "canary"))
    if control is None or canary is None or min(control["answers"], canary["answers"]) < config.min_answers:
        return None
    metric = f"{config.metric}@{config.k}"
    test = canary["against_control"][metric]
    worse = test["difference"] < 0 and test["p_value"] < config.alpha
    return {"promote": not worse, "metric": metric, "canary": canary[metric]["value"],
            "control": control[metric]["value"], "difference": test["difference"], "p_value": test["p_value"],
            "answers": {"canary": canary["answers"], "control": control["answers"]},
            "reason": f"canary {metric} {canary[metric]['value']:.4f} vs control {control[metric]['value']:.4f}, "
                      f"p = {test['p_value']:.3g}: {'worse' if worse else 'not worse'} at alpha {config.alpha}"}


def run_canary(events: EventStore, serving: Swapper, bundle: Path, version: str, config: CanaryConfig,
               sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic
               ) -> dict[str, Any]:
    """Serve `bundle` to the canary's share, judge it online, then promote (swap) or roll back."""
    experiment = canary_experiment(version, bundle, config.share)
    before = events.setting(EXPERIMENT_SETTING)
    report_config = ReportConfig(k=config.k, click_types=config.click_types,
                                 conversion_types=config.conversion_types, control=f"{experiment.name}/control")
    events.set_setting(EXPERIMENT_SETTING, experiment.to_json())  # every gateway within its poll
    log.info("canary %s: %s serves %.0f%% of users", experiment.name, version, 100 * config.share)
    started = clock()
    verdict: dict[str, Any] | None = None
    outcome: dict[str, Any] = {"experiment": experiment.name, "share": config.share}
    try:
        while verdict is None and clock() - started < config.max_seconds:
            sleep(config.poll_s)
            try:
                verdict = canary_verdict(online_report(events, report_config), experiment, config)
            except ValueError:  # the control has no answers yet
                verdict = None
        if verdict is None:
            verdict = {"promote": False, "reason": f"fewer than {config.min_answers} answers per variant after "
                                                   f"{config.max_seconds:g} s"}
        if verdict["promote"]:  # swapped while the canary still serves: its version is never unloaded
            outcome["swap"] = serving.swap(bundle)
    finally:
        events.set_setting(EXPERIMENT_SETTING, CONFIGURED if before is None else before)
    outcome.update(verdict, seconds=round(clock() - started, 2))
    log.info("canary %s: %s", experiment.name, verdict["reason"])
    return outcome
