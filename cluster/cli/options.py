"""Options that several `recfunnel` commands share: which data set to read, which cluster to
reach, and JSON output."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from recdata.dataset import Dataset
    from recdata.sources import DataSource

console = Console()  # what a command answers
# Progress bars and log lines: on stderr, so that a command's JSON on stdout stays alone.
progress_console = Console(stderr=True)


class DataFormat(str, Enum):
    pairs = "pairs"
    csv = "csv"
    parquet = "parquet"


# The options that name a data set, shared by every command that reads one.
DatasetOption = Annotated[str, typer.Option(help="named data set")]
InteractionsOption = Annotated[Path | None, typer.Option(help="interactions file instead of a named data set")]
ItemsOption = Annotated[Path | None, typer.Option(help="item file: CSV id,text[,tags], the id column named "
                                                       "item, item_id or id")]
ItemColumnOption = Annotated[str | None, typer.Option(help="the item file's id column, when it has another name "
                                                           "(movieId, sku)")]
FormatOption = Annotated[DataFormat, typer.Option("--format", help="format of --interactions")]

# The options that find a running cluster and ask for JSON, shared by the operating commands.
AddressOption = Annotated[str | None, typer.Option(help="the Ray cluster (default: the one `up` used)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]


def data_source(dataset: str | None, interactions: Path | None, items: Path | None, fmt: DataFormat,
                item_column: str | None = None) -> DataSource:
    """Where the command's data comes from; a bad choice is a usage error naming --dataset."""
    from recdata.sources import DataSource

    try:
        return DataSource(dataset or "", interactions, items, fmt.value, item_column)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--dataset") from error


def load_data(dataset: str | None, interactions: Path | None, items: Path | None, fmt: DataFormat,
              item_column: str | None = None, progress: Callable[[int, int], None] | None = None) -> Dataset:
    """The named data set, or interactions read from a file; a file that cannot be read as its
    format is a usage error whose message names the file and what was found."""
    source = data_source(dataset, interactions, items, fmt, item_column)
    try:
        return source.load(progress)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
