"""The measurement commands: `recfunnel loadtest` and the `recfunnel bench …` group. Each prints
its JSON report on stdout and, unless `--json`, its headline figures as a table on stderr."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from bench.harness import print_report
from cluster.cli.options import (
    AddressOption,
    DataFormat,
    DatasetOption,
    FormatOption,
    InteractionsOption,
    ItemColumnOption,
    ItemsOption,
    data_source,
    load_data,
    progress_console,
)

group = typer.Typer()
bench = typer.Typer(help="Benchmarks: each measures one part in one run and prints JSON.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="print only the JSON report")]

# The figures each command's table leads with: (label, dotted key into its JSON report).
LOAD_HEADLINE = [("offered rps", "offered_rps"), ("achieved rps", "achieved_rps"), ("p50 ms", "p50_ms"),
                 ("p99 ms", "p99_ms"), ("p99.9 ms", "p99.9_ms"), ("errors", "errors"),
                 ("degraded share", "degraded_share")]
OVERLOAD_HEADLINE = [("capacity rps", "ramp.capacity_rps"), ("p99 at capacity ms", "ramp.p99_at_capacity_ms"),
                     ("overload goodput / capacity", "overload.goodput_over_capacity"),
                     ("overload shed share", "overload.overload.shed_share"),
                     ("overload refusal p99 ms", "overload.overload.refusal.p99_ms"),
                     ("p99 10 s after / before", "overload.p99_after_10s_over_before"),
                     ("Feedback lost", "overload.feedback.lost")]
BENCH_OVERLOAD_HEADLINE = [
    ("capacity rps", "ramp.capacity_rps"), ("p99 at capacity ms", "ramp.p99_at_capacity_ms"),
    ("p99 below capacity, on / off", "below_capacity.p99_on_over_off"),
    ("goodput / capacity at 2x, on", "overload.admission on.goodput_over_capacity"),
    ("goodput / capacity at 2x, off", "overload.admission off.goodput_over_capacity"),
    ("admitted p99 / p99 at capacity, on", "overload.admission on.admitted_p99_over_capacity_p99"),
    ("refusal p99 ms, on", "overload.admission on.overload.refusal.p99_ms"),
    ("health check p99 ms during it, on", "overload.admission on.health_check_during_overload.p99_ms"),
    ("p99 10 s after / before, on", "overload.admission on.p99_after_10s_over_before"),
    ("p99 10 s after / before, off", "overload.admission off.p99_after_10s_over_before"),
    ("Feedback lost, on", "overload.admission on.feedback.lost")]
SOAK_HEADLINE = [("RSS growth, largest actor", "rss_growth_max"), ("RSS growth, all actors", "rss_growth_total")]
LOOP_HEADLINE = [("decision", "round.decision"), ("round seconds", "round.seconds"),
                 ("taste in top 10 before", "taste.in_probe_top10_before"),
                 ("taste in top 10 after", "taste.in_probe_top10_after"),
                 ("errors during the round", "load_during_round.errors")]
TRAIN_HEADLINE = [("plain loop samples/s", "plain.samples_per_s"), ("1 worker samples/s", "ray_train_1.samples_per_s"),
                  ("2 workers samples/s", "ray_train_2.samples_per_s"), ("overhead, 1 worker", "overhead_1_worker"),
                  ("speed-up, 2 workers vs 1", "speedup_2_vs_1")]
HELPERS_HEADLINE = [("median step ms, helpers running", "median_step_ms_helpers_running"),
                    ("median step ms, helpers held", "median_step_ms_helpers_held"),
                    ("slowdown from the helpers", "slowdown_from_helpers")]
SERVING_HEADLINE = [("in-process p50 ms", "in_process.p50_ms"), ("cluster p50 ms", "cluster.p50_ms"),
                    ("p50 ratio, cluster vs in-process", "p50_ratio_cluster_vs_in_process"),
                    ("highest rps with p99 under 50 ms", "max_qps_p99_under_50ms"),
                    ("batching throughput ratio", "batching.throughput_ratio_at_32"),
                    ("idle gRPC round trip p50 ms", "transport.p50_ms")]
TRANSPORT_HEADLINE = [("grpc.aio idle p50 ms", "grpc_aio.idle_p50_ms"),
                      ("grpc.aio back to back p50 ms", "grpc_aio.back_to_back_p50_ms"),
                      ("asyncio socket idle p50 ms", "asyncio_tcp.idle_p50_ms"),
                      ("gRPC's extra over the socket, ms", "grpc_extra_over_asyncio_idle_ms")]
STORE_HEADLINE = [
    (f"{store} {figure}", f"stores.{store}.{path}") for store in ("sqlite", "postgresql") for figure, path in (
        ("Feedback events/s, batches of 100", "feedback.batch 100, 1 gateway(s).events_per_s"),
        ("Feedback events/s, single events", "feedback.batch 1, 1 gateway(s).events_per_s"),
        ("history read p99 ms at 100/s", "history_reads.100/s.p99_ms"),
        ("Recommend p99 ms", "serving.Recommend.p99_ms"))] + [
    ("Recommend p99, PostgreSQL vs SQLite", "recommend_p99_postgresql_over_sqlite")]
API_HEADLINE = [(f"{case} p99 ms at {rate} rps", f"cases.{case}.{rate}.p99_ms")
                for case in ("similar_items", "recommend_filter_0.05") for rate in ("50", "100")] + [
    ("0.5% filter: answers that filled k", "cases.recommend_filter_0.005.100.filled_k_share"),
    ("5% filter: answers that filled k", "cases.recommend_filter_0.05.100.filled_k_share"),
    ("exposure log on/off, p50", "exposure_cost.p50_on_over_off"),
    ("exposure log on/off, p99", "exposure_cost.p99_on_over_off"),
    ("export users/s", "export.users_per_s")]
SCALE_HEADLINE = [("step time, largest catalogue vs smallest", "step_ratio_largest_vs_smallest")]
RECALL_HEADLINE = [("exact QPS, one query a call", "exact.qps_single"), ("exact QPS, batched", "exact.qps_batch"),
                   ("hnsw recall@100", "indexes.hnsw.recall_at_100"), ("ivf recall@100", "indexes.ivf.recall_at_100"),
                   ("ivfpq recall@100", "indexes.ivfpq.recall_at_100"),
                   ("sharded QPS vs single", "sharded.qps_ratio_vs_single"), ("peak RSS GiB", "peak_rss_gib")]


@group.command()
def loadtest(
    target: Annotated[str, typer.Option(help="gateway address HOST:PORT")] = "127.0.0.1:50051",
    qps: Annotated[float, typer.Option(min=0.1, max=100_000, help="offered requests per second")] = 50.0,
    duration: Annotated[float, typer.Option(min=1, max=86_400, help="measured seconds")] = 30.0,
    mix: Annotated[Path | None, typer.Option(help="request mix (TOML/JSON); default: MovieLens-100K ids")] = None,
    token: Annotated[str | None, typer.Option(envvar="RECFUNNEL_TOKEN", help="bearer token")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="PEM of the CA (or self-signed cert): use TLS")] = None,
    timeout: Annotated[float, typer.Option(min=0.01, max=60, help="deadline of each call, seconds")] = 1.0,
    seed: Annotated[int, typer.Option(help="random seed of arrivals and mix")] = 0,
    ramp: Annotated[str | None, typer.Option(help="FROM:TO:STEP requests/s: find the capacity, each step "
                                                  "--step-seconds long (instead of --qps)")] = None,
    overload: Annotated[bool, typer.Option("--overload", help="half the capacity, twice it, then half again: "
                                                              "what is shed and how soon p99 recovers")] = False,
    capacity: Annotated[float | None, typer.Option(min=1, max=100_000, help="capacity for --overload, "
                                                   "requests/s (default: from --ramp)")] = None,
    p99_bound_ms: Annotated[float, typer.Option(min=1, help="a ramp step is within capacity while its p99 "
                                                           "stays under this")] = 100.0,
    step_seconds: Annotated[float, typer.Option(min=1, max=3600, help="seconds per ramp step")] = 10.0,
    phase_seconds: Annotated[float, typer.Option(min=1, max=3600, help="seconds before and during the "
                                                 "overload")] = 20.0,
    recovery_seconds: Annotated[float, typer.Option(min=10, max=3600, help="seconds measured after the "
                                                    "overload")] = 30.0,
    as_json: JsonOption = False,
    plot: Annotated[Path | None, typer.Option(help="write latency over time and its distribution (with --ramp: "
                                                   "latency, goodput and refusals against offered load) to "
                                                   "this PNG")] = None,
) -> None:
    """Open-loop load on a gateway: Poisson arrivals, latency from the scheduled send time."""
    import asyncio

    from bench.loadtest import LoadTest, Mix, report, run_load
    from bench.overload import Ramp, run_overload, run_ramp
    from bench.plots import plot_latency, plot_overload, plot_ramp

    try:
        request_mix = Mix.from_file(mix) if mix else Mix.movielens()
        test = LoadTest(target=target, qps=qps, duration_s=duration, token=token, tls_ca=tls_ca,
                        timeout_s=timeout, seed=seed)
        steps = Ramp.parse(ramp) if ramp else None
    except (ValueError, TypeError, OSError) as error:
        raise typer.BadParameter(str(error)) from error
    if overload and steps is None and capacity is None:
        raise typer.BadParameter("--overload needs --capacity or a --ramp to measure it")
    log = (lambda _: None) if as_json else progress_console.log
    if steps is not None or overload:
        summary: dict[str, Any] = {"target": target}
        if steps is not None:
            summary["ramp"] = run_ramp(test, request_mix, steps, p99_bound_ms, step_seconds, log)
            if plot is not None:
                plot_ramp(summary["ramp"], plot, f"recfunnel loadtest --ramp {ramp} on {target}")
                summary["plot"] = str(plot)
        if overload:
            found = capacity or summary["ramp"]["capacity_rps"]
            at_capacity = summary["ramp"]["p99_at_capacity_ms"] if steps is not None and not capacity else None
            summary["overload"] = run_overload(test, request_mix, found, phase_seconds, recovery_seconds,
                                               at_capacity, log)
            if plot is not None and steps is None:
                plot_overload({target: summary["overload"]}, plot, f"recfunnel loadtest --overload on {target}")
                summary["plot"] = str(plot)
        print_report(summary, as_json, OVERLOAD_HEADLINE, f"capacity and overload on {target}")
        return
    if not as_json:
        progress_console.log(f"{qps:g} requests/s for {duration:g} s on {target}")
    result = asyncio.run(run_load(test, request_mix))
    summary = report(test, result)
    if plot is not None:
        plot_latency(result, plot, f"recfunnel loadtest: {qps:g} rps offered on {target}, "
                           f"p99 {summary['p99_ms']:.1f} ms, errors {sum(summary['errors'].values())}")
        summary["plot"] = str(plot)
    print_report(summary, as_json, LOAD_HEADLINE, f"loadtest on {target}")


@bench.command("soak")
def bench_soak(
    qps: Annotated[float, typer.Option(min=0.1, max=100_000, help="offered requests per second")],
    duration: Annotated[float, typer.Option(min=1, max=86_400, help="measured seconds")] = 600.0,
    warmup: Annotated[float, typer.Option(min=0, max=3600, help="seconds of load before the memory baseline")
                      ] = 60.0,
    address: AddressOption = None,
    mix: Annotated[Path | None, typer.Option(help="request mix (TOML/JSON); default: MovieLens-100K ids")] = None,
    token: Annotated[str | None, typer.Option(envvar="RECFUNNEL_TOKEN", help="bearer token")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="PEM of the CA (or self-signed cert): use TLS")] = None,
    plot: Annotated[Path | None, typer.Option(help="write latency over time and its distribution to this PNG")
                    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Long load on the cluster `recfunnel up` started: errors, latency and each actor's memory growth."""
    from bench.loadtest import LoadTest, Mix, soak
    from bench.plots import plot_latency
    from cluster.ops import status as read_status

    cluster = read_status(address)
    test = LoadTest(target=cluster["gateway"], qps=qps, duration_s=duration, token=token, tls_ca=tls_ca, warmup_s=0)
    summary, result = soak(test, Mix.from_file(mix) if mix else Mix.movielens(), lambda: read_status(address),
                           warmup)
    if plot is not None:
        plot_latency(result, plot, f"recfunnel soak: {qps:g} rps for {duration:g} s, p99 {summary['p99_ms']:.1f} ms, "
                           f"errors {sum(summary['errors'].values())}, RSS growth {summary['rss_growth_max']:+.1%}")
        summary["plot"] = str(plot)
    print_report(summary, as_json, LOAD_HEADLINE + SOAK_HEADLINE, f"soak at {qps:g} rps")


