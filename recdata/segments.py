"""Segment popularity: what users who share an attribute (an age band, a gender, an occupation)
interact with, for users who have no history yet but said something about themselves.

A segment is one attribute value (`gender=F`); numbers fall into the bands the training users'
quantiles cut (`age=25..35`). Per segment the bundle keeps each item's interaction count; a new
user's item score is the global log-popularity plus the mean, over their segments, of the
segment's log-lift (smoothed toward global popularity), so a segment with few users moves the
list little. Memory is segments x items counts; a request reads one column per segment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from recdata.attributes import PropertyValue

BANDS = 5               # quantile bands of a numeric attribute
MIN_SEGMENT_USERS = 20  # fewer users than this make no segment
MAX_STRING_VALUES = 200 # a string attribute with more distinct values (a zip code) is not segmented
SMOOTHING = 50.0        # pseudo-interactions pulling a segment toward global popularity


@dataclass(frozen=True)
class SegmentRule:
    """How attribute values become segment names: band edges per numeric attribute, and which
    string attributes count."""

    edges: dict[str, list[float]]
    strings: tuple[str, ...]

    def segments_of(self, properties: Mapping[str, PropertyValue]) -> list[str]:
        names = []
        for name, value in sorted(properties.items()):
            if isinstance(value, str):
                if name in self.strings:
                    names.append(f"{name}={value}")
            elif name in self.edges:
                names.append(f"{name}={band_name(self.edges[name], float(value))}")
        return names

    def to_json(self) -> dict[str, object]:
        return {"edges": self.edges, "strings": list(self.strings)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> SegmentRule:
        edges = data.get("edges") or {}
        assert isinstance(edges, Mapping)
        return cls({str(k): [float(x) for x in v] for k, v in edges.items()},
                   tuple(data.get("strings") or ()))  # type: ignore[arg-type]


def band_name(edges: Sequence[float], value: float) -> str:
    """The band of `value` between quantile `edges`, named by its bounds."""
    n = int(np.searchsorted(edges, value, side="right"))
    low = "" if n == 0 else f"{edges[n - 1]:g}"
    high = "" if n == len(edges) else f"{edges[n]:g}"
    return f"{low}..{high}"


def segment_rule(user_properties: Sequence[Mapping[str, PropertyValue]]) -> SegmentRule:
    numbers: dict[str, list[float]] = {}
    strings: dict[str, set[str]] = {}
    for properties in user_properties:
        for name, value in properties.items():
            if isinstance(value, str):
                strings.setdefault(name, set()).add(value)
            else:
                numbers.setdefault(name, []).append(float(value))
    edges = {name: sorted(set(np.quantile(values, np.linspace(0, 1, BANDS + 1)[1:-1]).round(6).tolist()))
             for name, values in numbers.items()}
    return SegmentRule(edges, tuple(sorted(n for n, v in strings.items() if len(v) <= MAX_STRING_VALUES)))


@dataclass(frozen=True)
class SegmentCounts:
    """(S, I) interaction counts per segment; `names[s]` is row s."""

    rule: SegmentRule
    names: list[str]
    counts: np.ndarray

    @classmethod
    def build(cls, sequences: Sequence[np.ndarray], user_properties: Sequence[Mapping[str, PropertyValue]],
              num_items: int) -> SegmentCounts:
        """Counts over the users' sequences (those with properties), segments of enough users."""
        rule = segment_rule([p for p in user_properties if p])
        members: dict[str, list[int]] = {}
        for user, properties in enumerate(user_properties):
            for name in rule.segments_of(properties):
                members.setdefault(name, []).append(user)
        names = sorted(n for n, users in members.items() if len(users) >= MIN_SEGMENT_USERS)
        counts = np.zeros((len(names), num_items), dtype=np.float32)
        for row, name in enumerate(names):
            items = [sequences[u] for u in members[name]]
            if items:
                counts[row] = np.bincount(np.concatenate(items).astype(np.int64), minlength=num_items)[:num_items]
        return cls(rule, names, counts)


