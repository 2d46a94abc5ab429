"""Feedback calls that arrive together share one durable commit.

Each commit waits for the disk (SQLite's fsync, PostgreSQL's WAL flush), a few milliseconds
here, and commits on one store are serial (the SQLite write lock; the PostgreSQL store's
append lock, which keeps sequence numbers in commit order). One commit per call would cap
single-event Feedback at one call per flush. A writer thread instead takes every call that
queued while the last commit ran and writes them in one transaction, each call with its own
statement and counts, then answers them all: the same durability, one flush for many.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

from gateway.events import Event, EventStore

MAX_CALLS_PER_COMMIT = 256


class GroupCommit:
    def __init__(self, store: EventStore, max_calls: int = MAX_CALLS_PER_COMMIT):
        self.store = store
        self.max_calls = max_calls
        self._pending: queue.SimpleQueue[tuple[list[Event], asyncio.AbstractEventLoop, asyncio.Future[Any]] | None]
        self._pending = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="group-commit", daemon=True)
        self._writer.start()

    async def append(self, events: list[Event]) -> tuple[int, int]:
        """(acknowledged, duplicates) of `events`, once their commit is durable; raises what
        the commit raised (StoreUnavailable: nothing of the call was written)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[int, int]] = loop.create_future()
        self._pending.put((events, loop, done))
        return await done

    def _write(self) -> None:
        while True:
            first = self._pending.get()
            if first is None:
                return
            calls = [first]
            closing = False
            while len(calls) < self.max_calls:
                try:
                    more = self._pending.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                calls.append(more)
            try:
                outcomes: list[Any] = list(self.store.append_calls([events for events, _, _ in calls]))
            except Exception as error:  # noqa: BLE001 - every call of the commit hears of it
                outcomes = [error] * len(calls)
            for (_, loop, done), outcome in zip(calls, outcomes, strict=True):
                loop.call_soon_threadsafe(_settle, done, outcome)
            if closing:
                return

    def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        self._pending.put(None)
        self._writer.join(timeout=30)


def _settle(done: asyncio.Future[Any], outcome: Any) -> None:
    if done.done():  # the caller went away (cancelled); its events are committed all the same
        return
    if isinstance(outcome, BaseException):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)
