"""The `recfunnel` command line."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="recfunnel: a gRPC recommendation cluster (FAISS recall, transformer ranking, Ray).",
                  no_args_is_help=True, add_completion=False)
console = Console()


class DataFormat(str, Enum):
    pairs = "pairs"
    csv = "csv"
    parquet = "parquet"


# The options that name a data set, shared by every command that reads one.
DatasetOption = Annotated[str, typer.Option(help="named data set")]
InteractionsOption = Annotated[Path | None, typer.Option(help="interactions file instead of a named data set")]
ItemsOption = Annotated[Path | None, typer.Option(help="item file: CSV item,text[,tags]")]
FormatOption = Annotated[DataFormat, typer.Option("--format", help="format of --interactions")]


# The options that find a running cluster and ask for JSON, shared by the operating commands.
AddressOption = Annotated[str | None, typer.Option(help="the Ray cluster (default: the one `up` used)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]


def load_data(dataset: str | None, interactions: Path | None, items: Path | None, fmt: DataFormat):
    """The named data set, or interactions read from a file."""
    from recdata.sources import DataSource

    try:
        source = DataSource(dataset or "", interactions, items, fmt.value)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--dataset") from error
    return source.load()


@app.command()
def demo(
    serve: Annotated[bool, typer.Option("--serve", help="keep serving on 127.0.0.1:50051 until interrupted")] = False,
    port: Annotated[int, typer.Option(help="gateway port")] = 50051,
    bundle: Annotated[Path | None, typer.Option(help="serve this trained bundle instead of training one")] = None,
    train_seconds: Annotated[float, typer.Option(help="time budget of the query-encoder training")] = 150.0,
    shards: Annotated[int, typer.Option(min=1, max=16, help="recall shards")] = 2,
) -> None:
    """Train on MovieLens-100K, start the cluster on local Ray, and show answers over gRPC."""
    from cluster.demo import DemoOptions, run_demo

    logging.basicConfig(level=logging.WARNING)
    run_demo(DemoOptions(serve=serve, port=port, bundle=bundle, train_seconds=train_seconds, num_shards=shards),
             console)


@app.command()
def up(
    config: Annotated[Path | None, typer.Option(help="cluster settings (TOML), e.g. deploy/cluster.toml")] = None,
    address: Annotated[str | None, typer.Option(help="join this Ray cluster instead of starting a local one")] = None,
    bundle: Annotated[Path | None, typer.Option(help="the bundle to serve")] = None,
    db: Annotated[Path | None, typer.Option(help="event log (SQLite)")] = None,
    shards: Annotated[int | None, typer.Option(min=1, max=256, help="recall shards")] = None,
    port: Annotated[int | None, typer.Option(help="gateway port")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="let clients in without a token (loopback only)")
                       ] = False,
) -> None:
    """Start the cluster on Ray and leave it running (local Ray with its dashboard by default).

    Clients need a bearer token: `tokens_file` in the config, or $RECFUNNEL_TOKENS.
    """
    from cluster.config import ClusterConfig
    from cluster.ops import up as start
    from protos.auth import CLIENT_TOKENS_ENV, client_tokens

    try:
        settings = ClusterConfig.from_file(config, bundle=bundle, db_path=db, num_shards=shards, gateway_port=port)
        tokens = settings.tokens or client_tokens(None)
    except (ValueError, TypeError, OSError) as error:
        raise typer.BadParameter(str(error)) from error
    if no_auth:
        tokens = ()
    elif not tokens:
        raise typer.BadParameter(f"clients need tokens: set tokens_file in the config or ${CLIENT_TOKENS_ENV}, "
                                 "or pass --no-auth", param_hint="--config")
    settings = replace(settings, tokens=tokens)
    endpoints = start(settings, address)
    console.print(f"gateway on [bold]{endpoints['gateway']}[/], serving {endpoints['model_version']}"
                  + (f"; Ray dashboard on {endpoints['dashboard']}" if endpoints["dashboard"] else ""))


@app.command()
def status(
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Each service actor: address, node, state, model version and restarts."""
    from rich.table import Table

    from cluster.ops import status as read_status

    report = read_status(address)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=f"recfunnel on {report['gateway']} serving {report['model_version']}")
    columns = ("name", "state", "address", "model_version", "restarts", "rss_mb", "node_id")
    for column in columns:
        table.add_column(column)
    for service in report["services"]:
        service = {**service, "rss_mb": f"{service['rss_bytes'] / 2**20:.0f}", "node_id": service["node_id"][:16]}
        table.add_row(*(str(service[c]) for c in columns))
    console.print(table)
    loop = report.get("loop")
    if loop is not None:
        last = loop.get("last_round") or {}
        console.print(f"feedback loop: {'running' if loop.get('running') else 'not running'}, "
                      f"{loop.get('pending', '?')} events pending, {loop.get('rounds', 0)} rounds"
                      + (f"; last: {last['decision']} ({last.get('version', last.get('error', ''))})" if last else ""))