@bench.command("loop")
def bench_loop(
    bundle: Annotated[Path, typer.Option(help="the bundle to serve first (trained on the data set below)")],
    dataset: DatasetOption = "ml-100k",
    interactions: InteractionsOption = None,
    items: ItemsOption = None,
    item_column: ItemColumnOption = None,
    fmt: FormatOption = DataFormat.pairs,
    fans: Annotated[int, typer.Option(min=1, max=100_000, help="new users who send the new taste")] = 200,
    qps: Annotated[float, typer.Option(min=0.1, max=10_000, help="Recommend traffic during the round")] = 20.0,
    workdir: Annotated[Path, typer.Option(help="event log, the round's bundle and checkpoints")
                       ] = Path("bench-loop"),
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    as_json: JsonOption = False,
) -> None:
    """One feedback-loop round on the embedded cluster under load: its time, verdict, failed
    requests, and what the new taste did to other users' lists."""
    from bench.loop import run_loop_bench

    source = data_source(dataset, interactions, items, fmt, item_column)
    print_report(run_loop_bench(bundle, source, fans, qps, workdir, seed), as_json, LOOP_HEADLINE,
                 "one feedback-loop round under load")


@bench.command("train")
def bench_train(
    dataset: DatasetOption = "ml-100k",
    epochs: Annotated[int, typer.Option(min=1, max=100, help="query-encoder epochs each path trains")] = 3,
    workers: Annotated[str, typer.Option(help="comma-separated Ray Train worker counts")] = "1,2",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    rounds: Annotated[int, typer.Option(min=1, max=20, help="passes over every path; figures are their medians")] = 1,
    as_json: JsonOption = False,
) -> None:
    """Training throughput: the plain loop against Ray Train with 1 and 2 workers, one run."""
    from bench.train import run_train_bench

    counts = [int(n) for n in workers.split(",") if n.strip()]
    report = run_train_bench(load_data(dataset, None, None, DataFormat.pairs), epochs, counts, seed, rounds)
    print_report(report, as_json, TRAIN_HEADLINE, "training throughput")


