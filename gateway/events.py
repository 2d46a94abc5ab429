"""The feedback event log and the per-user history it gives, in SQLite (WAL mode), and the
log of live catalogue changes.

One table serves both: an event is durable once its transaction commits, and the next
history read of the same user sees it. SQLite in WAL mode lets reads run beside a write.
Catalogue changes (upserts and deletes) are kept in order so that a newly loaded model
version can be brought to the live catalogue before it serves.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from recdata.attributes import ItemAttributes
from recdata.feedback import EVERY_TYPE_POSITIVE, HIDE, EventTypes

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    value REAL NOT NULL DEFAULT 0,
    timestamp_ms INTEGER NOT NULL,
    event_id TEXT  -- the client's idempotency key; NULL = none
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, timestamp_ms, seq);
CREATE TABLE IF NOT EXISTS settings (  -- small durable state beside the log (the feedback loop's marks)
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS item_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('upsert', 'delete')),
    item_id TEXT NOT NULL,
    text TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]'  -- JSON list
);
CREATE TABLE IF NOT EXISTS exposures (  -- what each answer showed, off the request path (gateway.exposures)
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    position INTEGER NOT NULL,  -- 0 = first in the answer
    score REAL NOT NULL,
    model_version TEXT NOT NULL,
    variant TEXT NOT NULL DEFAULT '',
    timestamp_ms INTEGER NOT NULL,
    ranked_position INTEGER NOT NULL DEFAULT -1  -- where the ranking put it, before exploration; -1 = position
);
CREATE INDEX IF NOT EXISTS exposures_by_request ON exposures (request_id, item_id);
CREATE TABLE IF NOT EXISTS users (  -- what users said about themselves (UpsertUsers)
    user_id TEXT PRIMARY KEY,
    properties TEXT NOT NULL DEFAULT '{}',  -- JSON object
    text TEXT NOT NULL DEFAULT ''
);
-- A user's hidden items, read at every Recommend: a small partial index, not a scan of their events.
CREATE INDEX IF NOT EXISTS events_hidden ON events (user_id, item_id) WHERE event_type = 'hide';
"""
# After the column exists (added by migration in logs written before it).
EVENT_ID_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS events_by_id ON events (event_id) WHERE event_id IS NOT NULL"
# PRAGMA user_version of a log: 1 before events had idempotency keys, 2 with them, 3 with item
# attributes in the catalogue changes and user attributes, 4 with exposures and the answer an
# event is attributed to, 5 with each exposure's place before exploration swapped it.
SCHEMA_VERSION = 5
MAX_HIDDEN = 10_000  # hidden items read per user: the most recent ones


@dataclass(frozen=True)
class ItemChange:
    op: str                       # "upsert" or "delete"
    item_id: str
    text: str = ""
    tags: tuple[str, ...] = ()
    properties: dict[str, float | str] = field(default_factory=dict)
    created_ms: int = 0
    vectors: dict[str, list[float]] = field(default_factory=dict)  # precomputed item vectors by name

    @property
    def attributes(self) -> ItemAttributes:
        return ItemAttributes(self.tags, self.properties, self.created_ms)

    def attributes_json(self) -> str:
        """What the change log keeps beside text and tags (vectors only where the item has some)."""
        kept: dict[str, object] = {"properties": self.properties, "created_ms": self.created_ms}
        if self.vectors:
            kept["vectors"] = self.vectors
        return json.dumps(kept)

    @classmethod
    def from_row(cls, op: str, item_id: str, text: str, tags: str, attributes: str) -> ItemChange:
        extra = json.loads(attributes or "{}")
        return cls(op, item_id, text, tuple(json.loads(tags)), extra.get("properties", {}),
                   int(extra.get("created_ms", 0)), extra.get("vectors", {}))