@app.command()
def down(
    address: AddressOption = None,
) -> None:
    """Stop every service (and the local Ray `up` started)."""
    from cluster.ops import down as stop

    stop(address)
    console.print("recfunnel stopped")


@app.command()
def swap(
    bundle: Annotated[Path, typer.Argument(help="bundle folder to serve (trained with `recfunnel train`)")],
    address: AddressOption = None,
) -> None:
    """Serve another model version with no failed request: load beside, switch, drain, unload."""
    from cluster.ops import swap as run_swap

    if not (bundle / "manifest.json").is_file():
        raise typer.BadParameter(f"{bundle} holds no bundle (no manifest.json)", param_hint="BUNDLE")
    report = run_swap(bundle, address)
    console.print(f"serving [bold]{report['model_version']}[/] (was {report['previous_version']}); "
                  f"{report['replayed_changes']} catalogue changes replayed, {report['seconds']:.1f} s")


@app.command()
def versions(
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """The model versions this cluster has served, with their test metrics."""
    from rich.table import Table

    from cluster.ops import versions as read_versions

    listed = read_versions(address)
    if as_json:
        typer.echo(json.dumps(listed, indent=2))
        return
    table = Table(title="model versions, oldest first")
    for column in ("version", "serving", "funnel NDCG@10", "recall NDCG@10", "recent NDCG@10 (loop)", "bundle"):
        table.add_column(column)
    for entry in listed:
        test = entry["metrics"].get("test", {})
        judged = entry["metrics"].get("loop", {}).get("candidate", {})
        table.add_row(entry["version"], "yes" if entry["serving"] else "",
                      f"{test.get('funnel', {}).get('ndcg@10', float('nan')):.4f}",
                      f"{test.get('recall', {}).get('ndcg@10', float('nan')):.4f}",
                      f"{judged['ndcg@10']:.4f}" if judged else "", entry["bundle"])
    console.print(table)


@app.command()
def rollback(
    version: Annotated[str, typer.Argument(help="a version `recfunnel versions` lists")],
    address: AddressOption = None,
) -> None:
    """Serve an earlier model version again, by the same live swap."""
    from cluster.ops import rollback as run_rollback

    try:
        report = run_rollback(version, address)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="VERSION") from error
    console.print(f"serving [bold]{report['model_version']}[/] again (was {report['previous_version']})")


@app.command("loop")
def loop_command(
    config: Annotated[Path | None, typer.Option(help="cluster settings (TOML) whose [loop] table to start from")
                      ] = None,
    address: AddressOption = None,
    once: Annotated[bool, typer.Option("--once", help="one round now, then exit")] = False,
    dataset: Annotated[str | None, typer.Option(help="named base data set the serving version learnt")] = None,
    interactions: Annotated[Path | None, typer.Option(help="base interactions file instead of a named data set")
                            ] = None,
    items: Annotated[Path | None, typer.Option(help="item file: CSV item,text[,tags]")] = None,
    fmt: Annotated[DataFormat | None, typer.Option("--format", help="format of --interactions")] = None,
    every_events: Annotated[int | None, typer.Option(min=1, help="a round once this many events are new")] = None,
    every_seconds: Annotated[float | None, typer.Option(help="or this long after the last round, with any new")
                             ] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=256, help="Ray Train replicas")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="fine-tuning epochs of the query encoder")] = None,
    ranker_epochs: Annotated[int | None, typer.Option(min=1, help="fine-tuning epochs of the ranker")] = None,
    tolerance: Annotated[float | None, typer.Option(help="roll out when new NDCG@10 >= serving - this")] = None,
    output: Annotated[Path | None, typer.Option(help="folder for the rounds' bundles")] = None,
    storage: Annotated[Path | None, typer.Option(help="Ray Train checkpoints of the rounds")] = None,
) -> None:
    """The feedback loop: fine-tune on the logged events, judge on held-out recent ones, roll
    out if not worse. Prints one JSON report per round."""
    import tomllib

    from cluster.loop import LoopConfig
    from cluster.ops import feedback_loop

    try:
        values = tomllib.loads(config.read_text("utf-8")).get("loop", {}) if config else {}
        options = {"dataset": dataset, "interactions": interactions, "items": items,
                   "format": fmt.value if fmt else None, "every_events": every_events, "every_seconds": every_seconds,
                   "workers": workers, "encoder_epochs": epochs, "ranker_epochs": ranker_epochs,
                   "tolerance": tolerance, "output": output, "storage": storage}
        if interactions is not None:
            values.pop("dataset", None)
        settings = LoopConfig.from_dict({**values, **{k: v for k, v in options.items() if v is not None}}).resolved()
    except (ValueError, TypeError, OSError) as error:
        raise typer.BadParameter(str(error), param_hint="--config") from error
    try:
        feedback_loop(settings, address, once, say=lambda report: typer.echo(json.dumps(report, indent=2)))
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    except KeyboardInterrupt:
        console.print("feedback loop stopped")


