"""The event store's contract, run against the embedded SQLite log and a real PostgreSQL server.

PostgreSQL tests need `RECFUNNEL_TEST_PG` (e.g. postgresql://postgres@127.0.0.1/test); each
test works in a schema of its own and drops it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.events import (
    SCHEMA_VERSION,
    Event,
    EventLog,
    EventStore,
    ItemChange,
    StoreUnavailable,
    open_event_store,
)
from tests.conftest import needs_pg


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_pg)])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "events.sqlite")
    return str(request.getfixturevalue("pg_schema"))


@pytest.fixture
def store(location: str) -> Iterator[EventStore]:
    opened = open_event_store(location)
    yield opened
    opened.close()


def test_history_is_durable_and_in_order(location: str) -> None:
    store = open_event_store(location)
    store.append([Event("u", "a", timestamp_ms=1), Event("u", "b", timestamp_ms=3), Event("v", "c", timestamp_ms=2)])
    store.append([Event("u", "c")])  # now: newer than anything before
    assert store.recent_items("u", 10) == ["a", "b", "c"] and store.recent_items("u", 2) == ["b", "c"]
    store.close()
    reopened = open_event_store(location)
    assert reopened.count() == 4 and reopened.recent_items("v", 5) == ["c"] and reopened.recent_items("w", 5) == []
    reopened.close()


def test_an_event_id_is_written_once_however_often_it_is_sent(store: EventStore) -> None:
    first = [Event("u", "a", event_id="e1"), Event("u", "b", event_id="e2"), Event("u", "c")]
    assert store.append(first) == (3, 0)
    assert store.append(first) == (3, 2)  # the keyed events are there already; the unkeyed one is new
    assert store.append([Event("u", "d", event_id="e3"), Event("u", "d", event_id="e3")]) == (2, 1)
    assert store.count() == 5
    assert store.recent_items("u", 10) == ["a", "b", "c", "c", "d"]


def test_events_since_a_mark_come_in_log_order(store: EventStore) -> None:
    assert store.last_seq() == 0 and store.events_between(0, 10) == []
    store.append([Event("u", f"i{n}", "click", timestamp_ms=100 - n) for n in range(5)])
    mark = store.last_seq()
    store.append([Event("v", "j", "view", timestamp_ms=7)])
    later = store.events_between(mark, store.last_seq())
    assert [(e.user_id, e.item_id, e.event_type, e.timestamp_ms) for e in later] == [("v", "j", "view", 7)]
    everything = store.events_between(0, store.last_seq())
    assert [e.item_id for e in everything] == ["i0", "i1", "i2", "i3", "i4", "j"]
    assert [e.seq for e in everything] == sorted(e.seq for e in everything)


def test_erasing_a_user_removes_their_events_and_only_theirs_for_good(location: str) -> None:
    store = open_event_store(location)
    store.append([Event("gone", "a", event_id="g1"), Event("kept", "b"), Event("gone", "c"), Event("kept", "d")])
    mark = store.last_seq()
    assert store.erase_user("gone") == 2
    assert store.erase_user("gone") == 0 and store.erase_user("never-seen") == 0  # idempotent
    assert store.recent_items("gone", 10) == [] and store.recent_items("kept", 10) == ["b", "d"]
    assert [e.user_id for e in store.events_between(0, mark)] == ["kept", "kept"]  # what the loop reads
    store.close()
    reopened = open_event_store(location)
    assert reopened.count() == 2 and reopened.recent_items("gone", 10) == []
    reopened.close()


def test_settings_and_catalogue_changes_persist(location: str) -> None:
    store = open_event_store(location)
    assert store.setting("loop.since_seq") is None
    store.set_setting("loop.since_seq", "3")
    store.set_setting("loop.since_seq", "4")  # overwritten, not added
    store.record_item_changes([ItemChange("upsert", "x", "a text", ("t1", "t2")), ItemChange("delete", "y")])
    store.record_item_changes([ItemChange("upsert", "y", "back")])
    store.close()
    reopened = open_event_store(location)
    assert reopened.setting("loop.since_seq") == "4"
    assert reopened.item_changes() == [ItemChange("upsert", "x", "a text", ("t1", "t2")), ItemChange("delete", "y"),
                                       ItemChange("upsert", "y", "back")]
    reopened.close()


def test_concurrent_appends_are_each_logged_once_with_increasing_seqs(store: EventStore) -> None:
    """Four writers at once, each event keyed and sent twice: every event is there once, and
    the log order (seq) agrees with each writer's own order."""
    def writer(w: int) -> None:
        for n in range(25):
            batch = [Event(f"u{w}", f"i{n}", event_id=f"{w}/{n}")]
            store.append(batch)
            store.append(batch)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logged = store.events_between(0, store.last_seq())
    assert store.count() == len(logged) == 100
    for w in range(4):
        assert [e.item_id for e in logged if e.user_id == f"u{w}"] == [f"i{n}" for n in range(25)]


