"""The data set the feedback loop trains on: the base data set plus the events logged since.

Each event adds its item to the end of its user's sequence (a new user gets a new one), so
the per-user time split keeps the newest events out of training: the last one of every
user with feedback is a held-out recent event the loop judges a new model version on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
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
    @property
    def value(self) -> float: ...


@dataclass(frozen=True)
class FeedbackStats:
    events: int             # events read from the log
    used: int               # events added to sequences
    unknown_items: int      # events on items the catalogue does not have (skipped)
    skipped_types: int      # events of a type the loop does not learn from as history (skipped)
    dislikes: int           # of those, events of a negative type: learnt from as their user's negatives
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
    sequences, timestamps, weights = [], [], []
    for u, seq in enumerate(dataset.sequences):
        mapped = new_index[seq]
        keep = mapped >= 0
        sequences.append(mapped[keep])
        if dataset.timestamps is not None:
            timestamps.append(dataset.timestamps[u][keep])
        if dataset.weights is not None:
            weights.append(dataset.weights[u][keep])
    negatives = [mapped[mapped >= 0] for mapped in (new_index[n] for n in dataset.negatives)]
    vectors = {name: np.zeros((len(item_ids), table.shape[1]), np.float32) for name, table in
               dataset.item_vectors.items()}
    placed = new_index >= 0
    for name, table in dataset.item_vectors.items():
        vectors[name][new_index[placed]] = table[placed]
    return Dataset(dataset.name, list(dataset.user_ids), list(item_ids), sequences,
                   [texts.get(item, "") for item in item_ids], [tags.get(item, ()) for item in item_ids],
                   timestamps if dataset.timestamps is not None else None,
                   [dict(properties.get(item, {})) for item in item_ids], list(dataset.user_properties), vectors,
                   weights if dataset.weights is not None else None, negatives)


HIDE = "hide"  # an event type that keeps the item out of its user's answers for good; no interaction
MAX_EVENT_TYPES = 64  # configured types: each is a literal in the store's history and hidden-item reads


@dataclass(frozen=True)
class EventTypes:
    """What each event type means, from `[feedback]` in the cluster config: a weight per type
    (`purchase = 3.0`, `click = 1.0`, `dislike = -1.0`) and `default_weight` for the others.

    A positive weight makes an event history, and something to learn from; a negative one
    keeps its item out of that user's answers for good, as `hide` does, and is never history;
    a zero weight is logged and otherwise ignored. With nothing configured every type is
    positive, as before types had weights.
    """

    weights: dict[str, float] = field(default_factory=dict)
    default_weight: float = 1.0

    def __post_init__(self) -> None:
        if HIDE in self.weights:
            raise ValueError(f"event type {HIDE!r} has a fixed meaning (never again, not history); "
                             f"it takes no weight")
        if len(self.weights) > MAX_EVENT_TYPES:
            raise ValueError(f"{len(self.weights)} weighted event types; allowed 0..{MAX_EVENT_TYPES}")
        for name, weight in [*self.weights.items(), ("default_weight", self.default_weight)]:
            if not math.isfinite(weight):
                raise ValueError(f"event type weight {name}={weight} must be finite")
        for name in self.weights:
            if not 1 <= len(name.encode("utf-8")) <= 64 or "'" in name:
                raise ValueError(f"event type name {name[:70]!r} must be 1..64 bytes without quotes")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EventTypes:
        """`[feedback]`: `default_weight` and an `event_types` table of name = weight."""
        unknown = set(values) - {"event_types", "default_weight"}
        if unknown:
            raise ValueError(f"[feedback] has unknown settings {sorted(unknown)}; allowed: default_weight, "
                             f"event_types")
        return cls({str(k): float(v) for k, v in (values.get("event_types") or {}).items()},
                   float(values.get("default_weight", 1.0)))

    def weight(self, event_type: str) -> float:
        return 0.0 if event_type == HIDE else self.weights.get(event_type, self.default_weight)

    def is_history(self, event_type: str) -> bool:
        return self.weight(event_type) > 0

    def keeps_out(self, event_type: str) -> bool:
        """Whether an event of this type keeps its item out of its user's answers for good."""
        return event_type == HIDE or self.weight(event_type) < 0

    def history_filter(self, placeholder: str) -> tuple[str, list[str]]:
        """SQL over `event_type` selecting history events, and its parameters."""
        if self.default_weight > 0:  # every type but the configured non-positive ones (and hide)
            excluded = [HIDE, *sorted(t for t, w in self.weights.items() if w <= 0)]
            return f"event_type NOT IN ({', '.join([placeholder] * len(excluded))})", excluded
        included = sorted(t for t, w in self.weights.items() if w > 0)
        if not included:
            return "1 = 0", []  # no type is history
        return f"event_type IN ({', '.join([placeholder] * len(included))})", included

    def keeps_out_filter(self, placeholder: str) -> tuple[str, list[str]] | None:
        """SQL over `event_type` selecting the negative types' events (hide aside: the store
        reads those through their own index), and its parameters; None when there are none."""
        if self.default_weight < 0:
            kept = [HIDE, *sorted(t for t, w in self.weights.items() if w >= 0)]
            return f"event_type NOT IN ({', '.join([placeholder] * len(kept))})", kept
        negative = sorted(t for t, w in self.weights.items() if w < 0)
        if not negative:
            return None
        return f"event_type IN ({', '.join([placeholder] * len(negative))})", negative