@app.command("train")
def train_command(
    out: Annotated[Path, typer.Option(help="folder to write the bundle to")],
    dataset: DatasetOption = "ml-100k",
    interactions: InteractionsOption = None,
    items: ItemsOption = None,
    fmt: FormatOption = DataFormat.pairs,
    epochs: Annotated[int, typer.Option(min=1, help="most query-encoder epochs (early stopping ends sooner)")] = 60,
    seconds: Annotated[float, typer.Option(help="time budget of the query-encoder phase")] = 600.0,
    ranker_seconds: Annotated[float, typer.Option(help="time budget of the ranker phase")] = 300.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    curve: Annotated[Path | None, typer.Option(help="write NDCG@10 against seconds to this PNG")] = None,
    workers: Annotated[int, typer.Option(min=0, max=256, help="Ray Train data-parallel replicas (0 = in this "
                                                                "process, no Ray)")] = 0,
    storage: Annotated[Path, typer.Option(help="Ray Train checkpoints (with --workers)")] = Path("ray-train"),
    address: Annotated[str | None, typer.Option(help="Ray cluster for --workers (default: a local one)")] = None,
    gpu: Annotated[bool, typer.Option(help="one GPU per Ray Train worker, which trains on it (with --workers)")
                   ] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N for training in this process "
                                                    "(default: CUDA when present)")] = None,
) -> None:
    """Train the item/query encoders and the ranker; write a bundle and print its metrics as JSON."""
    from ranking.config import TrainConfig
    from ranking.train import train

    if workers and device is not None:
        raise typer.BadParameter("Ray Train workers train where Ray places them: use --gpu, not --device",
                                 param_hint="--device")
    if device is not None:
        from ranking.devices import resolve_device

        try:
            resolve_device(device)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--device") from error
    data = load_data(dataset, interactions, items, fmt)
    config = TrainConfig(epochs=epochs, time_budget_s=seconds, ranker_time_budget_s=ranker_seconds, seed=seed,
                         track_test=curve is not None, device=device)

    def report(stage: str, values: dict[str, float]) -> None:
        console.log(f"{stage} epoch {values['epoch']:.0f}: loss {values['loss']:.2f}, "
                    f"val NDCG@10 {values['ndcg@10']:.4f}, HR@10 {values['hr@10']:.4f}")

    if workers:
        import os

        import ray

        from cluster.train_ray import RayTrainConfig, train_on_ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        try:
            result = train_on_ray(data, config, out, RayTrainConfig(workers=workers, storage=storage, use_gpu=gpu))
        finally:
            ray.shutdown()
    else:
        result = train(data, config, out, progress=report)
    if curve is not None:
        from cluster.plots import plot_training_curve

        plot_training_curve(result.curve, curve, f"recfunnel training on {data.name}")
    typer.echo(json.dumps({"bundle": str(out), "version": result.version, "metrics": result.metrics,
                           "curve": result.curve}, indent=2))


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Option(help="bundle folder written by `recfunnel train`")],
    dataset: DatasetOption = "ml-100k",
    interactions: InteractionsOption = None,
    items: ItemsOption = None,
    fmt: FormatOption = DataFormat.pairs,
    seconds_per_model: Annotated[float, typer.Option(help="training budget of each baseline/ablation")] = 100.0,
    baselines: Annotated[bool, typer.Option(help="train SASRec-BCE, the no-text and cold-start models")] = True,
    cold_draws: Annotated[int, typer.Option(min=1, max=20, help="seeded draws of cold items, cases pooled")] = 1,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N for every model "
                                                    "(default: CUDA where torch sees one)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON report")] = False,
) -> None:
    """Full-ranking and sampled metrics of the funnel against baselines trained in the same run."""
    from ranking.quality import EvaluateConfig
    from ranking.quality import evaluate as run_evaluation

    try:
        config = EvaluateConfig(seconds_per_model=seconds_per_model, baselines=baselines, seed=seed,
                                cold_draws=cold_draws, device=device)
    except ValueError as error:  # the message names the option's field
        raise typer.BadParameter(str(error)) from error
    data = load_data(dataset, interactions, items, fmt)
    report = run_evaluation(bundle, data, config, report=None if as_json else console.log)
    typer.echo(json.dumps(report, indent=None if as_json else 2))


