"""Online metrics: what answers led to, per experiment variant or model version.

The exposure log says what each answer showed and where; events that name the answer's
request id say what the user then did with those items. Per group of answers:

  * `ctr@k`: clicked items in the first k places over items shown there;
  * `conversion@k`: share of answers with a conversion on an item of their first k places;
  * `mrr@k`: mean over answers of 1 / (1 + the first clicked place), 0 without a click.

Each figure is a mean over answers (a ratio of sums for CTR), so its standard error treats
the answer as the unit: the items of one answer are shown to one user at once and are not
independent draws. CTR's is the ratio (delta-method) estimate, the others the plain standard
error of a mean. Intervals are 95% normal ones; each group is tested against the control by a
two-sided z-test of the difference. Cost: one pass over the exposures and the attributed
events, memory one row an answer.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gateway.propensity import estimate_propensity

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
NO_GROUP = "(none)"       # answers served outside any experiment


class OutcomeSource(Protocol):
    """What the report reads of the event store (`gateway.events.EventStore` has both)."""

    def answer_sizes(self, by: str, k: int) -> list[tuple[str, str, int]]: ...
    def attributed_outcomes(self) -> list[tuple[str, int, str]]: ...
    def position_outcomes(self, click_types: tuple[str, ...], depth: int) -> list[tuple[int, int, int, int]]: ...


@dataclass(frozen=True)
class ReportConfig:
    k: int = 10
    click_types: tuple[str, ...] = ("click",)
    conversion_types: tuple[str, ...] = ("purchase",)
    by: str = "variant"              # or "model_version"
    control: str | None = None       # the group the others are tested against; None: "control" (or an
                                     # experiment's "…/control") if there is one, else the one with most answers
    propensity_depth: int = 10       # places the position-bias estimate covers (`[exploration]` depth)

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 1000:
            raise ValueError(f"k={self.k} must be in 1..1000")
        if not self.click_types:
            raise ValueError("at least one click event type is needed")
        if not 2 <= self.propensity_depth <= 100:
            raise ValueError(f"propensity_depth={self.propensity_depth} must be in 2..100")


@dataclass(frozen=True)
class Answers:
    """One group's answers, one entry each."""

    shown: np.ndarray       # items in the first k places
    clicks: np.ndarray      # distinct clicked items among them
    converted: np.ndarray   # 1 where an item among them was converted on
    reciprocal: np.ndarray  # 1 / (1 + first clicked place), 0 without a click


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "se": self.se, "low": self.value - Z_95 * self.se,
                "high": self.value + Z_95 * self.se}


def ratio_estimate(numerators: np.ndarray, denominators: np.ndarray) -> Estimate:
    """Σ numerators / Σ denominators over n units, with the delta-method standard error
    sqrt(Σ (y_i − R x_i)² / (n (n − 1))) / mean(x); a plain mean where every x is 1."""
    n = len(numerators)
    total = float(denominators.sum())
    if n == 0 or total == 0:
        return Estimate(math.nan, math.nan)
    ratio = float(numerators.sum()) / total
    if n < 2:
        return Estimate(ratio, math.nan)
    residuals = numerators - ratio * denominators
    se = math.sqrt(float((residuals**2).sum()) / (n * (n - 1))) / (total / n)
    return Estimate(ratio, se)


def against_control(group: Estimate, control: Estimate) -> dict[str, float]:
    """The difference group − control with its 95% interval, the relative lift, and the
    two-sided p-value of a z-test of no difference."""
    difference = group.value - control.value
    se = math.hypot(group.se, control.se)
    p = math.erfc(abs(difference / se) / math.sqrt(2)) if se > 0 else (0.0 if difference else 1.0)
    return {"difference": difference, "low": difference - Z_95 * se, "high": difference + Z_95 * se,
            "lift": difference / control.value if control.value else math.nan, "p_value": p}


def group_answers(sizes: list[tuple[str, str, int]], outcomes: list[tuple[str, int, str]],
                  config: ReportConfig) -> dict[str, Answers]:
    """Each group's answers from the store's rows (`OutcomeSource`)."""
    clicked: dict[str, set[int]] = defaultdict(set)
    converted: set[str] = set()
    clicks, conversions = set(config.click_types), set(config.conversion_types)
    for request, position, kind in outcomes:
        if position >= config.k:
            continue
        if kind in clicks:
            clicked[request].add(position)
        if kind in conversions:
            converted.add(request)
    columns: dict[str, list[tuple[int, int, int, float]]] = defaultdict(list)
    for request, group, shown in sizes:
        places = clicked.get(request, set())
        columns[group or NO_GROUP].append((shown, len(places), int(request in converted),
                                           1.0 / (1 + min(places)) if places else 0.0))
    return {group: Answers(*(np.array(column, dtype=np.float64) for column in zip(*rows, strict=True)))
            for group, rows in columns.items()}


def online_report(source: OutcomeSource, config: ReportConfig) -> dict[str, Any]:
    """Per group: answers, exposures, ctr@k, conversion@k and mrr@k with their intervals, and
    each against the control."""
    groups = group_answers(source.answer_sizes(config.by, config.k), source.attributed_outcomes(), config)
    k = config.k
    figures: dict[str, dict[str, Any]] = {}
    estimates: dict[str, dict[str, Estimate]] = {}
    for name, answers in sorted(groups.items()):
        ones = np.ones(len(answers.shown))
        estimates[name] = {f"ctr@{k}": ratio_estimate(answers.clicks, answers.shown),
                           f"conversion@{k}": ratio_estimate(answers.converted, ones),
                           f"mrr@{k}": ratio_estimate(answers.reciprocal, ones)}
        figures[name] = {"answers": len(answers.shown), "exposures": int(answers.shown.sum()),
                         "clicks": int(answers.clicks.sum()), "conversions": int(answers.converted.sum()),
                         **{metric: e.to_dict() for metric, e in estimates[name].items()}}
    control = config.control
    if control is None and groups:
        named = sorted(g for g in groups if g == "control" or g.endswith("/control"))
        control = named[0] if named else max(groups, key=lambda g: len(groups[g].shown))
    if control is not None and control not in groups:
        raise ValueError(f"control {control!r} has no answers; groups: {', '.join(sorted(groups)) or 'none'}")
    for name in figures:
        if control is not None and name != control:
            figures[name]["against_control"] = {metric: against_control(estimate, estimates[control][metric])
                                                for metric, estimate in estimates[name].items()}
    return {"by": config.by, "k": k, "click_types": list(config.click_types),
            "conversion_types": list(config.conversion_types), "control": control, "groups": figures,
            "position_propensity": position_bias(source, config)}


def position_bias(source: OutcomeSource, config: ReportConfig) -> dict[str, Any] | None:
    """The click propensity of each place, from answers that exploration swapped; None when
    no answer was swapped (exploration off)."""
    outcomes = source.position_outcomes(config.click_types, config.propensity_depth)
    swapped = sum(exposures for shown, ranked, exposures, _ in outcomes if shown != ranked)
    if not swapped:
        return None
    return {"swapped_exposures": swapped, **estimate_propensity(outcomes, config.propensity_depth).to_json()}
