"""`recfunnel` commands that run and watch the cluster: the embedded demo, `up`, `status`,
`down`, and the feedback loop."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from cluster.cli.options import AddressOption, DataFormat, ItemColumnOption, ItemsOption, JsonOption, console

group = typer.Typer()


@group.command()
def demo(
    serve: Annotated[bool, typer.Option("--serve", help="keep serving on 127.0.0.1:50051 until interrupted")] = False,
    port: Annotated[int, typer.Option(help="gateway port")] = 50051,
    bundle: Annotated[Path | None, typer.Option(help="serve this trained bundle instead of training one")] = None,
    train_seconds: Annotated[float, typer.Option(help="time budget of the query-encoder training")] = 150.0,
    shards: Annotated[int, typer.Option(min=1, max=16, help="recall shards")] = 2,
    retrain: Annotated[bool, typer.Option("--retrain", help="train even when the demo bundle trained before on "
                                                            "the same data and configuration is cached")] = False,
) -> None:
    """Train on MovieLens-100K, start the cluster on local Ray, and show answers over gRPC.

    The bundle trained before is reused when the data and the training configuration are the
    same (`--retrain` trains again)."""
    from cluster.demo import DemoOptions, run_demo

    logging.basicConfig(level=logging.WARNING)
    run_demo(DemoOptions(serve=serve, port=port, bundle=bundle, train_seconds=train_seconds, num_shards=shards,
                         retrain=retrain), console)


@group.command()
def up(
    config: Annotated[Path | None, typer.Option(help="cluster settings (TOML), e.g. deploy/cluster.toml")] = None,
    address: Annotated[str | None, typer.Option(help="join this Ray cluster instead of starting a local one")] = None,
    bundle: Annotated[Path | None, typer.Option(help="the bundle to serve")] = None,
    db: Annotated[str | None, typer.Option(help="event store: a SQLite file, or a postgresql://user@host/db URL")
                  ] = None,
    shards: Annotated[int | None, typer.Option(min=1, max=256, help="recall shards")] = None,
    port: Annotated[int | None, typer.Option(help="gateway port")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="let clients in without a token (loopback only)")
                       ] = False,
) -> None:
    """Start the cluster on Ray and leave it running (local Ray with its dashboard by default).

    Clients need a bearer token: `tokens_file` in the config, or $RECFUNNEL_TOKENS.
    """
    from cluster.config import ClusterConfig
    from cluster.ops import HeadStartFailed
    from cluster.ops import up as start
    from gateway.events import store_settings
    from protos.auth import CLIENT_TOKENS_ENV, client_tokens

    try:
        settings = ClusterConfig.from_file(config, bundle=bundle, num_shards=shards, gateway_port=port,
                                           **store_settings(db))
        tokens = settings.tokens or client_tokens(None)
    except (ValueError, TypeError, OSError) as error:
        raise typer.BadParameter(str(error)) from error
    if no_auth:
        tokens = ()
    elif not tokens:
        raise typer.BadParameter(f"clients need tokens: set tokens_file in the config or ${CLIENT_TOKENS_ENV}, "
                                 "or pass --no-auth", param_hint="--config")
    settings = replace(settings, tokens=tokens)
    try:
        endpoints = start(settings, address)
    except HeadStartFailed as error:
        console.print(f"[red]could not start a local Ray head[/]: {error}")
        raise typer.Exit(1) from error
    console.print(f"gateway on [bold]{endpoints['gateway']}[/], serving {endpoints['model_version']}"
                  + (f"; Ray dashboard on {endpoints['dashboard']}" if endpoints["dashboard"] else ""))


@group.command()
def status(
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Each service actor: address, node, state, model version and restarts."""
    from cluster.ops import status as read_status

    report = read_status(address)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for line in status_lines(report):
        console.print(line, highlight=False, markup=False)


def status_lines(report: dict[str, Any]) -> list[str]:
    """`recfunnel status` for a person: two lines per actor, columns as wide as their longest
    value, so that names, addresses and versions fit an 80-column terminal whole."""
    services = report["services"]
    rows = [(s["name"], str(s["state"]), str(s["address"]), f"{s['restarts']} restarts",
             f"{s['rss_bytes'] / 2**20:.0f} MB") for s in services]
    widths = [max((len(row[c]) for row in rows), default=0) for c in range(5)]
    lines = [f"recfunnel on {report['gateway']} serving {report['model_version']}"]
    for service, row in zip(services, rows, strict=True):
        lines.append("  ".join(value.rjust(w) if c >= 3 else value.ljust(w)
                               for c, (value, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        lines.append(f"    version {service['model_version']}, node {service['node_id'][:16]}")
        admission = service.get("admission") or {}
        if admission:
            lines.append(admission_line(admission))
    loop = report.get("loop")
    if loop is not None:
        last = loop.get("last_round") or {}
        lines.append(f"feedback loop: {'running' if loop.get('running') else 'not running'}, "
                     f"{loop.get('pending', '?')} events pending, {loop.get('rounds', 0)} rounds")
        if last:
            lines.append(f"    last round: {last['decision']}, {last.get('version', last.get('error', ''))}")
    return lines
def admission_line(admission: dict[str, Any]) -> str:
    """A gateway's admission control in one line of at most 80 columns (counts are in --json)."""
    if not admission["enabled"]:
        return f"    admission: off, {admission['in_flight']} running"
    shed, admitted = admission["shed"], admission["admitted"]
    wait_ms = 1000 * admission["queue_wait_s"] / max(admitted, 1)
    return (f"    admission limit {admission['limit']}: {admission['in_flight']} running, {admission['queued']} "
            f"queued; {100 * shed / max(shed + admitted, 1):.1f}% shed, queue wait {wait_ms:.2f} ms")


@group.command()
def down(
    address: AddressOption = None,
) -> None:
    """Stop every service (and the local Ray `up` started)."""
    from cluster.ops import down as stop

    stop(address)
    console.print("recfunnel stopped")


@group.command("loop")
def loop_command(
    config: Annotated[Path | None, typer.Option(help="cluster settings (TOML) whose [loop] table to start from")
                      ] = None,
    address: AddressOption = None,
    once: Annotated[bool, typer.Option("--once", help="one round now, then exit")] = False,
    dataset: Annotated[str | None, typer.Option(help="named base data set the serving version learnt")] = None,
    interactions: Annotated[Path | None, typer.Option(help="base interactions file instead of a named data set")
                            ] = None,
    items: ItemsOption = None,
    item_column: ItemColumnOption = None,
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
    """The feedback loop: fine-tune on the logged events, roll out if not worse.

    Each round is judged on held-out recent events and prints one JSON report."""
    import tomllib

    from cluster.loop import LoopConfig
    from cluster.ops import feedback_loop

    try:
        values = tomllib.loads(config.read_text("utf-8")).get("loop", {}) if config else {}
        options = {"dataset": dataset, "interactions": interactions, "items": items, "item_column": item_column,
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