@dataclass(frozen=True)
class UserRecord:
    user_id: str
    properties: dict[str, float | str] = field(default_factory=dict)
    text: str = ""


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    event_type: str = "interaction"
    value: float = 0.0
    timestamp_ms: int = 0  # 0 = now
    event_id: str = ""     # idempotency key; "" = none
    request_id: str = ""   # the answer that showed the item; "" = none named


EXPOSURE_GROUPS = ("variant", "model_version")  # what online metrics compare answers by


def exposure_group_column(by: str) -> str:
    if by not in EXPOSURE_GROUPS:
        raise ValueError(f"answers are grouped by one of {', '.join(EXPOSURE_GROUPS)}; got {by!r}")
    return by


@dataclass(frozen=True)
class Exposure:
    """One item one answer showed."""

    request_id: str
    user_id: str
    item_id: str
    position: int
    score: float
    model_version: str
    variant: str = ""
    timestamp_ms: int = 0
    ranked_position: int = -1  # where the ranking put it when exploration moved it; -1 = `position`

    @property
    def ranked_at(self) -> int:
        return self.position if self.ranked_position < 0 else self.ranked_position


@dataclass(frozen=True)
class LoggedEvent:
    """An event as the log holds it: `seq` orders the whole log."""

    seq: int
    user_id: str
    item_id: str
    event_type: str
    timestamp_ms: int
    value: float = 0.0  # the event's value (a rating, a watch share); 0 = none


class EventStore(Protocol):
    """What the gateways, the controller and the feedback loop need of the event store:
    `EventLog` (SQLite, embedded) and `gateway.postgres_events.PostgresEventLog` implement it."""

    def append(self, events: Iterable[Event]) -> tuple[int, int]: ...
    def append_calls(self, calls: list[list[Event]]) -> list[tuple[int, int]]: ...
    def recent_items(self, user_id: str, limit: int, types: EventTypes = EVERY_TYPE_POSITIVE) -> list[str]: ...
    def hidden_items(self, user_id: str, types: EventTypes = EVERY_TYPE_POSITIVE) -> list[str]: ...
    def upsert_users(self, users: Iterable[UserRecord]) -> int: ...
    def user_properties(self, user_id: str) -> dict[str, float | str]: ...
    def record_exposures(self, exposures: list[Exposure]) -> int: ...
    def exposures_of(self, request_id: str) -> list[Exposure]: ...
    def attributed_events(self, request_id: str) -> list[tuple[str, str]]: ...
    def answer_sizes(self, by: str, k: int) -> list[tuple[str, str, int]]: ...
    def attributed_outcomes(self) -> list[tuple[str, int, str]]: ...
    def position_outcomes(self, click_types: tuple[str, ...], depth: int) -> list[tuple[int, int, int, int]]: ...
    def shown_positions(self, after_seq: int, through_seq: int) -> dict[int, int]: ...
    def erase_user(self, user_id: str) -> int: ...
    def record_item_changes(self, changes: Iterable[ItemChange]) -> None: ...
    def item_changes(self) -> list[ItemChange]: ...
    def last_seq(self) -> int: ...
    def events_between(self, after_seq: int, through_seq: int) -> list[LoggedEvent]: ...
    def setting(self, key: str) -> str | None: ...
    def set_setting(self, key: str, value: str) -> None: ...
    def count(self) -> int: ...
    def close(self) -> None: ...

    # True where a read is a local file read (SQLite): the gateway does it on its event loop.
    reads_locally: bool


def is_postgres_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def open_event_store(location: str | Path) -> EventStore:
    """A `postgresql://` URL opens the store on that server; anything else is a SQLite file."""
    if isinstance(location, str) and is_postgres_url(location):
        from gateway.postgres_events import PostgresEventLog  # psycopg loads only for a server store

        return PostgresEventLog(location)
    return EventLog(Path(location))


