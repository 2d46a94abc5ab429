"""The `recfunnel` command line: a root app over one sub-app per command group, each group's
commands and options in their own module.

The measurement commands (`loadtest`, `bench …`) come from the `bench` package; this root is
the one place in the product that names it, and their code loads only when they run.
"""

from __future__ import annotations

import typer

from bench.cli import bench
from bench.cli import group as measurement
from cluster.cli import experiments, operations, training, versions

app = typer.Typer(help="recfunnel: a gRPC recommendation cluster (FAISS recall, transformer ranking, Ray).",
                  no_args_is_help=True, add_completion=False)


def _add_group(group: typer.Typer, panel: str) -> None:
    """Put a group's commands on the root, listed under `panel` in `recfunnel --help`."""
    for command in group.registered_commands:
        command.rich_help_panel = panel
    app.add_typer(group)


_add_group(operations.group, "Run the cluster")
_add_group(versions.group, "Model versions")
_add_group(training.group, "Train and evaluate")
_add_group(measurement, "Measure")
app.add_typer(bench, name="bench", rich_help_panel="Measure")
app.add_typer(experiments.group, name="experiments", rich_help_panel="Run the cluster")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
