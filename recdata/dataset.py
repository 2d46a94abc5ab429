"""The in-memory data set every stage trains and evaluates on, and readers for the common formats."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from recdata.attributes import ItemAttributes, PropertyValue
from recdata.vectors import COLUMN_PREFIX, check_vector_name, parse_vector, vector_column

if TYPE_CHECKING:
    from recdata.reader import EventColumns

InteractionFormat = Literal["pairs", "csv", "parquet"]


@dataclass(frozen=True)
class Dataset:
    """Users' interaction sequences over a catalogue of items with text.

    Users and items are dense indexes into `user_ids` / `item_ids`; `sequences[u]` holds
    user u's item indexes oldest first.
    """

    name: str
    user_ids: list[str]
    item_ids: list[str]
    sequences: list[np.ndarray]
    item_texts: list[str]
    item_tags: list[tuple[str, ...]] = field(default_factory=list)
    # Per user, the time of each interaction in `sequences`; None when the source has no times.
    timestamps: list[np.ndarray] | None = None
    # Per item, typed attributes for request-time filters (price, year, brand); {} = none.
    item_properties: list[dict[str, PropertyValue]] = field(default_factory=list)
    # Per user, what they said about themselves (age, gender, occupation); {} = nothing.
    user_properties: list[dict[str, PropertyValue]] = field(default_factory=list)
    # Named precomputed item embeddings (an image model's, say): name -> (I, d) float32; an
    # all-zero row is an item without that vector.
    item_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    # Per user, the training weight of each interaction in `sequences` (its event type's
    # weight, times its value where it has one); None: every interaction weighs 1.
    weights: list[np.ndarray] | None = None
    # Per user, the items they told us they dislike (negative event types): never history,
    # extra negatives for that user in training. [] = none for anyone.
    negatives: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.sequences) != len(self.user_ids):
            raise ValueError(f"{len(self.sequences)} sequences for {len(self.user_ids)} users")
        if self.timestamps is not None and [len(t) for t in self.timestamps] != [len(s) for s in self.sequences]:
            raise ValueError("timestamps must hold one time per interaction of every sequence")
        if len(self.item_texts) != len(self.item_ids):
            raise ValueError(f"{len(self.item_texts)} item texts for {len(self.item_ids)} items")
        if self.item_tags and len(self.item_tags) != len(self.item_ids):
            raise ValueError(f"{len(self.item_tags)} tag lists for {len(self.item_ids)} items")
        if not self.item_tags:
            object.__setattr__(self, "item_tags", [() for _ in self.item_ids])
        if self.item_properties and len(self.item_properties) != len(self.item_ids):
            raise ValueError(f"{len(self.item_properties)} property sets for {len(self.item_ids)} items")
        if not self.item_properties:
            object.__setattr__(self, "item_properties", [{} for _ in self.item_ids])
        if self.user_properties and len(self.user_properties) != len(self.user_ids):
            raise ValueError(f"{len(self.user_properties)} property sets for {len(self.user_ids)} users")
        if not self.user_properties:
            object.__setattr__(self, "user_properties", [{} for _ in self.user_ids])
        if self.weights is not None:
            if [len(w) for w in self.weights] != [len(s) for s in self.sequences]:
                raise ValueError("weights must hold one weight per interaction of every sequence")
            if any(len(w) and not (np.isfinite(w).all() and (w > 0).all()) for w in self.weights):
                raise ValueError("interaction weights must be finite and > 0 (negative events are `negatives`)")
        if self.negatives and len(self.negatives) != len(self.user_ids):
            raise ValueError(f"{len(self.negatives)} negative-item lists for {len(self.user_ids)} users")
        if not self.negatives:
            object.__setattr__(self, "negatives", [np.zeros(0, np.int64) for _ in self.user_ids])
        for name, vectors in self.item_vectors.items():
            check_vector_name(name)
            if vectors.ndim != 2 or len(vectors) != len(self.item_ids) or vectors.dtype != np.float32:
                raise ValueError(f"item vectors {name!r} must be float32 (items={len(self.item_ids)}, dim); "
                                 f"got {vectors.dtype} {vectors.shape}")

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def fingerprint(self) -> str:
        """A hash of everything training reads or writes into a bundle (ids, sequences, times,
        text, tags, properties, vectors, weights, negatives): equal fingerprints mean the same data."""
        digest = hashlib.sha256(self.name.encode())
        properties = [json.dumps(p, sort_keys=True) for p in [*self.item_properties, *self.user_properties]]
        for strings in (self.user_ids, self.item_ids, self.item_texts, ["|".join(t) for t in self.item_tags],
                        properties):
            digest.update("\x1f".join(strings).encode())
            digest.update(b"\x1e")
        lengths = np.fromiter((len(s) for s in self.sequences), dtype=np.int64, count=len(self.sequences))
        digest.update(lengths.tobytes())
        if self.sequences:
            digest.update(np.concatenate(self.sequences).astype(np.int64).tobytes())
        if self.timestamps is not None and self.timestamps:
            digest.update(np.concatenate(self.timestamps).astype(np.float64).tobytes())
        for name in sorted(self.item_vectors):
            digest.update(name.encode() + b"\x1e" + np.ascontiguousarray(self.item_vectors[name]).tobytes())
        if self.weights is not None and self.weights:
            digest.update(b"weights" + np.concatenate(self.weights).astype(np.float64).tobytes())
        if any(len(n) for n in self.negatives):
            digest.update(b"negatives" + np.fromiter((len(n) for n in self.negatives), np.int64).tobytes()
                          + np.concatenate(self.negatives).astype(np.int64).tobytes())
        return digest.hexdigest()

    @property
    def has_negatives(self) -> bool:
        return any(len(n) for n in self.negatives)

    def item_attributes(self) -> list[ItemAttributes]:
        """What filters read of each item; an item joined the catalogue at its first
        interaction (0, unknown, where the data has no times or the item none)."""
        first = np.zeros(self.num_items, dtype=np.float64)
        if self.timestamps is not None and self.sequences:
            items, times = np.concatenate(self.sequences), np.concatenate(self.timestamps)
            first = np.full(self.num_items, np.inf)
            np.minimum.at(first, items, times)
            first[~np.isfinite(first)] = 0
        return [ItemAttributes(tags, properties, int(seconds * 1000))
                for tags, properties, seconds in zip(self.item_tags, self.item_properties, first, strict=True)]


def from_events(
    name: str,
    users: list[str],
    items: list[str],
    timestamps: np.ndarray | None = None,
    item_texts: dict[str, str] | None = None,
    item_tags: dict[str, tuple[str, ...]] | None = None,
    item_properties: dict[str, dict[str, PropertyValue]] | None = None,
    user_properties: dict[str, dict[str, PropertyValue]] | None = None,
    item_vectors: dict[str, dict[str, np.ndarray]] | None = None,
) -> Dataset:
    """Build a Dataset from parallel event columns; order within a user follows `timestamps`
    (stable, so ties keep file order) or file order when there are none."""
    import pyarrow as pa

    from recdata.reader import EventColumns

    if len(users) != len(items):
        raise ValueError(f"{len(users)} users but {len(items)} items in the event columns")
    events = EventColumns()
    events.add(pa.array(users, pa.string()), pa.array(items, pa.string()),
               None if timestamps is None else pa.array(np.asarray(timestamps, dtype=np.float64)))
    return from_columns(name, events, item_texts, item_tags, item_properties, user_properties, item_vectors)


def from_columns(name: str, events: EventColumns, item_texts: dict[str, str] | None = None,
                 item_tags: dict[str, tuple[str, ...]] | None = None,
                 item_properties: dict[str, dict[str, PropertyValue]] | None = None,
                 user_properties: dict[str, dict[str, PropertyValue]] | None = None,
                 item_vectors: dict[str, dict[str, np.ndarray]] | None = None) -> Dataset:
    """Build a Dataset from dense event columns: one sort of the events by user, then time."""
    u, i, times = events.arrays()
    if not len(u):
        raise ValueError(f"data set {name!r} has no interactions")
    # Items that have text but no interactions still belong to the catalogue (cold start).
    for item_id in item_texts or {}:
        events.items.index.setdefault(item_id, len(events.items.index))
    t = np.arange(len(u), dtype=np.float64) if times is None else times
    order = np.lexsort((t, u))  # by user, then time; lexsort is stable
    u, i, t = u[order], i[order], t[order]
    bounds = np.flatnonzero(np.diff(u)) + 1
    item_ids = events.items.ids
    texts = item_texts or {}
    tags = item_tags or {}
    return Dataset(
        name=name,
        user_ids=events.users.ids,
        item_ids=item_ids,
        sequences=np.split(i, bounds),
        item_texts=[texts.get(x, "") for x in item_ids],
        item_tags=[tuple(tags.get(x, ())) for x in item_ids],
        timestamps=None if times is None else np.split(t, bounds),
        item_properties=[dict((item_properties or {}).get(x, {})) for x in item_ids],
        user_properties=[dict((user_properties or {}).get(x, {})) for x in events.users.ids],
        item_vectors={name: vector_table(by_item, item_ids) for name, by_item in (item_vectors or {}).items()
                      if by_item},
    )


def vector_table(by_item: dict[str, np.ndarray], item_ids: list[str]) -> np.ndarray:
    """(I, d) float32 rows in catalogue order; zeros for an item without the vector."""
    dims = {len(v) for v in by_item.values()}
    if len(dims) > 1:
        raise ValueError(f"one vector name must have one dimension; found {sorted(dims)}")
    table = np.zeros((len(item_ids), dims.pop() if dims else 0), np.float32)
    position = {item: n for n, item in enumerate(item_ids)}
    for item, vector in by_item.items():
        if item in position:
            table[position[item]] = vector
    return table


# Names an item file's id column commonly has; another (`movieId`, `sku`) is named explicitly.
ITEM_ID_COLUMNS = ("item", "item_id", "id")


def item_id_column(fieldnames: list[str], item_column: str | None, path: Path) -> str:
    """The column of an item file's header that holds the item ids."""
    found = ", ".join(fieldnames) or "none"
    if item_column is not None:
        if item_column not in fieldnames:
            raise ValueError(f"{path}: item file has no column {item_column!r} (--item-column); found: {found}")
        return item_column
    for name in ITEM_ID_COLUMNS:
        if name in fieldnames:
            return name
    raise ValueError(f"{path}: item file needs an id column ({', '.join(ITEM_ID_COLUMNS)}, or another named "
                     f"with --item-column) and a text column, text[,tags]; found: {found}")