async def read_recent(store: EventStore, user_id: str, limit: int, executor: Executor | None = None) -> list[str]:
    """`store.recent_items` as a gateway reads it: a local file read on the event loop (tens
    of microseconds, never behind a write), a database server's round trip on `executor`."""
    if store.reads_locally:
        return store.recent_items(user_id, limit)
    return await asyncio.get_running_loop().run_in_executor(executor, store.recent_items, user_id, limit)


@dataclass(frozen=True)
class UserView:
    history: list[str]  # oldest first, hides left out
    hidden: list[str]   # items the user hid: never in their answers
    properties: dict[str, float | str] = field(default_factory=dict)  # read only for users without history


def _user_view(store: EventStore, user_id: str, limit: int, types: EventTypes) -> UserView:
    history = store.recent_items(user_id, limit, types)
    return UserView(history, store.hidden_items(user_id, types), {} if history else store.user_properties(user_id))


async def read_user(store: EventStore, user_id: str, limit: int, executor: Executor | None = None,
                    types: EventTypes = EVERY_TYPE_POSITIVE) -> UserView:
    """What a request reads of its user, as `read_recent` reads: both parts in one executor
    call on a database server."""
    if store.reads_locally:
        return _user_view(store, user_id, limit, types)
    return await asyncio.get_running_loop().run_in_executor(executor, _user_view, store, user_id, limit, types)


def store_settings(db: str | None) -> dict[str, Any]:
    """A `--db` option as config fields: `db_url` for a server URL, `db_path` for a file (and
    no URL: the option wins over a config file's store)."""
    if db is None:
        return {}
    return {"db_url": db} if is_postgres_url(db) else {"db_path": Path(db), "db_url": ""}


class StoreUnavailable(ConnectionError):
    """The event store's server cannot be reached now; nothing of the call was written."""


