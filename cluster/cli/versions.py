"""`recfunnel` commands for model versions: swap the serving one live, list them, roll back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cluster.cli.options import AddressOption, JsonOption, console

group = typer.Typer()


@group.command()
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


@group.command()
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


@group.command()
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
