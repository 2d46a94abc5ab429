"""The helper-actor bench: which steps count for which windows, which processes it holds, and
what it refuses."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from bench.train_helpers import _hold, helper_pids, run_helpers_bench, split_steps


def test_steps_count_only_inside_one_window() -> None:
    windows = [(10.0, True), (12.0, False), (14.0, True)]
    # Step ends: the first step (9.5 → 10.2) spans the first switch; 10.2 → 11.0 held;
    # 11.0 → 12.5 spans a switch; 12.5 → 13.0 and 13.0 → 13.9 running; 13.9 → 14.5 spans;
    # 14.5 → 15.0 held.
    running, held = split_steps([9.5, 10.2, 11.0, 12.5, 13.0, 13.9, 14.5, 15.0], windows)

    assert running == pytest.approx([500.0, 900.0])
    assert held == pytest.approx([800.0, 500.0])


def test_steps_before_the_first_window_count_for_neither() -> None:
    assert split_steps([1.0, 2.0, 3.0], [(5.0, True)]) == ([], [])


@pytest.fixture
def fake_helper() -> subprocess.Popen:
    # A child of this process titled as a Ray Train helper actor, as Ray titles its actors.
    process = subprocess.Popen(["bash", "-c", 'exec -a "ray::SynchronizationActor.run" sleep 60'])
    deadline = time.monotonic() + 5
    while not Path(f"/proc/{process.pid}/cmdline").read_bytes().startswith(b"ray::"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield process
    process.kill()
    process.wait()


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def test_helpers_are_found_by_title_under_this_process_only(fake_helper: subprocess.Popen) -> None:
    assert helper_pids() == [fake_helper.pid]
    assert helper_pids(("TrainController",)) == []
    # Under another ancestor (not the process that started this Ray), the same title is left alone.
    other = subprocess.Popen(["sleep", "60"])
    try:
        assert helper_pids(ancestor=other.pid) == []
    finally:
        other.kill()
        other.wait()


def test_holding_stops_and_releases_them(fake_helper: subprocess.Popen) -> None:
    _hold([fake_helper.pid], "pause", True)
    time.sleep(0.1)
    assert _state(fake_helper.pid) == "T"
    _hold([fake_helper.pid], "pause", False)
    time.sleep(0.1)
    assert _state(fake_helper.pid) == "S"


def test_idle_mode_moves_every_thread_to_sched_idle_and_back(fake_helper: subprocess.Popen) -> None:
    _hold([fake_helper.pid], "idle", True)
    assert os.sched_getscheduler(fake_helper.pid) == os.SCHED_IDLE
    _hold([fake_helper.pid], "idle", False)
    assert os.sched_getscheduler(fake_helper.pid) == os.SCHED_OTHER


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "nice"}, "mode must be one of pause, idle"),
    ({"window_s": 0.1}, r"window_s must be in \[0.5, 30\]"),
    ({"epochs": 1}, "epochs must be at least 2"),
])
def test_the_bench_refuses_settings_out_of_range(kwargs: dict, message: str) -> None:
    settings = {"epochs": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        run_helpers_bench(None, **settings)  # type: ignore[arg-type]
