"""The figures measurement writes: the training curve (NDCG@10 against wall-clock seconds) and
latency under load (over time, and its distribution)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from bench.harness import LoadResult

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

PLAIN_NUMBERS = FuncFormatter(lambda value, _: f"{value:g}")  # 2, 5, 10, 50 ms rather than 2 × 10^0

RECBOLE_SASREC_TEST_NDCG10 = 0.0636  # PEERS.md: RecBole 1.2.1 SASRec, 20 epochs, same split


def log_latency_axis(axis: Any, xlabel: str, ylabel: str) -> None:
    """Latency on a log scale in plain numbers, labels, legend and grid."""
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(PLAIN_NUMBERS)
    axis.yaxis.set_minor_formatter(PLAIN_NUMBERS if axis.get_ylim()[1] / axis.get_ylim()[0] < 10 else NullFormatter())
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)


def finish(figure: Any, path: Path, title: str) -> Path:
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_training_curve(curve: list[dict[str, float]], path: Path, title: str) -> Path:
    """Validation and test NDCG@10 after every epoch of both phases, against seconds since start."""
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    for stage, name, marker in ((0.0, "query encoder (recall)", "o"), (1.0, "ranker (funnel)", "s")):
        points = [p for p in curve if p["stage"] == stage]
        if points:
            seconds = [p["seconds"] for p in points]
            if all("test_ndcg@10" in p for p in points):
                axis.plot(seconds, [p["test_ndcg@10"] for p in points], marker=marker, label=f"{name}, test")
            axis.plot(seconds, [p["ndcg@10"] for p in points], marker=marker, linestyle="--", alpha=0.6,
                      label=f"{name}, validation")
    axis.axhline(RECBOLE_SASREC_TEST_NDCG10, color="grey", linestyle=":",
                 label="RecBole SASRec test (35 min here)")
    axis.set_xlabel("wall-clock seconds on this machine")
    axis.set_ylabel("NDCG@10, full ranking")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_latency(result: LoadResult, path: Path, title: str) -> Path:
    """Latency over time (every request, and p50/p99 per second) and the latency distribution."""
    ok = [s for s in result.samples if s.status == "OK"]
    failed = [s for s in result.samples if s.status != "OK"]
    figure, (over_time, distribution) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110,
                                                     gridspec_kw={"width_ratios": [2, 1]})
    over_time.scatter([s.sent_s for s in ok], [s.latency_ms for s in ok], s=2, alpha=0.25, color="tab:blue",
                      label="request")
    if failed:
        over_time.scatter([s.sent_s for s in failed], [s.latency_ms for s in failed], s=10, color="tab:red",
                          marker="x", label="error")
    seconds = np.floor([s.sent_s for s in ok]).astype(int)
    latencies = np.asarray([s.latency_ms for s in ok])
    if len(ok):
        buckets = np.unique(seconds)
        for quantile, style in ((50, "-"), (99, "--")):
            over_time.plot(buckets + 0.5, [np.percentile(latencies[seconds == b], quantile) for b in buckets],
                           style, color="black", linewidth=1, label=f"p{quantile} per second")
    over_time.set_yscale("log")
    over_time.yaxis.set_major_formatter(PLAIN_NUMBERS)
    over_time.yaxis.set_minor_formatter(NullFormatter())
    over_time.set_xlabel("seconds since start (scheduled send time)")
    over_time.set_ylabel("latency, ms (log)")
    over_time.legend(fontsize=8, loc="upper right")
    over_time.grid(alpha=0.3)
    if len(ok):
        ordered = np.sort(latencies)
        distribution.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), color="tab:blue")
        for row, q in enumerate((50, 99, 99.9)):
            value = float(np.percentile(latencies, q))
            distribution.axvline(value, color="grey", linestyle=":", linewidth=1)
            distribution.text(value, 0.05 + 0.12 * row, f" p{q:g} {value:.1f} ms", fontsize=7)
        distribution.set_xscale("log")
        distribution.xaxis.set_major_formatter(PLAIN_NUMBERS)
        distribution.xaxis.set_minor_formatter(NullFormatter())
    distribution.set_xlabel("latency, ms (log)")
    distribution.set_ylabel("share of requests at most this slow")
    distribution.grid(alpha=0.3)
    return finish(figure, path, title)


def plot_scale(report: dict[str, Any], path: Path, title: str) -> Path:
    """Each phase's seconds against the data's size, log-log, with a line of slope 1 for
    reference (linear growth)."""
    runs = [r for r in report["sizes"] if "phases" in r]
    figure, axis = plt.subplots(figsize=(8, 5), dpi=110)
    for name in sorted({n for r in runs for n in r["phases"]}):
        points = [(r["interactions"], r["phases"][name]["seconds"]) for r in runs if name in r["phases"]]
        axis.plot(*zip(*points, strict=True), marker="o", label=name)
    if runs:
        sizes = np.asarray([r["interactions"] for r in runs], dtype=float)
        axis.plot(sizes, sizes / sizes[0], color="grey", linestyle=":", label="linear (from 1 s)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.xaxis.set_major_formatter(PLAIN_NUMBERS)
    axis.yaxis.set_major_formatter(PLAIN_NUMBERS)
    axis.set_xlabel("interactions")
    axis.set_ylabel("seconds (log)")
    axis.set_title(title)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_ramp(report: dict[str, Any], path: Path, title: str) -> Path:
    """Against offered load: p50/p99 of the answers, goodput, and the share refused."""
    steps = report["steps"]
    offered = [s["offered_rps"] for s in steps]
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    latency.plot(offered, [s["p50_ms"] for s in steps], "o-", label="p50")
    latency.plot(offered, [s["p99_ms"] for s in steps], "s-", label="p99")
    latency.axhline(report["p99_bound_ms"], color="grey", linestyle=":", label="p99 bound")
    log_latency_axis(latency, "offered requests/s", "latency of answered calls, ms (log)")
    throughput.plot(offered, offered, color="grey", linestyle=":", label="offered")
    throughput.plot(offered, [s["goodput_rps"] for s in steps], "o-", label="goodput (OK, not degraded)")
    if report["capacity_rps"]:
        throughput.axvline(report["capacity_rps"], color="tab:green", linestyle="--",
                           label=f"capacity {report['capacity_rps']:g}/s")
    throughput.set_xlabel("offered requests/s")
    throughput.set_ylabel("requests/s")
    shed = throughput.twinx()
    shed.plot(offered, [100 * s["shed_share"] for s in steps], "x--", color="tab:red", label="refused %")
    shed.set_ylabel("refused (RESOURCE_EXHAUSTED), %")
    shed.set_ylim(0, 100)
    handles = throughput.get_legend_handles_labels()
    extra = shed.get_legend_handles_labels()
    throughput.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper left")
    throughput.grid(alpha=0.3)
    return finish(figure, path, title)


def plot_overload(runs: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """p99 per 5-second window after each run's overload, against its p99 before."""
    figure, axis = plt.subplots(figsize=(8, 4.2), dpi=110)
    for (name, run), color in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green"), strict=False):
        windows = run["after_windows"]
        axis.plot([w["from_s"] for w in windows], [w["p99_ms"] for w in windows], "o-", color=color,
                  label=f"{name}: p99 after the overload")
        axis.axhline(1.2 * run["before"]["p99_ms"], color=color, linestyle=":", label=f"{name}: 1.2 x p99 before")
    axis.axvline(10, color="grey", linestyle="--", linewidth=1)
    log_latency_axis(axis, "seconds after the overload ended (start of a 5 s window)", "p99, ms (log)")
    return finish(figure, path, title)