@app.command()
def loadtest(
    target: Annotated[str, typer.Option(help="gateway address HOST:PORT")] = "127.0.0.1:50051",
    qps: Annotated[float, typer.Option(min=0.1, max=100_000, help="offered requests per second")] = 50.0,
    duration: Annotated[float, typer.Option(min=1, max=86_400, help="measured seconds")] = 30.0,
    mix: Annotated[Path | None, typer.Option(help="request mix (TOML/JSON); default: MovieLens-100K ids")] = None,
    token: Annotated[str | None, typer.Option(envvar="RECFUNNEL_TOKEN", help="bearer token")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="PEM of the CA (or self-signed cert): use TLS")] = None,
    timeout: Annotated[float, typer.Option(min=0.01, max=60, help="deadline of each call, seconds")] = 1.0,
    seed: Annotated[int, typer.Option(help="random seed of arrivals and mix")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON report")] = False,
    plot: Annotated[Path | None, typer.Option(help="write latency over time and its distribution to this PNG")
                    ] = None,
) -> None:
    """Open-loop load on a gateway: Poisson arrivals, latency from the scheduled send time."""
    import asyncio

    from cluster.loadtest import LoadTest, Mix, report, run_load
    from cluster.loadtest import plot as draw

    try:
        request_mix = Mix.from_file(mix) if mix else Mix.movielens()
        test = LoadTest(target=target, qps=qps, duration_s=duration, token=token, tls_ca=tls_ca,
                        timeout_s=timeout, seed=seed)
    except (ValueError, TypeError, OSError) as error:
        raise typer.BadParameter(str(error)) from error
    if not as_json:
        console.log(f"{qps:g} requests/s for {duration:g} s on {target}")
    result = asyncio.run(run_load(test, request_mix))
    summary = report(test, result)
    if plot is not None:
        draw(result, plot, f"recfunnel loadtest: {qps:g} rps offered on {target}, "
                           f"p99 {summary['p99_ms']:.1f} ms, errors {sum(summary['errors'].values())}")
        summary["plot"] = str(plot)
    typer.echo(json.dumps(summary, indent=None if as_json else 2))


bench_app = typer.Typer(help="Benchmarks that print JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("soak")
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
) -> None:
    """Long load on the cluster `recfunnel up` started: errors, latency and each actor's memory growth."""
    from cluster.loadtest import LoadTest, Mix, soak
    from cluster.loadtest import plot as draw
    from cluster.ops import status as read_status

    cluster = read_status(address)
    test = LoadTest(target=cluster["gateway"], qps=qps, duration_s=duration, token=token, tls_ca=tls_ca, warmup_s=0)
    summary, result = soak(test, Mix.from_file(mix) if mix else Mix.movielens(), lambda: read_status(address),
                           warmup)
    if plot is not None:
        draw(result, plot, f"recfunnel soak: {qps:g} rps for {duration:g} s, p99 {summary['p99_ms']:.1f} ms, "
                           f"errors {sum(summary['errors'].values())}, RSS growth {summary['rss_growth_max']:+.1%}")
        summary["plot"] = str(plot)
    typer.echo(json.dumps(summary, indent=2))