class EventLog:
    """Append-only interaction events with per-user recent-history reads."""

    reads_locally = True

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        # Writes (and the rarer reads below) share one connection, serialised by the lock;
        # history reads have their own (`_reader`).
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # acknowledged means on disk
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(events)")}
        if "event_id" not in columns:  # a log written before events had ids (version 1)
            self._db.execute("ALTER TABLE events ADD COLUMN event_id TEXT")
        if "request_id" not in columns:  # a log written before events named their answer (version 3)
            self._db.execute("ALTER TABLE events ADD COLUMN request_id TEXT")
        if "ranked_position" not in {row[1] for row in self._db.execute("PRAGMA table_info(exposures)")}:
            self._db.execute("ALTER TABLE exposures ADD COLUMN ranked_position INTEGER NOT NULL DEFAULT -1")
        if "attributes" not in {row[1] for row in self._db.execute("PRAGMA table_info(item_changes)")}:
            self._db.execute("ALTER TABLE item_changes ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}'")
        self._db.execute(EVENT_ID_INDEX)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        # History reads have a connection of their own: in WAL mode a read never waits for a
        # write's commit (and its fsync), so the gateway reads on its event loop, not a thread.
        self._reader = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._read_lock = threading.Lock()

    def append(self, events: Iterable[Event]) -> tuple[int, int]:
        """Write events in one transaction; returns (acknowledged, duplicates) once durable.

        An event whose id is already logged (by an earlier call, or earlier in this one) is
        acknowledged but not written again: retrying a call is safe.
        """
        return self.append_calls([list(events)])[0]

    def append_calls(self, calls: list[list[Event]]) -> list[tuple[int, int]]:
        """Several calls' events in one transaction, one commit for all: each call's own
        (acknowledged, duplicates), as `append` would give them one call after another."""
        now = int(time.time() * 1000)
        counts = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for events in calls:
                    rows = [(e.user_id, e.item_id, e.event_type, e.value, e.timestamp_ms or now, e.event_id or None,
                             e.request_id or None) for e in events]
                    before = self._db.total_changes
                    self._db.executemany(
                        "INSERT OR IGNORE INTO events (user_id, item_id, event_type, value, timestamp_ms, event_id, "
                        "request_id) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                    counts.append((len(rows), len(rows) - (self._db.total_changes - before)))
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise
        return counts

    def recent_items(self, user_id: str, limit: int, types: EventTypes = EVERY_TYPE_POSITIVE) -> list[str]:
        """The user's last `limit` history items, oldest first: every event acknowledged so
        far of a type `types` counts as history."""
        history, params = types.history_filter("?")
        with self._read_lock:
            rows = self._reader.execute(
                f"SELECT item_id FROM events WHERE user_id = ? AND {history} "
                f"ORDER BY timestamp_ms DESC, seq DESC LIMIT ?", (user_id, *params, limit),
            ).fetchall()
        return [r[0] for r in reversed(rows)]

    def hidden_items(self, user_id: str, types: EventTypes = EVERY_TYPE_POSITIVE) -> list[str]:
        """Items kept out of the user's answers, up to MAX_HIDDEN: those they hid, and those of
        an event type `types` weighs below zero (a dislike)."""
        with self._read_lock:  # the type as a literal: the partial index matches it only so
            rows = self._reader.execute(f"SELECT DISTINCT item_id FROM events WHERE user_id = ? AND "
                                        f"event_type = '{HIDE}' LIMIT ?", (user_id, MAX_HIDDEN)).fetchall()
            negative = types.keeps_out_filter("?")
            if negative is not None:
                clause, params = negative
                rows += self._reader.execute(f"SELECT DISTINCT item_id FROM events WHERE user_id = ? AND {clause} "
                                             f"LIMIT ?", (user_id, *params, MAX_HIDDEN)).fetchall()
        return list(dict.fromkeys(r[0] for r in rows))[:MAX_HIDDEN]

    def upsert_users(self, users: Iterable[UserRecord]) -> int:
        """Add or replace users' attributes in one durable transaction; how many."""
        rows = [(u.user_id, json.dumps(u.properties), u.text) for u in users]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO users (user_id, properties, text) VALUES (?, ?, ?) ON CONFLICT "
                                     "(user_id) DO UPDATE SET properties = excluded.properties, text = excluded.text",
                                     rows)
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise
        return len(rows)

    def record_exposures(self, exposures: list[Exposure]) -> int:
        """Append exposures in one transaction; how many. Not fsynced one by one: they are
        written in batches off the request path, and the gateway counts what a crash loses."""
        now = int(time.time() * 1000)
        rows = [(x.request_id, x.user_id, x.item_id, x.position, x.score, x.model_version, x.variant,
                 x.timestamp_ms or now, x.ranked_position) for x in exposures]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO exposures (request_id, user_id, item_id, position, score, "
                                     "model_version, variant, timestamp_ms, ranked_position) "
                                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise
        return len(rows)

    def exposures_of(self, request_id: str) -> list[Exposure]:
        """What one answer showed, in answer order."""
        with self._lock:
            rows = self._db.execute("SELECT request_id, user_id, item_id, position, score, model_version, variant, "
                                    "timestamp_ms, ranked_position FROM exposures WHERE request_id = ? "
                                    "ORDER BY position",
                                    (request_id,)).fetchall()
        return [Exposure(*row) for row in rows]

    def attributed_events(self, request_id: str) -> list[tuple[str, str]]:
        """(item id, event type) of the events that named this answer, in log order."""
        with self._lock:
            rows = self._db.execute("SELECT item_id, event_type FROM events WHERE request_id = ? ORDER BY seq",
                                    (request_id,)).fetchall()
        return [(item, kind) for item, kind in rows]

    def answer_sizes(self, by: str, k: int) -> list[tuple[str, str, int]]:
        """(request id, its `by` column (`variant` or `model_version`), items it showed in its
        first k places) of every logged answer."""
        column = exposure_group_column(by)
        with self._lock:
            rows = self._db.execute(f"SELECT request_id, MIN({column}), SUM(position < ?) FROM exposures "
                                    "GROUP BY request_id", (k,)).fetchall()
        return [(request, group, int(shown)) for request, group, shown in rows]

    def attributed_outcomes(self) -> list[tuple[str, int, str]]:
        """(request id, position, event type) of every event on an item its answer showed."""
        with self._lock:
            rows = self._db.execute("SELECT e.request_id, x.position, e.event_type FROM events e JOIN exposures x "
                                    "ON x.request_id = e.request_id AND x.item_id = e.item_id "
                                    "WHERE e.request_id IS NOT NULL").fetchall()
        return [(request, int(position), kind) for request, position, kind in rows]

    def position_outcomes(self, click_types: tuple[str, ...], depth: int) -> list[tuple[int, int, int, int]]:
        """(shown place, ranked place, exposures, clicked ones) over the first `depth` places of
        every logged answer: what `gateway.propensity` estimates the click propensity from."""
        marks = ", ".join("?" * len(click_types))
        with self._lock:
            rows = self._db.execute(
                f"SELECT x.position, CASE WHEN x.ranked_position < 0 THEN x.position ELSE x.ranked_position END, "
                f"COUNT(*), COUNT(c.item_id) FROM exposures x LEFT JOIN (SELECT DISTINCT request_id, item_id "
                f"FROM events WHERE request_id IS NOT NULL AND event_type IN ({marks})) c "
                f"ON c.request_id = x.request_id AND c.item_id = x.item_id WHERE x.position < ? GROUP BY 1, 2",
                (*click_types, depth)).fetchall()
        return [(int(a), int(b), int(n), int(c)) for a, b, n, c in rows]

    def shown_positions(self, after_seq: int, through_seq: int) -> dict[int, int]:
        """seq -> the place its answer showed the item at, for the events in (after_seq,
        through_seq] that name an answer which showed it."""
        with self._lock:
            rows = self._db.execute(
                "SELECT e.seq, MIN(x.position) FROM events e JOIN exposures x ON x.request_id = e.request_id "
                "AND x.item_id = e.item_id WHERE e.seq > ? AND e.seq <= ? AND e.request_id IS NOT NULL "
                "GROUP BY e.seq", (after_seq, through_seq)).fetchall()
        return {int(seq): int(position) for seq, position in rows}

    def user_properties(self, user_id: str) -> dict[str, float | str]:
        with self._read_lock:
            row = self._reader.execute("SELECT properties FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return {} if row is None else dict(json.loads(row[0]))

    def erase_user(self, user_id: str) -> int:
        """Delete every event of the user and their attributes, durably; how many events there
        were (0 the second time). Their idempotency keys go too: an old call sent again after
        this is logged anew."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
                removed = self._db.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise
        return int(removed)

    def record_item_changes(self, changes: Iterable[ItemChange]) -> None:
        """Append catalogue changes in one durable transaction."""
        rows = [(c.op, c.item_id, c.text, json.dumps(list(c.tags)), c.attributes_json()) for c in changes]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO item_changes (op, item_id, text, tags, attributes) "
                                     "VALUES (?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise

    def item_changes(self) -> list[ItemChange]:
        """Every recorded catalogue change, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT op, item_id, text, tags, attributes FROM item_changes ORDER BY seq"
                                    ).fetchall()
        return [ItemChange.from_row(*row) for row in rows]

    def last_seq(self) -> int:
        """The sequence number of the newest event; 0 for an empty log."""
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

    def events_between(self, after_seq: int, through_seq: int) -> list[LoggedEvent]:
        """Events with after_seq < seq <= through_seq, in log order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, user_id, item_id, event_type, timestamp_ms, value FROM events "
                "WHERE seq > ? AND seq <= ? ORDER BY seq", (after_seq, through_seq)).fetchall()
        return [LoggedEvent(*row) for row in rows]

    def setting(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                             "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()
