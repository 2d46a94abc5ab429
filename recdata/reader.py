"""Interactions read in chunks, whatever the file's size.

Each chunk's user and item columns are dictionary-encoded by pyarrow (its distinct values and
one integer code a row), and only the distinct values meet Python, where `IdMap` gives each
its dense index in order of first appearance. Memory therefore holds one int64 a row and one
string per distinct id, never a Python object per event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CHUNK_ROWS = 1 << 20  # rows a chunk: a few tens of MB of columns at a time


@dataclass
class IdMap:
    """Distinct string ids -> dense indexes, in order of first appearance."""

    index: dict[str, int] = field(default_factory=dict)

    def encode(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """(rows,) int64 indexes of a column's ids, new ids appended in order of appearance."""
        encoded = pc.dictionary_encode(pc.cast(column, pa.string()))
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        if encoded.null_count:
            raise ValueError("an id is missing (null) in the interactions")
        distinct = encoded.dictionary.to_pylist()
        lookup = np.fromiter((self.index.setdefault(v, len(self.index)) for v in distinct), np.int64, len(distinct))
        codes: np.ndarray = lookup[encoded.indices.to_numpy(zero_copy_only=False)]
        return codes

    @property
    def ids(self) -> list[str]:
        return list(self.index)


@dataclass
class EventColumns:
    """Every event of a file as dense columns: user and item indexes, and times when the file has them."""

    users: IdMap = field(default_factory=IdMap)
    items: IdMap = field(default_factory=IdMap)
    user_codes: list[np.ndarray] = field(default_factory=list)
    item_codes: list[np.ndarray] = field(default_factory=list)
    times: list[np.ndarray] | None = None

    def add(self, users: pa.Array, items: pa.Array, times: pa.Array | None) -> None:
        self.user_codes.append(self.users.encode(users))
        self.item_codes.append(self.items.encode(items))
        if times is not None:
            self.times = self.times or []
            self.times.append(pc.cast(times, pa.float64()).to_numpy(zero_copy_only=False))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        empty = np.zeros(0, np.int64)
        return (np.concatenate(self.user_codes) if self.user_codes else empty,
                np.concatenate(self.item_codes) if self.item_codes else empty,
                None if self.times is None else np.concatenate(self.times))


CSV_BLOCK_BYTES = 64 << 20

# (done, total) of a read, in rows for Parquet (its footer knows them), in bytes for text files.
ReadProgress = Callable[[int, int], None]


def _table_chunks(path: Path, fmt: str, progress: ReadProgress) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        _check_columns(path, names)
        rows, total = 0, parquet.metadata.num_rows
        progress(0, total)
        for batch in parquet.iter_batches(batch_size=CHUNK_ROWS,
                                          columns=[c for c in ("user", "item", "timestamp") if c in names]):
            yield batch
            rows += batch.num_rows
            progress(rows, total)
        return
    import csv

    import pyarrow.csv as pcsv

    with path.open(newline="", encoding="utf-8") as f:
        names = next(csv.reader(f), [])
    _check_columns(path, names)
    # Ids stay strings (a zero-padded "007" is not 7); other columns are skipped unread.
    size = path.stat().st_size
    progress(0, size)
    reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                           convert_options=pcsv.ConvertOptions(
                               column_types={"user": pa.string(), "item": pa.string()},
                               include_columns=[c for c in ("user", "item", "timestamp") if c in names]))
    for blocks, batch in enumerate(reader, 1):
        yield batch
        progress(min(blocks * CSV_BLOCK_BYTES, size), size)  # a batch is a block of the file
    progress(size, size)


def _check_columns(path: Path, names: list[str]) -> None:
    missing = {"user", "item"} - set(names)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}; need user,item[,timestamp]; "
                         f"found: {', '.join(names)}")


def _pair_chunks(path: Path, progress: ReadProgress) -> Iterator[tuple[list[str], list[str]]]:
    # Whitespace-separated pairs (tabs and runs of spaces alike) are split here, a chunk of
    # lines at a time, since pyarrow's CSV reader takes one fixed delimiter.
    users: list[str] = []
    items: list[str] = []
    size, read = path.stat().st_size, 0
    progress(0, size)
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            read += len(line)  # characters: bytes for the ASCII ids files mostly hold
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(f"{path}:{line_no}: expected `user item`, got {line!r}")
            users.append(parts[0])
            items.append(parts[1])
            if len(users) == CHUNK_ROWS:
                yield users, items
                users, items = [], []
                progress(min(read, size), size)
    if users:
        yield users, items
    progress(size, size)


def read_event_columns(path: Path, fmt: str, progress: ReadProgress | None = None) -> EventColumns:
    """Every event of an interactions file (`pairs`, `csv` or `parquet`), read in chunks;
    `progress(done, total)` after each."""
    events = EventColumns()
    progress = progress or (lambda done, total: None)
    if fmt == "pairs":
        for users, items in _pair_chunks(path, progress):
            events.add(pa.array(users, pa.string()), pa.array(items, pa.string()), None)
    elif fmt in ("csv", "parquet"):
        for batch in _table_chunks(path, fmt, progress):
            has_time = "timestamp" in batch.schema.names
            events.add(batch.column("user"), batch.column("item"), batch.column("timestamp") if has_time else None)
    else:
        raise ValueError(f"unknown interaction format {fmt!r}; use pairs, csv or parquet")
    return events
