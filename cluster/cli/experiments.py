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


@group.command("report")
def report_command(
    db: Annotated[str, typer.Option(help="event store holding the exposure log: a SQLite file or a "
                                         "postgresql:// URL")] = "recfunnel.sqlite",
    by: Annotated[GroupBy, typer.Option(help="compare answers by experiment variant or by model version")
                  ] = GroupBy.variant,
    k: Annotated[int, typer.Option(min=1, max=1000, help="places of an answer that count")] = 10,
    click_type: Annotated[list[str] | None, typer.Option(help="event types that are clicks (repeatable) "
                                                              "[default: click]")] = None,
    conversion_type: Annotated[list[str] | None, typer.Option(help="event types that are conversions "
                                                                   "(repeatable) [default: purchase]")] = None,
    control: Annotated[str | None, typer.Option(help="the group the others are tested against (default: "
                                                     "'control', else the one with most answers)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON report")] = False,
) -> None:
    """Per group: answers, exposures, CTR@k, conversion@k and MRR@k with 95% intervals, and each
    against the control (difference, interval, lift, two-sided p-value)."""
    from gateway.events import open_event_store
    from gateway.online_metrics import ReportConfig, online_report

    try:
        config = ReportConfig(k=k, click_types=tuple(click_type or ("click",)),
                              conversion_types=tuple(conversion_type or ("purchase",)),
                              by=by.value.replace("-", "_"), control=control)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    from gateway.events import is_postgres_url

    if not is_postgres_url(db) and not Path(db).is_file():  # opening it would create an empty one
        raise typer.BadParameter(f"no event store at {db}", param_hint="--db")
    store = open_event_store(db)
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
    return lines
