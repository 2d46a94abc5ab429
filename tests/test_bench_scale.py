"""The scale bench: per-phase time and memory, growth ratios, and one small size end to end."""

from __future__ import annotations

import mmap
import time
from pathlib import Path

import numpy as np
import pytest

from bench.scale import PhaseMeter, ScaleBenchConfig, growth, run_size, with_sizes


def test_a_phase_records_its_own_time_and_peak_memory() -> None:
    meter = PhaseMeter(interval_s=0.005)
    try:
        with meter.phase("small"):
            time.sleep(0.05)
        with meter.phase("big"):
            # 400 MiB mapped and touched for a moment, then unmapped: whatever the allocator's
            # settings, the pages go back.
            block = mmap.mmap(-1, 400 * 2**20)
            np.frombuffer(block, dtype=np.uint8)[::4096] = 1
            time.sleep(0.1)
            block.close()
        with meter.phase("after"):
            time.sleep(0.05)
    finally:
        meter.close()
    assert meter.phases["small"]["seconds"] >= 0.05
    assert meter.phases["big"]["peak_rss_gib"] - meter.phases["small"]["peak_rss_gib"] > 0.3
    assert meter.phases["after"]["peak_rss_gib"] < meter.phases["big"]["peak_rss_gib"] - 0.3  # not carried over


def test_growth_is_the_ratio_between_neighbouring_sizes() -> None:
    assert growth({10: 1.0, 100: 8.0, 1000: 100.0}) == {"10->100": 8.0, "100->1000": 12.5}


def test_sizes_parse_and_bad_values_are_refused() -> None:
    assert with_sizes(ScaleBenchConfig(), "1e5, 1e6").sizes == (100_000, 1_000_000)
    with pytest.raises(ValueError, match="at least 1000"):
        with_sizes(ScaleBenchConfig(), "10")
    with pytest.raises(ValueError, match="serving_rate"):
        ScaleBenchConfig(serving_rate=0)


def test_one_size_goes_through_every_phase(tmp_path: Path) -> None:
    report = run_size(10_000, ScaleBenchConfig(sizes=(10_000,), serving_seconds=0, evaluation_users=100), tmp_path)
    assert set(report["phases"]) == {"read", "text encoding", "statistics", "encoder epoch", "validation",
                                     "ranker epoch", "bundle", "sampled evaluation"}
    assert all(p["seconds"] >= 0 and p["peak_rss_gib"] > 0 for p in report["phases"].values())
    assert 8_000 <= report["interactions"] <= 10_000 and report["items"] == 500
    assert report["bundle_mb"] > 0 and report["training_samples_per_s"] > 0 and 0 <= report["funnel_ndcg@10"] <= 1
