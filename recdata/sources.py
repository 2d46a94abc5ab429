"""Where a data set comes from: a named one, or interaction and item files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recdata.dataset import Dataset, InteractionFormat, read_interactions

NAMED = ("ml-100k",)


@dataclass(frozen=True)
class DataSource:
    dataset: str = "ml-100k"           # a named data set, unless `interactions` is given
    interactions: Path | None = None   # interactions file (see `read_interactions`)
    items: Path | None = None          # item file: CSV id,text[,tags] (see `read_item_file`)
    format: InteractionFormat = "pairs"
    item_column: str | None = None     # the item file's id column, when not item / item_id / id

    def __post_init__(self) -> None:
        if self.interactions is None and self.dataset not in NAMED:
            raise ValueError(f"unknown dataset {self.dataset!r}; use one of {', '.join(NAMED)} or an interactions file")
        if self.format not in ("pairs", "csv", "parquet"):
            raise ValueError(f"unknown interaction format {self.format!r}; use pairs, csv or parquet")

    def load(self, progress: Callable[[int, int], None] | None = None) -> Dataset:
        """The data set; `progress(done, total)` follows the reading of an interactions file."""
        if self.interactions is not None:
            return read_interactions(self.interactions, self.format, self.items, self.item_column, progress)
        from recdata.movielens import load_ml100k

        return load_ml100k()