def property_value(text: str) -> PropertyValue:
    """An item file cell as a property: a number where it reads as a finite one, else the string."""
    try:
        number = float(text)
    except ValueError:
        return text
    return number if np.isfinite(number) else text


@dataclass
class ItemFile:
    texts: dict[str, str] = field(default_factory=dict)
    tags: dict[str, tuple[str, ...]] = field(default_factory=dict)
    properties: dict[str, dict[str, PropertyValue]] = field(default_factory=dict)
    vectors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # name -> item -> vector


def _item_rows(path: Path) -> tuple[list[str], list[dict[str, object]]]:
    """An item file's column names and rows: CSV with a header, or Parquet."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return list(table.column_names), table.to_pylist()
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows: list[dict[str, object]] = list(reader)
        return list(reader.fieldnames or []), rows


def _tag_list(cell: object) -> tuple[str, ...]:
    if isinstance(cell, list | tuple):
        return tuple(str(t) for t in cell if t)
    return tuple(t for t in str(cell or "").split("|") if t)


def read_item_file(path: Path, item_column: str | None = None) -> ItemFile:
    """Read an item file: CSV with a header, or Parquet (by the `.parquet` suffix), naming the
    id column (`item`, `item_id`, `id`, or `item_column`), `text`, optionally `tags` (separated
    by `|`, or a list in Parquet); `vector:NAME` columns hold named item vectors (see
    `recdata.vectors`); every other column is a property (a number where the cell reads as
    one, else a string; empty cells are left out)."""
    found = ItemFile()
    texts, tags, properties = found.texts, found.tags, found.properties
    fieldnames, rows = _item_rows(path)
    id_column = item_id_column(fieldnames, item_column, path)
    if "text" not in fieldnames:
        raise ValueError(f"{path}: item file needs a text column (text[,tags]) beside {id_column!r}; "
                         f"found: {', '.join(fieldnames)}")
    try:
        vector_columns = {c: name for c in fieldnames if (name := vector_column(c)) is not None}
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    others = [c for c in fieldnames if c not in (id_column, "text", "tags") and c not in vector_columns]
    found.vectors = {name: {} for name in vector_columns.values()}
    for line, row in enumerate(rows, start=2):
        item = str(row[id_column])
        texts[item] = str(row["text"] or "")
        if row.get("tags"):
            tags[item] = _tag_list(row["tags"])
        values = {c: property_value(str(row[c])) for c in others if row.get(c) not in (None, "")}
        if values:
            properties[item] = values
        for column, name in vector_columns.items():
            vector = parse_vector(row.get(column), f"{path}:{line} {column}")  # type: ignore[arg-type]
            if vector is not None:
                found.vectors[name][item] = vector
    for name, by_item in found.vectors.items():
        dims = sorted({len(v) for v in by_item.values()})
        if len(dims) > 1:
            raise ValueError(f"{path}: column {COLUMN_PREFIX + name!r} holds vectors of {dims} numbers; "
                             f"one size a column")
    return found


def read_interactions(
    path: Path, fmt: InteractionFormat = "pairs", items_path: Path | None = None, item_column: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Read interactions in one of the common formats.

    - `pairs`: whitespace `user item` one pair a line, already in time order per user.
    - `csv` / `parquet`: columns `user,item[,timestamp]`; other columns are ignored.

    `progress(done, total)` follows the interactions file (see `recdata.reader`).
    """
    from recdata.reader import read_event_columns

    items = read_item_file(items_path, item_column) if items_path else ItemFile()
    return from_columns(path.stem, read_event_columns(path, fmt, progress), items.texts, items.tags,
                        items.properties, item_vectors=items.vectors)