def test_the_store_says_its_schema_version(store: EventStore) -> None:
    assert store.schema_version >= 1  # type: ignore[attr-defined]


def test_a_sqlite_log_of_the_first_schema_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, item_id TEXT NOT NULL,
                             event_type TEXT NOT NULL, value REAL NOT NULL DEFAULT 0, timestamp_ms INTEGER NOT NULL);
        INSERT INTO events (user_id, item_id, event_type, timestamp_ms) VALUES ('u', 'a', 'click', 1);
    """)
    old.close()
    log = EventLog(path)
    assert log.schema_version == SCHEMA_VERSION
    assert log.append([Event("u", "b", timestamp_ms=2, event_id="k")] * 2) == (2, 1)
    assert log.recent_items("u", 10) == ["a", "b"]


def test_a_sqlite_log_of_the_second_schema_keeps_its_item_changes(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE item_changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, item_id TEXT NOT NULL,
                                   text TEXT NOT NULL DEFAULT '', tags TEXT NOT NULL DEFAULT '[]');
        INSERT INTO item_changes (op, item_id, text, tags) VALUES ('upsert', 'a', 'old text', '["t"]');
    """)
    old.close()
    log = EventLog(path)
    assert log.item_changes() == [ItemChange("upsert", "a", "old text", ("t",))]
    log.close()


def test_hides_are_no_history_and_are_read_apart(store: EventStore) -> None:
    store.append([Event("u", "a", "click", timestamp_ms=1), Event("u", "b", "hide", timestamp_ms=2),
                  Event("u", "c", "click", timestamp_ms=3), Event("u", "b", "hide", timestamp_ms=4),
                  Event("v", "c", "hide", timestamp_ms=5)])
    assert store.recent_items("u", 10) == ["a", "c"]
    assert store.hidden_items("u") == ["b"] and store.hidden_items("v") == ["c"] and store.hidden_items("w") == []
    assert store.erase_user("u") == 4 and store.hidden_items("u") == []


def test_item_changes_keep_properties_and_times(store: EventStore) -> None:
    change = ItemChange("upsert", "a", "text", ("t",), {"price": 9.5, "brand": "x"}, 1234)
    store.record_item_changes([change, ItemChange("delete", "b")])
    assert store.item_changes() == [change, ItemChange("delete", "b")]
    assert store.item_changes()[0].attributes.properties == {"price": 9.5, "brand": "x"}