def plot_experiment(report: dict[str, Any], path: Path, title: str) -> Path:
    """`recfunnel bench experiment`: the A/A p-values, the A/B test's p-value as answers came
    in, and the position propensity: true against estimated (the panels of the phases run)."""
    phases = [phase for phase in ("aa", "ab", "debiasing") if phase in report]
    figure, axes = plt.subplots(1, len(phases), figsize=(4.4 * len(phases), 4), dpi=120, squeeze=False)
    panels = dict(zip(phases, axes[0], strict=True))
    if "aa" in panels:
        aa, p_values = panels["aa"], report["aa"]["p_values"]
        aa.hist(p_values, bins=np.linspace(0, 1, 11), color="tab:blue", alpha=0.8)
        aa.axvline(0.05, color="tab:red", linestyle="--", label="alpha 0.05")
        aa.set_title(f"A/A: {len(p_values)} seeds, FPR {report['aa']['false_positive_rate']:.2f}", fontsize=9)
        aa.set_xlabel("p-value of the CTR test")
        aa.legend(fontsize=8)
    if "ab" in panels:
        ab, curve = panels["ab"], np.asarray(report["ab"]["p_value_by_answers"])
        ab.semilogy(curve[:, 0], np.maximum(curve[:, 1], 1e-12), marker="o")
        ab.axhline(0.05, color="tab:red", linestyle="--", label="alpha 0.05")
        ab.set_title(f"A/B: true lift {report['ab']['true_lift']:+.0%}, "
                     f"measured {report['ab']['measured_lift']:+.0%}", fontsize=9)
        ab.set_xlabel("answers so far (both variants)")
        ab.set_ylabel("p-value (drawn no lower than 1e-12)")
        ab.legend(fontsize=8)
    if "debiasing" in panels:
        bias, true = panels["debiasing"], report["true_propensity"]
        estimated = report["debiasing"]["estimated_propensity"]["propensity"]
        bias.plot(range(len(true)), true, marker="o", label="true")
        bias.plot(range(len(estimated)), estimated, marker="s", linestyle="--", label="estimated (swapped pairs)")
        ndcg = report["debiasing"]["true_ndcg@10"]
        bias.set_title(f"propensity; NDCG@10 IPS {ndcg['inverse_propensity']:.3f} vs naive {ndcg['naive']:.3f}",
                       fontsize=9)
        bias.set_xlabel("place in the answer")
        bias.legend(fontsize=8)
    for axis in panels.values():
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