EVERY_TYPE_POSITIVE = EventTypes()


def with_feedback(base: Dataset, events: Iterable[LoggedEvent], event_types: frozenset[str] | None = None,
                  types: EventTypes = EVERY_TYPE_POSITIVE, factors: dict[int, float] | None = None) -> WithFeedback:
    """`base` with `events` appended to their users' sequences, in log order.

    `event_types`: the types to learn from as history; None = every type the served history
    reads (the positive ones of `types`); hides and zero-weight types are never learnt from.
    With weights configured in `types`, each added event weighs its type's weight times its
    value (where it has one, > 0), and the base data set's interactions what they weighed
    (1 unless it says). An event of a negative type (a dislike) adds its item to its user's
    `negatives`. `factors` (seq -> factor, e.g. inverse propensities of the place an event was
    clicked at) multiply the weights of those events. Event times (milliseconds) become
    seconds, the unit the data set readers keep."""
    factors = factors or {}
    item_index = {item: n for n, item in enumerate(base.item_ids)}
    user_index = {user: n for n, user in enumerate(base.user_ids)}
    user_ids = list(base.user_ids)
    extra_items: list[list[int]] = [[] for _ in user_ids]
    extra_times: list[list[float]] = [[] for _ in user_ids]
    extra_weights: list[list[float]] = [[] for _ in user_ids]
    extra_negatives: list[list[int]] = [[] for _ in user_ids]
    disliked: dict[str, list[int]] = {}
    read = unknown = skipped = dislikes = 0
    first_seq = last_seq = 0

    def user_of(user_id: str) -> int:
        user = user_index.get(user_id)
        if user is None:
            user = user_index[user_id] = len(user_ids)
            user_ids.append(user_id)
            for extra in (extra_items, extra_times, extra_weights, extra_negatives):
                extra.append([])
        return user

    for event in events:
        read += 1
        first_seq = first_seq or event.seq
        last_seq = event.seq
        history = types.is_history(event.event_type) and (event_types is None or event.event_type in event_types)
        if not history:
            skipped += 1
            if types.weight(event.event_type) < 0 and (item := item_index.get(event.item_id)) is not None:
                dislikes += 1
                disliked.setdefault(event.user_id, []).append(item)
            continue
        item = item_index.get(event.item_id)
        if item is None:
            unknown += 1
            continue
        user = user_of(event.user_id)
        extra_items[user].append(item)
        extra_times[user].append(event.timestamp_ms / 1000.0)
        extra_weights[user].append(types.weight(event.event_type) * (event.value if event.value > 0 else 1.0)
                                   * factors.get(event.seq, 1.0))
    for user_id, items in disliked.items():  # a user known only by dislikes has nothing to train on
        if user_id in user_index:
            extra_negatives[user_index[user_id]].extend(items)
    empty = np.zeros(0, np.int64)
    base_sequences = list(base.sequences) + [empty] * (len(user_ids) - base.num_users)
    sequences = [np.concatenate([seq, np.asarray(extra, np.int64)]) if extra else seq
                 for seq, extra in zip(base_sequences, extra_items, strict=True)]
    timestamps = None
    if base.timestamps is not None:
        base_times = list(base.timestamps) + [np.zeros(0)] * (len(user_ids) - base.num_users)
        timestamps = [np.concatenate([t, np.asarray(extra)]) if extra else t
                      for t, extra in zip(base_times, extra_times, strict=True)]
    weights = None
    if types.weights or factors or base.weights is not None:  # else every event weighs 1
        base_weights = list(base.weights) if base.weights is not None else [np.ones(len(s)) for s in base.sequences]
        base_weights += [np.zeros(0)] * (len(user_ids) - base.num_users)
        weights = [np.concatenate([w, np.asarray(extra)]) if extra else w
                   for w, extra in zip(base_weights, extra_weights, strict=True)]
    base_negatives = list(base.negatives) + [np.zeros(0, np.int64)] * (len(user_ids) - base.num_users)
    negatives = [np.concatenate([n, np.asarray(extra, np.int64)]) if extra else n
                 for n, extra in zip(base_negatives, extra_negatives, strict=True)]
    added = np.array([len(extra) for extra in extra_items], dtype=np.int64)
    stats = FeedbackStats(events=read, used=int(added.sum()), unknown_items=unknown, skipped_types=skipped,
                          dislikes=dislikes, users=int((added > 0).sum()), new_users=len(user_ids) - base.num_users,
                          first_seq=first_seq, last_seq=last_seq)
    # Users new in the log said nothing in the base data set; UpsertUsers attributes live in the store.
    user_properties = list(base.user_properties) + [{} for _ in range(len(user_ids) - base.num_users)]
    dataset = replace(base, user_ids=user_ids, sequences=sequences, timestamps=timestamps,
                      user_properties=user_properties, weights=weights, negatives=negatives)
    return WithFeedback(dataset, stats, added)


def recent_positions(split: Split, added: np.ndarray) -> np.ndarray:
    """Positions (into `split.users`) of the evaluated users whose test target is a logged
    event: the held-out recent events."""
    return np.flatnonzero(added[split.users] >= 1)