@needs_pg
def test_gateways_starting_together_migrate_the_database_once(pg_schema: str) -> None:
    import psycopg

    from gateway.postgres_events import MIGRATIONS, PostgresEventLog

    opened: list[PostgresEventLog] = []
    threads = [threading.Thread(target=lambda: opened.append(PostgresEventLog(pg_schema))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 3 and {s.schema_version for s in opened} == {len(MIGRATIONS)}
    with psycopg.connect(pg_schema) as db:
        assert db.execute("SELECT COUNT(*) FROM recfunnel_schema").fetchone() == (len(MIGRATIONS),)
    for s in opened:
        s.close()


def test_an_unreachable_server_is_named_without_its_password() -> None:
    from gateway.postgres_events import PostgresEventLog, redacted

    url = "postgresql://app:s3cret@127.0.0.1:1/events"
    assert redacted(url) == "postgresql://app:***@127.0.0.1:1/events"
    with pytest.raises(ConnectionError, match=r"app:\*\*\*@127\.0\.0\.1:1") as caught:
        PostgresEventLog(url, connect_timeout_s=1)
    assert "s3cret" not in str(caught.value)


def test_the_db_option_and_config_choose_the_store(tmp_path: Path) -> None:
    from cluster.config import ClusterConfig
    from gateway.events import store_settings

    url = "postgresql://app@db.internal/events"
    assert store_settings(url) == {"db_url": url}
    assert store_settings("e.sqlite") == {"db_path": Path("e.sqlite"), "db_url": ""}
    assert store_settings(None) == {}
    toml = tmp_path / "cluster.toml"
    toml.write_text(f'bundle = "b"\ndb_url = "{url}"\n', "utf-8")
    on_server = ClusterConfig.from_file(toml)
    assert on_server.store_location() == url and url not in repr(on_server)  # a URL may carry a password
    file_store = ClusterConfig.from_file(toml, **store_settings("e.sqlite"))
    assert file_store.store_location() == Path("e.sqlite")  # the command line wins over the file
    toml.write_text('bundle = "b"\n', "utf-8")
    with pytest.raises(ValueError, match="db_path or db_url"):
        ClusterConfig.from_file(toml)
    assert ClusterConfig.from_file(toml, **store_settings("e.sqlite")).store_location() == Path("e.sqlite")


def test_calls_written_in_one_transaction_keep_their_own_counts(store: EventStore) -> None:
    counts = store.append_calls([[Event("u", "a", event_id="k1"), Event("u", "b")],
                                 [Event("u", "a", event_id="k1")],         # the first call's id again
                                 [],
                                 [Event("v", "c", event_id="k2")] * 2])
    assert counts == [(2, 0), (1, 1), (0, 0), (2, 1)]
    assert store.count() == 3 and store.recent_items("u", 5) == ["a", "b"]


async def test_feedback_calls_that_meet_share_a_commit_and_each_hears_its_own_outcome(tmp_path: Path) -> None:
    import asyncio

    from gateway.group_commit import GroupCommit

    store = EventLog(tmp_path / "events.sqlite")
    commits: list[int] = []
    plain = store.append_calls

    def counted(calls: list[list[Event]]) -> list[tuple[int, int]]:
        commits.append(len(calls))
        if any(e.item_id == "poison" for events in calls for e in events):
            raise StoreUnavailable("the store went away mid-commit")
        return plain(calls)

    store.append_calls = counted  # type: ignore[method-assign]
    group = GroupCommit(store)
    outcomes = await asyncio.gather(*(group.append([Event(f"u{n}", "i", event_id=f"e{n % 50}")]) for n in range(100)))
    assert sorted(outcomes) == [(1, 0)] * 50 + [(1, 1)] * 50  # each call's own duplicates
    assert store.count() == 50 and len(commits) < 100  # fewer commits than calls
    with pytest.raises(StoreUnavailable):
        await group.append([Event("u", "poison")])
    assert (await group.append([Event("u", "after")])) == (1, 0)  # the writer goes on
    group.close()
    store.close()


def test_exposures_and_the_events_that_name_them(store: EventStore) -> None:
    from gateway.events import Exposure

    shown = [Exposure("r1", "u", f"i{n}", n, 1.0 - n / 10, "v1", "", 5) for n in range(3)]
    assert store.record_exposures(shown + [Exposure("r2", "w", "i9", 0, 0.5, "v1")]) == 4
    assert store.exposures_of("r1") == shown and [x.item_id for x in store.exposures_of("r2")] == ["i9"]
    store.append([Event("u", "i1", "click", request_id="r1"), Event("u", "i7", "click")])
    assert store.attributed_events("r1") == [("i1", "click")] and store.attributed_events("r9") == []