class HelperHold(str, Enum):
    pause = "pause"
    idle = "idle"


@bench.command("train-helpers")
def bench_train_helpers(
    dataset: DatasetOption = "ml-100k",
    epochs: Annotated[int, typer.Option(min=2, max=100, help="query-encoder epochs of the Ray Train run")] = 12,
    window: Annotated[float, typer.Option(min=0.5, max=30, help="seconds of each window")] = 2.0,
    mode: Annotated[HelperHold, typer.Option(help="hold the helpers stopped (pause) or at SCHED_IDLE (idle)")]
    = HelperHold.pause,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    as_json: JsonOption = False,
) -> None:
    """What Ray Train's helper actors cost one worker's training steps: alternate windows with
    them held and running, in one Ray Train run. Linux only."""
    from bench.train_helpers import run_helpers_bench

    report = run_helpers_bench(load_data(dataset, None, None, DataFormat.pairs), epochs, window, mode.value, seed)
    print_report(report, as_json, HELPERS_HEADLINE, "Ray Train's helper actors")


@bench.command("ablations")
def bench_ablations(
    dataset: DatasetOption = "ml-100k",
    interactions: InteractionsOption = None,
    items: ItemsOption = None,
    item_column: ItemColumnOption = None,
    fmt: FormatOption = DataFormat.pairs,
    seconds: Annotated[float, typer.Option(help="encoder training budget of each variant")] = 120.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    only: Annotated[str, typer.Option(help="comma-separated variants to run (default: all)")] = "",
    as_json: JsonOption = False,
) -> None:
    """What each model choice contributes: the same training with one choice changed at a time,
    the query encoder's blocks (SASRec-style or HSTU-style) among them, and both SASRec
    baselines trained to convergence."""
    from dataclasses import replace

    from ranking.baselines import BASELINE_EPOCHS, SASRecLoss, SASRecTrainer
    from ranking.config import TrainConfig
    from ranking.sizing import DataSize, with_sized_defaults
    from ranking.train import Trainer, fit

    data = load_data(dataset, interactions, items, fmt, item_column)
    # Every variant trains with the settings `recfunnel train` would give this data (the
    # data-size rule; ML-100K gets the defaults), under the same encoder budget.
    size = DataSize.of(data)
    settings, decided = with_sized_defaults(size, {"time_budget_s": seconds, "seed": seed})
    base = TrainConfig.from_dict(settings)
    variants = {
        "full": base,  # the encoder the rule gives this data; the next two name theirs
        "sasrec": replace(base, model=replace(base.model, encoder="sasrec")),
        "hstu": replace(base, model=replace(base.model, encoder="hstu")),
        "negatives_64": replace(base, num_negatives=64),
        "no_text": replace(base, use_text=False),
        "no_item2item": replace(base, candidates_per_channel=tuple(
            (c, k) for c, k in base.candidates_per_channel if c != "item2item")),
        "no_recent_popularity": replace(base, recent_popularity=False),
    }
    baselines: dict[str, tuple[SASRecLoss, int]] = {"sasrec_bce": ("bce", 1), "sasrec_ce": ("ce", base.num_negatives)}
    allowed = [*variants, *baselines]
    # By default every variant but the encoder `full` already trains with.
    chosen = [n.strip() for n in only.split(",") if n.strip()] or [n for n in allowed if n != base.model.encoder]
    unknown = set(chosen) - set(allowed)
    if unknown:
        raise typer.BadParameter(f"unknown variants {sorted(unknown)}; allowed: {', '.join(allowed)}")
    rows: dict[str, dict[str, float]] = {}
    training: dict[str, dict[str, Any]] = {}
    for name, config in variants.items():
        if name not in chosen:
            continue
        trainer = Trainer(data, config)
        metrics, _ = fit(trainer)
        rows[f"{name}/recall"] = metrics["test"]["recall"]
        rows[f"{name}/funnel"] = metrics["test"]["funnel"]
        # Validation decides between encoders: the test split only reports.
        training[name] = {"encoder": config.model.encoder,
                          "valid_recall_ndcg@10": metrics["valid"]["recall"]["ndcg@10"],
                          "valid_funnel_ndcg@10": metrics["valid"]["funnel"]["ndcg@10"],
                          "train_seconds": metrics["train_seconds"], "stops": metrics["stops"]}
        progress_console.log(f"{name}: recall NDCG@10 {rows[f'{name}/recall']['ndcg@10']:.4f}, "
                             f"funnel {rows[f'{name}/funnel']['ndcg@10']:.4f}")
    for name, (loss, negatives) in baselines.items():
        if name not in chosen:
            continue
        trainer = Trainer(data, replace(base, use_text=False))  # the split and evaluations alone
        sasrec = SASRecTrainer(trainer.split, data.num_items, replace(base, num_negatives=negatives,
                                                                     epochs=BASELINE_EPOCHS),
                               trainer.valid, loss=loss)
        seconds_taken = sasrec.train()
        rows[f"{name}/recall"] = trainer.test.full(sasrec.scores)
        training[name] = {"train_seconds": seconds_taken, **sasrec.stop}
        progress_console.log(f"{name}: NDCG@10 {rows[f'{name}/recall']['ndcg@10']:.4f} after "
                             f"{sasrec.stop['epochs']} epochs ({sasrec.stop['reason']})")
    print_report({"dataset": data.name, "seconds_per_variant": seconds,
                  "sized": {"data": size.to_dict(), "decided": decided, "settings": settings},
                  "test": rows, "training": training},
                 as_json, [(f"{name} NDCG@10", f"test.{name}.ndcg@10") for name in rows], "ablations, test split")


