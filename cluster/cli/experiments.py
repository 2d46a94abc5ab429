"""`recfunnel experiments …`: what the answers of each experiment variant (or model version)
led to, from the exposure log and the events attributed to it."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

group = typer.Typer(help="Online experiments: the answers each variant served and what they led to.",
                    no_args_is_help=True)


class GroupBy(str, Enum):
    variant = "variant"
    model_version = "model-version"


DbOption = Annotated[str, typer.Option(help="the cluster's event store: a SQLite file or a postgresql:// URL")]


def _store(db: str) -> Any:
    from gateway.events import is_postgres_url, open_event_store

    if not is_postgres_url(db) and not Path(db).is_file():  # opening it would create an empty one
        raise typer.BadParameter(f"no event store at {db}", param_hint="--db")
    return open_event_store(db)


@group.command("start")
def start_command(
    file: Annotated[Path, typer.Argument(help="TOML with one [[experiments]] table (a cluster config will do)")],
    db: DbOption = "recfunnel.sqlite",
) -> None:
    """Start an experiment on the running cluster: every gateway takes it up within its poll
    interval (2 s), no restart; it replaces any experiment running."""
    import tomllib

    from gateway.experiments import EXPERIMENT_SETTING, experiments_from_config

    try:
        tables = tomllib.loads(file.read_text("utf-8")).get("experiments", [])
        experiments = experiments_from_config(tables)
    except (OSError, ValueError, TypeError) as error:
        raise typer.BadParameter(str(error), param_hint="FILE") from error
    if not experiments:
        raise typer.BadParameter(f"{file} has no [[experiments]] table", param_hint="FILE")
    store = _store(db)
    try:
        store.set_setting(EXPERIMENT_SETTING, experiments[0].to_json())
    finally:
        store.close()
    shares = ", ".join(f"{v.name} {v.share:g}" for v in experiments[0].variants)
    typer.echo(f"experiment {experiments[0].name} started ({shares})")


@group.command("stop")
def stop_command(db: DbOption = "recfunnel.sqlite") -> None:
    """Stop the running experiment: every gateway serves without one within its poll interval."""
    from gateway.experiments import EXPERIMENT_SETTING

    store = _store(db)
    try:
        store.set_setting(EXPERIMENT_SETTING, "")
    finally:
        store.close()
    typer.echo("no experiment runs")


@group.command("report")
def report_command(
    db: DbOption = "recfunnel.sqlite",
    by: Annotated[GroupBy, typer.Option(help="compare answers by experiment variant or by model version")
                  ] = GroupBy.variant,
    k: Annotated[int, typer.Option(min=1, max=1000, help="places of an answer that count")] = 10,
    click_type: Annotated[list[str] | None, typer.Option(help="event types that are clicks (repeatable) "
                                                              "[default: click]")] = None,
    conversion_type: Annotated[list[str] | None, typer.Option(help="event types that are conversions "
                                                                   "(repeatable) [default: purchase]")] = None,
    control: Annotated[str | None, typer.Option(help="the group the others are tested against (default: "
                                                     "'control', else the one with most answers)")] = None,
    propensity_depth: Annotated[int, typer.Option(min=2, max=100, help="places the click-propensity estimate "
                                                  "covers (the gateways' [exploration] depth)")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON report")] = False,
) -> None:
    """Per group: answers, exposures, CTR@k, conversion@k and MRR@k with 95% intervals, and each
    against the control (difference, interval, lift, two-sided p-value); with exploration on,
    the click propensity of each place."""
    from gateway.online_metrics import ReportConfig, online_report

    try:
        config = ReportConfig(k=k, click_types=tuple(click_type or ("click",)),
                              conversion_types=tuple(conversion_type or ("purchase",)),
                              by=by.value.replace("-", "_"), control=control, propensity_depth=propensity_depth)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    store = _store(db)
    try:
        result = online_report(store, config)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--control") from error
    finally:
        store.close()
    if not as_json:
        for line in report_lines(result):
            typer.echo(line, err=True)
    typer.echo(json.dumps(result, indent=None if as_json else 2))


def report_lines(result: dict[str, Any]) -> list[str]:
    """The report as a table: a row per group, its figures with their intervals."""
    k = result["k"]
    metrics = (f"ctr@{k}", f"conversion@{k}", f"mrr@{k}")
    lines = [f"{'group':<24} {'answers':>8} " + " ".join(f"{m:>26}" for m in metrics) + "  p (ctr) vs control"]
    for name, figures in result["groups"].items():
        cells = [f"{figures[m]['value']:.4f} [{figures[m]['low']:.4f}, {figures[m]['high']:.4f}]" for m in metrics]
        test = figures.get("against_control", {}).get(metrics[0])
        lines.append(f"{name:<24} {figures['answers']:>8} " + " ".join(f"{c:>26}" for c in cells)
                     + (f"  {test['p_value']:.3g}" if test else "  (control)"))
    bias = result.get("position_propensity")
    if bias:
        lines.append(f"click propensity by place (from {bias['swapped_exposures']} swapped exposures): "
                     + " ".join(f"{p:.3f}" for p in bias["propensity"]))
    return lines