@bench_app.command("loop")
def bench_loop(
    bundle: Annotated[Path, typer.Option(help="the bundle to serve first (trained on the data set below)")],
    dataset: DatasetOption = "ml-100k",
    interactions: InteractionsOption = None,
    items: ItemsOption = None,
    fmt: FormatOption = DataFormat.pairs,
    fans: Annotated[int, typer.Option(min=1, max=100_000, help="new users who send the new taste")] = 200,
    qps: Annotated[float, typer.Option(min=0.1, max=10_000, help="Recommend traffic during the round")] = 20.0,
    workdir: Annotated[Path, typer.Option(help="event log, the round's bundle and checkpoints")
                       ] = Path("bench-loop"),
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """One feedback-loop round on the embedded cluster under load: its time, verdict, failed
    requests, and what the new taste did to other users' lists."""
    from cluster.bench_loop import run_loop_bench
    from recdata.sources import DataSource

    try:
        source = DataSource(dataset, interactions, items, fmt.value)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--dataset") from error
    typer.echo(json.dumps(run_loop_bench(bundle, source, fans, qps, workdir, seed), indent=2))


@bench_app.command("train")
def bench_train(
    dataset: DatasetOption = "ml-100k",
    epochs: Annotated[int, typer.Option(min=1, max=100, help="query-encoder epochs each path trains")] = 3,
    workers: Annotated[str, typer.Option(help="comma-separated Ray Train worker counts")] = "1,2",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    rounds: Annotated[int, typer.Option(min=1, max=20, help="passes over every path; figures are their medians")] = 1,
) -> None:
    """Training throughput: the plain loop against Ray Train with 1 and 2 workers, one run."""
    from cluster.bench_train import run_train_bench

    counts = [int(n) for n in workers.split(",") if n.strip()]
    typer.echo(json.dumps(run_train_bench(load_data(dataset, None, None, DataFormat.pairs), epochs, counts, seed,
                                          rounds), indent=2))


class HelperHold(str, Enum):
    pause = "pause"
    idle = "idle"


@bench_app.command("train-helpers")
def bench_train_helpers(
    dataset: DatasetOption = "ml-100k",
    epochs: Annotated[int, typer.Option(min=2, max=100, help="query-encoder epochs of the Ray Train run")] = 12,
    window: Annotated[float, typer.Option(min=0.5, max=30, help="seconds of each window")] = 2.0,
    mode: Annotated[HelperHold, typer.Option(help="hold the helpers stopped (pause) or at SCHED_IDLE (idle)")]
    = HelperHold.pause,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """What Ray Train's helper actors cost one worker's training steps: alternate windows with
    them held and running, in one Ray Train run. Linux only."""
    from cluster.bench_helpers import run_helpers_bench

    typer.echo(json.dumps(run_helpers_bench(load_data(dataset, None, None, DataFormat.pairs), epochs, window,
                                            mode.value, seed), indent=2))


@bench_app.command("ablations")
def bench_ablations(
    dataset: DatasetOption = "ml-100k",
    interactions: InteractionsOption = None,
    items: ItemsOption = None,
    fmt: FormatOption = DataFormat.pairs,
    seconds: Annotated[float, typer.Option(help="encoder training budget of each variant")] = 120.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    only: Annotated[str, typer.Option(help="comma-separated variants to run (default: all)")] = "",
) -> None:
    """What each model choice contributes: the same training with one choice changed at a time."""
    from dataclasses import replace

    from ranking.baselines import SASRecTrainer
    from ranking.config import TrainConfig
    from ranking.train import Trainer, fit

    data = load_data(dataset, interactions, items, fmt)
    base = TrainConfig(time_budget_s=seconds, ranker_time_budget_s=seconds / 2, seed=seed)
    variants = {
        "full": base,
        "negatives_64": replace(base, num_negatives=64),
        "no_text": replace(base, use_text=False),
        "no_item2item": replace(base, candidates_per_channel=tuple(
            (c, k) for c, k in base.candidates_per_channel if c != "item2item")),
        "no_recent_popularity": replace(base, recent_popularity=False),
    }
    chosen = [n.strip() for n in only.split(",") if n.strip()] or [*variants, "sasrec_bce"]
    unknown = set(chosen) - {*variants, "sasrec_bce"}
    if unknown:
        raise typer.BadParameter(f"unknown variants {sorted(unknown)}; allowed: {', '.join([*variants, 'sasrec_bce'])}")
    rows: dict[str, dict[str, float]] = {}
    for name, config in variants.items():
        if name not in chosen:
            continue
        trainer = Trainer(data, config)
        metrics, _ = fit(trainer)
        rows[f"{name}/recall"] = metrics["test"]["recall"]
        rows[f"{name}/funnel"] = metrics["test"]["funnel"]
        console.log(f"{name}: recall NDCG@10 {rows[f'{name}/recall']['ndcg@10']:.4f}, "
                    f"funnel {rows[f'{name}/funnel']['ndcg@10']:.4f}")
    if "sasrec_bce" in chosen:
        trainer = Trainer(data, base)
        sasrec = SASRecTrainer(trainer.split, data.num_items, replace(base, num_negatives=1), trainer.valid)
        sasrec.train()
        rows["sasrec_bce/recall"] = trainer.test.full(sasrec.scores)
    typer.echo(json.dumps({"dataset": data.name, "seconds_per_variant": seconds, "test": rows}, indent=2))


@bench_app.command("serving")
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
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON report")] = False,
) -> None:
    """Latency and throughput of the served funnel: in-process vs the cluster, open-loop loads,
    micro-batching on/off, and the diversity knob."""
    from cluster.bench_serving import ServingBenchConfig, run_serving_bench
    from cluster.demo import train_bundle
    from recdata.movielens import cache_dir, load_ml100k

    logging.basicConfig(level=logging.WARNING)
    data = load_ml100k()
    if bundle is None:
        bundle = cache_dir() / "demo" / "bundle"
        if not (bundle / "manifest.json").exists():
            train_bundle(data, bundle, 150.0, console)
    config = ServingBenchConfig(bundle=bundle, rates=tuple(float(r) for r in rates.split(",")),
                                seconds_per_rate=seconds, low_rate=low_rate, concurrency=concurrency,
                                batching_threads=ranker_threads, diversity_users=diversity_users,
                                num_shards=shards)
    report = run_serving_bench(data, config, progress=(lambda _: None) if as_json else console.log)
    typer.echo(json.dumps(report, indent=None if as_json else 2))


@bench_app.command("transport")
def bench_transport(
    rate: Annotated[float, typer.Option(min=0.1, max=100, help="requests/s of the idle measurement")] = 10.0,
    seconds: Annotated[float, typer.Option(min=0.5, max=600, help="seconds of the idle measurement")] = 8.0,
    seed: Annotated[int, typer.Option(help="random seed of the arrivals")] = 0,
) -> None:
    """One round trip between two local processes, idle and back to back: grpc.aio against a
    bare asyncio socket. The cluster's request path makes four such gRPC round trips."""
    from cluster.bench_transport import run_transport_bench

    typer.echo(json.dumps(run_transport_bench(rate, seconds, seed), indent=2))


@bench_app.command("recall")
def bench_recall(
    items: Annotated[int, typer.Option(min=1000, help="catalogue size")] = 1_000_000,
    dim: Annotated[int, typer.Option(min=2, help="vector width")] = 64,
    shards: Annotated[int, typer.Option(min=1, max=64, help="shards of the sharded-vs-single comparison")] = 4,
    kinds: Annotated[str, typer.Option(help="approximate index kinds, comma-separated")] = "hnsw,ivf,ivfpq",
    queries: Annotated[int, typer.Option(min=10, help="evaluation queries")] = 1000,
    seconds: Annotated[float, typer.Option(help="seconds per single-query QPS measurement")] = 5.0,
    target_recall: Annotated[float, typer.Option(help="recall@100 the indexes are tuned to")] = 0.95,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON report")] = False,
) -> None:
    """Exact search against HNSW / IVF / IVF-PQ on a clustered synthetic catalogue: recall@100,
    QPS, build time, bytes, upsert-to-searchable, and sharded against single."""
    from retrieval.bench import RecallBenchConfig, run_recall_bench

    config = RecallBenchConfig(items=items, dim=dim, shards=shards, kinds=tuple(k for k in kinds.split(",") if k),
                               queries=queries, single_seconds=seconds, target_recall=target_recall, seed=seed)
    report = run_recall_bench(config, progress=(lambda _: None) if as_json else console.log)
    typer.echo(json.dumps(report, indent=None if as_json else 2))


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="folder for interactions.txt (pairs) and items.csv")],
    users: Annotated[int, typer.Option(min=1, help="users")] = 20_000,
    items: Annotated[int, typer.Option(min=1, help="catalogue items")] = 20_000,
    mean_length: Annotated[int, typer.Option(min=2, help="mean interactions per user")] = 15,
    topics: Annotated[int, typer.Option(min=1, help="latent topics")] = 50,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Write a synthetic data set in the pairs format plus its item file, for scale runs."""
    from recdata.synthetic import SyntheticConfig, generate, write_pairs

    data = generate(SyntheticConfig(num_users=users, num_items=items, num_topics=topics,
                                    mean_length=mean_length, min_length=min(5, mean_length), seed=seed))
    pairs, item_file = write_pairs(data, out)
    typer.echo(json.dumps({"interactions": str(pairs), "items": str(item_file), "users": data.num_users,
                           "catalogue": data.num_items, "pairs": data.num_interactions}))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