@bench.command("ceiling")
def bench_ceiling(
    interactions: Annotated[Path, typer.Option(help="interactions of a set `recfunnel synth` wrote (its "
                                                    "synthetic.json beside them)")],
    items: ItemsOption = None,
    fmt: FormatOption = DataFormat.parquet,
    users: Annotated[int, typer.Option(min=0, help="a seeded sample of this many users (0 = every user)")] = 0,
    seed: Annotated[int, typer.Option(help="seed of the user sample")] = 0,
    as_json: JsonOption = False,
) -> None:
    """The best NDCG any model can reach on a synthetic set: its cases ranked by the generator's
    own next-item odds, under `evaluate`'s protocol. A target above it is out of every model's reach."""
    from rich.progress import Progress

    from ranking.quality import ceiling_report
    from recdata.ceiling import GENERATOR_FILE, Generator

    try:
        generator = Generator.beside(interactions)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--interactions") from error
    if generator is None:
        raise typer.BadParameter(f"no {GENERATOR_FILE} beside {interactions}: the ceiling is known only for "
                                 "sets `recfunnel synth` wrote", param_hint="--interactions")
    data = load_data(None, interactions, items, fmt)
    with Progress(console=progress_console, transient=True) as progress:
        def phase_progress(phase: str) -> Any:
            task = progress.add_task(f"ranking the {phase} cases by the generator's odds")
            return lambda done, total: progress.update(task, completed=done, total=total)
        try:
            report = ceiling_report(generator, data, users, seed, phase_progress)
        except ValueError as error:  # the data's items are not the generator's
            raise typer.BadParameter(str(error), param_hint="--interactions") from error
    print_report(report, as_json, [("valid NDCG@10", "valid.ndcg@10"), ("test NDCG@10", "test.ndcg@10"),
                                   ("test HR@10", "test.hr@10"), ("cases", "evaluated_users.count")],
                 f"ceiling of {data.name}")


