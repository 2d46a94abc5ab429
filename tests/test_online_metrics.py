"""Online metrics: per-group CTR, conversion and MRR with intervals and a test against the
control, checked against a hand-computed example, through both event stores and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from gateway.events import Event, EventStore, Exposure, open_event_store
from gateway.online_metrics import ReportConfig, online_report, ratio_estimate
from tests.conftest import needs_pg

# Control: four answers of 3 items. a1 clicked at place 0; a2 nothing; a3 clicked at places 1
# and 2; a4 bought its first item. Variant b: b1 (3 items) clicked place 0 twice, b2 (2 items)
# clicked place 1, and place 5, which is past k = 3.
ANSWERS = {"a1": ("control", 3), "a2": ("control", 3), "a3": ("control", 3), "a4": ("control", 3),
           "b1": ("b", 3), "b2": ("b", 2)}
EVENTS = [("a1", 0, "click"), ("a3", 1, "click"), ("a3", 2, "click"), ("a4", 0, "purchase"),
          ("b1", 0, "click"), ("b1", 0, "click"), ("b2", 1, "click"), ("b2", 5, "click")]


def fill(store: EventStore) -> None:
    exposures = [Exposure(request, "user-" + request, f"{request}-{place}", place, 1.0, "v1", variant)
                 for request, (variant, shown) in ANSWERS.items() for place in range(shown)]
    exposures.append(Exposure("b2", "user-b2", "b2-5", 5, 0.1, "v1", "b"))  # shown past k
    store.record_exposures(exposures)
    store.append([Event("user-" + request, f"{request}-{place}", kind, request_id=request)
                  for request, place, kind in EVENTS])
    store.append([Event("someone", "a1-1", "click")])  # names no answer: not attributed


def check_hand_computed(report: dict) -> None:
    control, b = report["groups"]["control"], report["groups"]["b"]
    assert report["control"] == "control" and (control["answers"], control["exposures"]) == (4, 12)
    # CTR 3/12; residuals y - R x: .25, -.75, 1.25, -.75 -> sqrt(2.75 / (4 * 3)) / mean(x) 3.
    assert control["ctr@3"]["value"] == pytest.approx(0.25)
    assert control["ctr@3"]["se"] == pytest.approx(math.sqrt(2.75 / 12) / 3)
    assert control["conversion@3"]["value"] == pytest.approx(0.25)      # a4 of 4
    assert control["conversion@3"]["se"] == pytest.approx(0.25)         # sqrt(.75 / 12)
    assert control["mrr@3"]["value"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert control["mrr@3"]["se"] == pytest.approx(math.sqrt(0.6875 / 12))
    # b: CTR 2/5 (b1's second click on the same item counts once; b2's place 5 not at all);
    # residuals 1 - .4 * 3, 1 - .4 * 2 -> sqrt(.08 / 2) / 2.5.
    assert (b["answers"], b["exposures"], b["clicks"]) == (2, 5, 2)
    assert b["ctr@3"]["value"] == pytest.approx(0.4) and b["ctr@3"]["se"] == pytest.approx(0.08)
    assert b["ctr@3"]["low"] == pytest.approx(0.4 - 1.959964 * 0.08)
    test = b["against_control"]["ctr@3"]
    se = math.hypot(0.08, math.sqrt(2.75 / 12) / 3)
    assert test["difference"] == pytest.approx(0.15) and test["lift"] == pytest.approx(0.6)
    assert test["p_value"] == pytest.approx(math.erfc(0.15 / se / math.sqrt(2)))  # 0.4007
    assert "against_control" not in control


def test_the_report_matches_a_hand_computed_example_on_sqlite(tmp_path: Path) -> None:
    store = open_event_store(tmp_path / "log.sqlite")
    fill(store)
    check_hand_computed(online_report(store, ReportConfig(k=3)))
    by_version = online_report(store, ReportConfig(k=3, by="model_version"))
    assert list(by_version["groups"]) == ["v1"] and by_version["groups"]["v1"]["answers"] == 6
    store.close()


@needs_pg
def test_the_report_matches_a_hand_computed_example_on_postgresql(pg_schema: str) -> None:
    store = open_event_store(pg_schema)
    fill(store)
    check_hand_computed(online_report(store, ReportConfig(k=3)))
    store.close()


def test_recfunnel_experiments_report_prints_it_and_refuses_bad_input(tmp_path: Path) -> None:
    store = open_event_store(tmp_path / "log.sqlite")
    fill(store)
    store.close()
    result = CliRunner().invoke(app, ["experiments", "report", "--db", str(tmp_path / "log.sqlite"), "--k", "3",
                                      "--json"])
    assert result.exit_code == 0, result.output
    check_hand_computed(json.loads(result.output))
    unknown = CliRunner().invoke(app, ["experiments", "report", "--db", str(tmp_path / "log.sqlite"),
                                       "--control", "nobody"], env={"COLUMNS": "200"})
    assert unknown.exit_code == 2
    assert "control 'nobody' has no answers; groups: b, control" in " ".join(unknown.output.split())
    missing = CliRunner().invoke(app, ["experiments", "report", "--db", str(tmp_path / "none.sqlite")],
                                 terminal_width=200)
    assert missing.exit_code == 2 and "no event store" in missing.output
    assert not (tmp_path / "none.sqlite").exists()


def test_no_answers_and_single_answers_give_no_interval() -> None:
    import numpy as np

    assert math.isnan(ratio_estimate(np.zeros(0), np.zeros(0)).value)
    single = ratio_estimate(np.array([1.0]), np.array([4.0]))
    assert single.value == 0.25 and math.isnan(single.se)