def segment_scores(counts: np.ndarray, popularity: np.ndarray, totals: np.ndarray, popularity_total: float,
                   num_items: int) -> np.ndarray:
    """(n,) scores of n items for a user in the segments whose (S, n) `counts` are given (S may
    be 0): log global popularity plus the segments' mean smoothed log-lift. `totals` (S,) and
    `popularity_total` are over the whole catalogue of `num_items`, so that scores of items
    held by different shards compare."""
    share = (popularity + 1.0) / (popularity_total + num_items)
    scores = np.log(share)
    if len(counts):
        lift = np.log((counts + SMOOTHING * share) / (totals[:, None] + SMOOTHING)) - np.log(share)
        scores = scores + lift.mean(0)
    return scores.astype(np.float32)


def cold_user_report(sequences: Sequence[np.ndarray], user_properties: Sequence[Mapping[str, PropertyValue]],
                     num_items: int, folds: int = 5, seed: int = 0, k: int = 10) -> dict[str, object]:
    """Users held out whole, served from their attributes alone: HR@k and NDCG@k of each user's
    last item, and precision@k over everything the user took (a list shown at sign-up is good
    when it holds what they go on to take, whenever they take it), against global popularity
    on the same split. The users with attributes fall into `folds` seeded folds; each fold is
    scored from counts over every other user, so every user is held out once."""
    rng = np.random.default_rng(seed)
    with_properties = np.flatnonzero([bool(p) for p in user_properties])
    fold_of = np.full(len(sequences), -1)
    fold_of[rng.permutation(with_properties)] = np.arange(len(with_properties)) % folds
    hits: dict[str, list[float]] = {"attributes": [], "popularity": []}
    gains: dict[str, list[float]] = {"attributes": [], "popularity": []}
    precision: dict[str, list[float]] = {"attributes": [], "popularity": []}
    segments = 0
    for fold in range(folds):
        kept = np.flatnonzero(fold_of != fold).tolist()
        built = SegmentCounts.build([sequences[u] for u in kept], [user_properties[u] for u in kept], num_items)
        segments = max(segments, len(built.names))
        popularity = np.bincount(np.concatenate([sequences[u] for u in kept]).astype(np.int64),
                                 minlength=num_items).astype(np.float32)[:num_items]
        totals, total = built.counts.sum(1), float(popularity.sum())
        rows = {name: n for n, name in enumerate(built.names)}
        by_popularity = np.argsort(-popularity, kind="stable")[:k]
        for user in np.flatnonzero(fold_of == fold).tolist():
            target = int(sequences[user][-1])
            picked = [rows[n] for n in built.rule.segments_of(user_properties[user]) if n in rows]
            scores = segment_scores(built.counts[picked], popularity, totals[picked], total, num_items)
            for name, top in (("attributes", np.argsort(-scores, kind="stable")[:k]), ("popularity", by_popularity)):
                place = np.flatnonzero(top == target)
                hits[name].append(float(len(place) > 0))
                gains[name].append(1.0 / np.log2(place[0] + 2) if len(place) else 0.0)
                precision[name].append(float(np.isin(top, sequences[user]).sum()) / k)
    report: dict[str, object] = {"held_out_users": len(hits["popularity"]), "folds": folds, "segments": segments,
                                 "k": k, "target": "each held-out user's last item"}
    for name in hits:
        report[name] = {f"hr@{k}": round(float(np.mean(hits[name])), 4),
                        f"ndcg@{k}": round(float(np.mean(gains[name])), 4), "hits": int(sum(hits[name])),
                        f"precision@{k}_whole_history": round(float(np.mean(precision[name])), 4)}
    base = float(np.mean(hits["popularity"]))
    report[f"hr@{k}_ratio"] = round(float(np.mean(hits["attributes"])) / base, 3) if base else None
    whole = float(np.mean(precision["popularity"]))
    report[f"precision@{k}_whole_history_ratio"] = (round(float(np.mean(precision["attributes"])) / whole, 3)
                                                    if whole else None)
    return report