@bench.command("feedback")
def bench_feedback(
    dislike_at: Annotated[float, typer.Option(min=1.0, max=4.0, help="ratings at or below this are dislikes")] = 2.0,
    seconds: Annotated[float, typer.Option(help="encoder training budget of each variant")] = 300.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Typed feedback on MovieLens-100K's ratings: every rating positive, against low ratings left
    out, as dislikes (never history, extra negatives), and as dislikes with positives weighted
    by rating; NDCG@10 on the same positive targets."""
    from bench.feedback import FeedbackBenchConfig, run_feedback_bench
    from recdata.movielens import load_ml100k, ml100k_ratings

    data = load_ml100k()
    report = run_feedback_bench(data, ml100k_ratings(data), FeedbackBenchConfig(dislike_at, seconds, seed))
    print_report(report, as_json, [
        ("all positive funnel NDCG@10", "variants.all_positive.test.funnel.ndcg@10"),
        ("dislikes funnel NDCG@10", "variants.dislikes.test.funnel.ndcg@10"),
        ("weighted funnel NDCG@10", "variants.weighted.test.funnel.ndcg@10"),
        ("dislikes dropped funnel NDCG@10", "variants.dropped.test.funnel.ndcg@10"),
        ("dislikes / all positive", "funnel_ndcg@10_over_all_positive.dislikes"),
        ("dislikes as negatives / dropped", "negatives_over_dropped"),
        ("weighted / unweighted", "weighted_over_unweighted")], "typed feedback, ML-100K")


@bench.command("experiment")
def bench_experiment(
    users: Annotated[int, typer.Option(min=50, help="simulated users")] = 1200,
    items: Annotated[int, typer.Option(min=20, help="simulated items")] = 300,
    aa_seeds: Annotated[int, typer.Option(min=1, help="A/A experiments, each with its own salt and clicks")] = 20,
    aa_answers: Annotated[int, typer.Option(min=20, help="answers per A/A experiment")] = 600,
    ab_answers: Annotated[int, typer.Option(min=20, help="answers of the A/B experiment")] = 8000,
    log_answers: Annotated[int, typer.Option(min=20, help="answers logged with exploration for debiasing")] = 6000,
    history: Annotated[int, typer.Option(help="interactions a user the better model learns from")] = 6,
    weak_history: Annotated[int, typer.Option(help="interactions a user the weaker, serving model learns from")] = 5,
    position_decay: Annotated[float, typer.Option(min=0.0, help="propensity of place p: 1/(1+p)^decay")] = 1.0,
    promotion: Annotated[float, typer.Option(help="how much more often promoted items were picked before "
                                                  "the logs began (1 = no promotion)")] = 1.0,
    train_seconds: Annotated[float, typer.Option(help="encoder training budget of each model")] = 60.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    phases: Annotated[str, typer.Option(help="which phases to run, comma-separated: aa, ab, debias")] = "aa,ab,debias",
    plot: Annotated[Path | None, typer.Option(help="draw the A/A, A/B and propensity figures (PNG)")] = None,
    as_json: JsonOption = False,
) -> None:
    """A simulated population with known preferences and position bias clicks on what the
    cluster serves: the A/A false positive rate, an A/B test of a better model, and naive
    against inverse-propensity training from the same logged clicks."""
    from bench.experiment import ExperimentBenchConfig, run_experiment_bench

    try:
        config = ExperimentBenchConfig(users=users, items=items, aa_seeds=aa_seeds, aa_answers=aa_answers,
                                       ab_answers=ab_answers, log_answers=log_answers,
                                       history=history, weak_history=weak_history, position_decay=position_decay,
                                       promotion=promotion, train_seconds=train_seconds, seed=seed,
                                       phases=tuple(p.strip() for p in phases.split(",") if p.strip()))
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    report = run_experiment_bench(config, progress=(lambda _: None) if as_json else progress_console.log)
    if plot is not None:
        from bench.plots import plot_experiment

        report["plot"] = str(plot_experiment(report, plot, "recfunnel bench experiment"))
    print_report(report, as_json, [
        ("A/A false positive rate", "aa.false_positive_rate"),
        ("A/B true CTR lift", "ab.true_lift"), ("A/B measured CTR lift", "ab.measured_lift"),
        ("A/B p-value", "ab.p_value"), ("answers per variant for a 10% lift", "ab.answers_per_variant_for_10pct_lift"),
        ("naive NDCG@10 (true appeal)", "debiasing.true_ndcg@10.naive"),
        ("IPS NDCG@10 (true appeal)", "debiasing.true_ndcg@10.inverse_propensity"),
        ("IPS / naive", "debiasing.inverse_propensity_over_naive")], "experiments and debiasing, simulated")


@bench.command("serving")
def bench_serving(
    bundle: Annotated[Path | None, typer.Option(help="ML-100K bundle; default: the demo one")] = None,
    rates: Annotated[str, typer.Option(help="offered loads in requests/s, rising, comma-separated")] =
        "25,50,100,150,200,300,400",
    seconds: Annotated[float, typer.Option(help="seconds of load per offered rate")] = 15.0,
    low_rate: Annotated[float, typer.Option(help="the low load of the in-process vs cluster comparison")] = 10.0,
    concurrency: Annotated[int, typer.Option(min=1, help="callers of the batching comparison")] = 32,
    ranker_threads: Annotated[int, typer.Option(min=1, max=64, help="torch threads of both ranking services "
                                                "in the batching comparison")] = 1,
    diversity_users: Annotated[int, typer.Option(min=0, help="test users in the diversity sweep (0 = all)")] = 0,
    shards: Annotated[int, typer.Option(min=1, max=16, help="recall shards")] = 2,
    as_json: JsonOption = False,
) -> None:
    """Latency and throughput of the served funnel: in-process vs the cluster, open-loop loads,
    micro-batching on/off, and the diversity knob."""
    from bench.serving import ServingBenchConfig, run_serving_bench
    from cluster.demo import DEMO_TRAIN_SECONDS, demo_bundle
    from recdata.movielens import cache_dir, load_ml100k

    logging.basicConfig(level=logging.WARNING)
    data = load_ml100k()
    if bundle is None:
        bundle = demo_bundle(data, cache_dir() / "demo", DEMO_TRAIN_SECONDS, progress_console)
    config = ServingBenchConfig(bundle=bundle, rates=tuple(float(r) for r in rates.split(",")),
                                seconds_per_rate=seconds, low_rate=low_rate, concurrency=concurrency,
                                batching_threads=ranker_threads, diversity_users=diversity_users,
                                num_shards=shards)
    report = run_serving_bench(data, config, progress=(lambda _: None) if as_json else progress_console.log)
    print_report(report, as_json, SERVING_HEADLINE, "serving")


@bench.command("transport")
def bench_transport(
    rate: Annotated[float, typer.Option(min=0.1, max=100, help="requests/s of the idle measurement")] = 10.0,
    seconds: Annotated[float, typer.Option(min=0.5, max=600, help="seconds of the idle measurement")] = 8.0,
    seed: Annotated[int, typer.Option(help="random seed of the arrivals")] = 0,
    as_json: JsonOption = False,
) -> None:
    """One round trip between two local processes, idle and back to back: grpc.aio against a
    bare asyncio socket. The cluster's request path makes four such gRPC round trips."""
    from bench.transport import run_transport_bench

    print_report(run_transport_bench(rate, seconds, seed), as_json, TRANSPORT_HEADLINE, "one idle round trip")


@bench.command("recall")
def bench_recall(
    items: Annotated[int, typer.Option(min=1000, help="catalogue size")] = 1_000_000,
    dim: Annotated[int, typer.Option(min=2, help="vector width")] = 64,
    shards: Annotated[int, typer.Option(min=1, max=64, help="shards of the sharded-vs-single comparison")] = 4,
    kinds: Annotated[str, typer.Option(help="approximate index kinds, comma-separated")] = "hnsw,ivf,ivfpq",
    queries: Annotated[int, typer.Option(min=10, help="evaluation queries")] = 1000,
    seconds: Annotated[float, typer.Option(help="seconds per single-query QPS measurement")] = 5.0,
    target_recall: Annotated[float, typer.Option(help="recall@100 the indexes are tuned to")] = 0.95,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Exact search against HNSW / IVF / IVF-PQ on a clustered synthetic catalogue: recall@100,
    QPS, build time, bytes, upsert-to-searchable, and sharded against single."""
    from bench.recall import RecallBenchConfig, run_recall_bench

    config = RecallBenchConfig(items=items, dim=dim, shards=shards, kinds=tuple(k for k in kinds.split(",") if k),
                               queries=queries, single_seconds=seconds, target_recall=target_recall, seed=seed)
    report = run_recall_bench(config, progress=(lambda _: None) if as_json else progress_console.log)
    print_report(report, as_json, RECALL_HEADLINE, f"recall over {items:,} items")


@bench.command("scale")
def bench_scale(
    sizes: Annotated[str, typer.Option(help="interactions per data set, comma-separated (1e5,1e6,1e7)")] = "1e5,1e6",
    step_items: Annotated[str, typer.Option(help="catalogue sizes of the step-time comparison")] = "1e4,1e5,1e6",
    serving_seconds: Annotated[float, typer.Option(min=0, max=3600, help="seconds of load on each bundle "
                                                                         "(0 = no serving)")] = 20.0,
    rate: Annotated[float, typer.Option(min=1, max=10_000, help="requests/s of the serving load")] = 100.0,
    plot: Annotated[Path | None, typer.Option(help="each phase's seconds against size, log-log, to this PNG")
                    ] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    as_json: JsonOption = False,
) -> None:
    """How each phase's time and memory grow with the data: synthetic sets of growing size from
    reading to serving, and a training step against the catalogue's size."""
    from bench.scale import ScaleBenchConfig, run_scale_bench, with_sizes

    try:
        config = with_sizes(ScaleBenchConfig(step_items=tuple(int(float(n)) for n in step_items.split(",")),
                                             serving_rate=rate, serving_seconds=serving_seconds, seed=seed), sizes)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    report = run_scale_bench(config, progress=(lambda _: None) if as_json else progress_console.log)
    if plot is not None:
        from bench.plots import plot_scale

        plot_scale(report, plot, "recfunnel bench scale: each phase against the data's size")
        report["plot"] = str(plot)
    print_report(report, as_json, SCALE_HEADLINE, "scale")


@bench.command("overload")
def bench_overload(
    ramp: Annotated[str, typer.Option(help="FROM:TO:STEP requests/s of the capacity search")] = "50:500:50",
    step_seconds: Annotated[float, typer.Option(min=1, help="seconds per ramp step")] = 10.0,
    p99_bound_ms: Annotated[float, typer.Option(min=1, help="p99 bound of a step within capacity")] = 100.0,
    phase_seconds: Annotated[float, typer.Option(min=1, help="seconds before and during each overload")] = 20.0,
    recovery_seconds: Annotated[float, typer.Option(min=10, help="seconds measured after each overload")] = 30.0,
    bundle: Annotated[Path | None, typer.Option(help="ML-100K bundle; default: the demo one")] = None,
    as_json: JsonOption = False,
    plot: Annotated[Path | None, typer.Option(help="write the ramp and the recoveries to this PNG "
                                                   "(and NAME-recovery.png)")] = None,
) -> None:
    """Admission control on against off, in one run: the capacity, p99 below it, and what each
    gateway does at twice the capacity and after it."""
    from bench.overload import OverloadBenchConfig, Ramp, run_overload_bench
    from bench.plots import plot_overload, plot_ramp
    from cluster.demo import DEMO_TRAIN_SECONDS, demo_bundle
    from recdata.movielens import cache_dir, load_ml100k

    logging.basicConfig(level=logging.WARNING)
    try:
        steps = Ramp.parse(ramp)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    if bundle is None:
        bundle = demo_bundle(load_ml100k(), cache_dir() / "demo", DEMO_TRAIN_SECONDS, progress_console)
    config = OverloadBenchConfig(bundle=bundle, ramp=steps, step_s=step_seconds, p99_bound_ms=p99_bound_ms,
                                 phase_s=phase_seconds, recovery_s=recovery_seconds)
    report = run_overload_bench(config, progress=(lambda _: None) if as_json else progress_console.log)
    if plot is not None:
        plot_ramp(report["ramp"], plot, "recfunnel bench overload: the capacity search, admission control on")
        recovery = plot.with_name(f"{plot.stem}-recovery{plot.suffix}")
        plot_overload(report["overload"], recovery, "recfunnel bench overload: p99 after twice the capacity")
        report["plot"] = [str(plot), str(recovery)]
    print_report(report, as_json, BENCH_OVERLOAD_HEADLINE, "overload")


@bench.command("store")
def bench_store(
    pg: Annotated[str, typer.Option(help="PostgreSQL server to measure beside SQLite (a schema is made and "
                                         "dropped); '' = SQLite alone")] = "postgresql://postgres@127.0.0.1/test",
    events: Annotated[int, typer.Option(min=1000, help="events logged before the history reads")] = 1_000_000,
    read_rates: Annotated[str, typer.Option(help="history reads/s, comma-separated")] = "100,500",
    read_seconds: Annotated[float, typer.Option(min=1, help="seconds per read rate")] = 10.0,
    feedback_seconds: Annotated[float, typer.Option(min=1, help="seconds per Feedback measurement")] = 8.0,
    serving_seconds: Annotated[float, typer.Option(min=0, help="seconds of Recommend load per store (0 = none)")
                               ] = 20.0,
    rate: Annotated[float, typer.Option(min=1, max=10_000, help="requests/s of the Recommend load")] = 100.0,
    bundle: Annotated[Path | None, typer.Option(help="ML-100K bundle; default: the demo one")] = None,
    as_json: JsonOption = False,
) -> None:
    """The event store on SQLite and PostgreSQL in one run: Feedback events/s through 1 and 2
    gateway processes, history reads at fixed rates over a large log, Recommend p99."""
    from bench.store import StoreBenchConfig, run_store_bench
    from cluster.demo import DEMO_TRAIN_SECONDS, demo_bundle
    from recdata.movielens import cache_dir, load_ml100k

    logging.basicConfig(level=logging.WARNING)
    data = load_ml100k()
    if bundle is None:
        bundle = demo_bundle(data, cache_dir() / "demo", DEMO_TRAIN_SECONDS, progress_console)
    try:
        config = StoreBenchConfig(bundle=bundle, pg_url=pg, events=events,
                                  read_rates=tuple(float(r) for r in read_rates.split(",")),
                                  read_seconds=read_seconds, feedback_seconds=feedback_seconds,
                                  serving_rate=rate, serving_seconds=serving_seconds)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    report = run_store_bench(data, config, progress=(lambda _: None) if as_json else progress_console.log)
    print_report(report, as_json, STORE_HEADLINE, "event store")


@bench.command("api")
def bench_api(
    rates: Annotated[str, typer.Option(help="offered loads in requests/s, comma-separated")] = "50,100",
    seconds: Annotated[float, typer.Option(min=1, help="seconds of load per case and rate")] = 15.0,
    selectivities: Annotated[str, typer.Option(help="shares of the catalogue the filters pass, comma-separated")
                             ] = "0.5,0.05,0.005",
    k: Annotated[int, typer.Option(min=1, max=1000, help="items per answer")] = 10,
    bundle: Annotated[Path | None, typer.Option(help="ML-100K bundle; default: the demo one")] = None,
    as_json: JsonOption = False,
) -> None:
    """SimilarItems and filtered Recommend under open-loop load: p50/p99, errors, answers that filled k."""
    from bench.api import ApiBenchConfig, run_api_bench
    from cluster.demo import DEMO_TRAIN_SECONDS, demo_bundle
    from recdata.movielens import cache_dir, load_ml100k

    logging.basicConfig(level=logging.WARNING)
    data = load_ml100k()
    if bundle is None:
        bundle = demo_bundle(data, cache_dir() / "demo", DEMO_TRAIN_SECONDS, progress_console)
    try:
        config = ApiBenchConfig(bundle=bundle, rates=tuple(float(r) for r in rates.split(",")), seconds=seconds,
                                selectivities=tuple(float(x) for x in selectivities.split(",")), k=k)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    report = run_api_bench(data, config, progress=(lambda _: None) if as_json else progress_console.log)
    print_report(report, as_json, API_HEADLINE, "product API")
