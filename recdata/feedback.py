"""The data set the feedback loop trains on: the base data set plus the events logged since.

Each event adds its item to the end of its user's sequence (a new user gets a new one), so
the per-user time split keeps the newest events out of training: the last one of every
user with feedback is a held-out recent event the loop judges a new model version on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import numpy as np

from recdata.dataset import Dataset
from recdata.split import Split


class LoggedEvent(Protocol):
    """An event as the gateway's log holds it (`gateway.events.LoggedEvent`)."""

    @property
    def seq(self) -> int: ...
    @property
    def user_id(self) -> str: ...
    @property
    def item_id(self) -> str: ...
    @property
    def event_type(self) -> str: ...
    @property
    def timestamp_ms(self) -> int: ...


@dataclass(frozen=True)
class FeedbackStats:
    events: int             # events read from the log
    used: int               # events added to sequences
    unknown_items: int      # events on items the catalogue does not have (skipped)
    skipped_types: int      # events of a type the loop does not learn from (skipped)
    users: int              # users with at least one added event
    new_users: int          # of those, users the base data set does not have
    first_seq: int          # the range of the log read, first and last sequence number
    last_seq: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WithFeedback:
    dataset: Dataset
    stats: FeedbackStats
    added: np.ndarray       # (num_users,) events added to each user's sequence


def align_to_catalogue(dataset: Dataset, item_ids: Sequence[str]) -> Dataset:
    """`dataset` re-indexed to a model's catalogue order (a bundle's `item_ids`), so that
    the data set read from a file lines up with the model trained on it.

    Interactions with items the catalogue lacks are dropped; catalogue items the data set
    lacks get no text."""
    if list(dataset.item_ids) == list(item_ids):
        return dataset
    position = {item: n for n, item in enumerate(item_ids)}
    new_index = np.array([position.get(item, -1) for item in dataset.item_ids], dtype=np.int64)
    texts = dict(zip(dataset.item_ids, dataset.item_texts, strict=True))
    tags = dict(zip(dataset.item_ids, dataset.item_tags, strict=True))
    properties = dict(zip(dataset.item_ids, dataset.item_properties, strict=True))
    sequences, timestamps = [], []
    for u, seq in enumerate(dataset.sequences):
        mapped = new_index[seq]
        keep = mapped >= 0
        sequences.append(mapped[keep])
        if dataset.timestamps is not None:
            timestamps.append(dataset.timestamps[u][keep])
    vectors = {name: np.zeros((len(item_ids), table.shape[1]), np.float32) for name, table in
               dataset.item_vectors.items()}
    placed = new_index >= 0
    for name, table in dataset.item_vectors.items():
        vectors[name][new_index[placed]] = table[placed]
    return Dataset(dataset.name, list(dataset.user_ids), list(item_ids), sequences,
                   [texts.get(item, "") for item in item_ids], [tags.get(item, ()) for item in item_ids],
                   timestamps if dataset.timestamps is not None else None,
                   [dict(properties.get(item, {})) for item in item_ids], list(dataset.user_properties), vectors)


HIDE = "hide"  # an event type that keeps the item out of its user's answers for good; no interaction


def with_feedback(base: Dataset, events: Iterable[LoggedEvent], event_types: frozenset[str] | None = None
                  ) -> WithFeedback:
    """`base` with `events` appended to their users' sequences, in log order.

    `event_types`: the types to learn from; None = every type, as the served history reads
    them; hides are never learnt from. Event times (milliseconds) become seconds, the unit the data set readers keep."""
    item_index = {item: n for n, item in enumerate(base.item_ids)}
    user_index = {user: n for n, user in enumerate(base.user_ids)}
    user_ids = list(base.user_ids)
    extra_items: list[list[int]] = [[] for _ in user_ids]
    extra_times: list[list[float]] = [[] for _ in user_ids]
    read = unknown = skipped = 0
    first_seq = last_seq = 0
    for event in events:
        read += 1
        first_seq = first_seq or event.seq
        last_seq = event.seq
        if event.event_type == HIDE or (event_types is not None and event.event_type not in event_types):
            skipped += 1
            continue
        item = item_index.get(event.item_id)
        if item is None:
            unknown += 1
            continue
        user = user_index.get(event.user_id)
        if user is None:
            user = user_index[event.user_id] = len(user_ids)
            user_ids.append(event.user_id)
            extra_items.append([])
            extra_times.append([])
        extra_items[user].append(item)
        extra_times[user].append(event.timestamp_ms / 1000.0)
    empty = np.zeros(0, np.int64)
    base_sequences = list(base.sequences) + [empty] * (len(user_ids) - base.num_users)
    sequences = [np.concatenate([seq, np.asarray(extra, np.int64)]) if extra else seq
                 for seq, extra in zip(base_sequences, extra_items, strict=True)]
    timestamps = None
    if base.timestamps is not None:
        base_times = list(base.timestamps) + [np.zeros(0)] * (len(user_ids) - base.num_users)
        timestamps = [np.concatenate([t, np.asarray(extra)]) if extra else t
                      for t, extra in zip(base_times, extra_times, strict=True)]
    added = np.array([len(extra) for extra in extra_items], dtype=np.int64)
    stats = FeedbackStats(events=read, used=int(added.sum()), unknown_items=unknown, skipped_types=skipped,
                          users=int((added > 0).sum()), new_users=len(user_ids) - base.num_users,
                          first_seq=first_seq, last_seq=last_seq)
    # Users new in the log said nothing in the base data set; UpsertUsers attributes live in the store.
    user_properties = list(base.user_properties) + [{} for _ in range(len(user_ids) - base.num_users)]
    dataset = replace(base, user_ids=user_ids, sequences=sequences, timestamps=timestamps,
                      user_properties=user_properties)
    return WithFeedback(dataset, stats, added)


def recent_positions(split: Split, added: np.ndarray) -> np.ndarray:
    """Positions (into `split.users`) of the evaluated users whose test target is a logged
    event: the held-out recent events."""
    return np.flatnonzero(added[split.users] >= 1)
