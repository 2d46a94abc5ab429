"""A shard's item attributes as columns over its labels, so a filter becomes one boolean mask.

Labels are the shard's FAISS labels (positions in its id list, new ones appended on upsert);
a column holds one entry per label. A mask costs a few numpy passes over the labels (tens of
microseconds for 10^5 labels): per-request work that grows with the shard, as the search
itself does, and far below it. Stale entries of replaced or removed labels stay in place and
are masked out by `alive`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from recdata.attributes import ItemAttributes, ItemFilter


class _Column:
    """A numpy column that grows by doubling; `view()` is its live part."""

    def __init__(self, dtype: type, fill: object, size: int = 0):
        self.fill = fill
        self.data: np.ndarray = np.full(max(size, 16), fill, dtype=dtype)
        self.size = size

    def grow_to(self, size: int) -> None:
        if size > len(self.data):
            grown = np.full(max(size, 2 * len(self.data)), self.fill, dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.size = max(self.size, size)

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class AttributeColumns:
    def __init__(self) -> None:
        self.size = 0
        self.alive = _Column(np.bool_, False)
        self.created_ms = _Column(np.int64, 0)
        self.tag_labels: dict[str, list[int]] = defaultdict(list)
        self.numbers: dict[str, _Column] = {}
        # String properties: each distinct value gets a code; -1 = the item has none.
        self.codes: dict[str, dict[str, int]] = {}
        self.strings: dict[str, _Column] = {}

    def grow_to(self, size: int) -> None:
        self.size = max(self.size, size)
        for column in (self.alive, self.created_ms, *self.numbers.values(), *self.strings.values()):
            column.grow_to(self.size)

    def set(self, labels: Sequence[int], attributes: Sequence[ItemAttributes]) -> None:
        """Attributes of new labels (each label is set once: an upsert takes a new label)."""
        self.grow_to(max(labels, default=-1) + 1)
        for label, item in zip(labels, attributes, strict=True):
            self.created_ms.data[label] = item.created_ms
            for tag in set(item.tags):
                self.tag_labels[tag].append(label)
            for name, value in item.properties.items():
                if isinstance(value, str):
                    codes = self.codes.setdefault(name, {})
                    column = self.strings.setdefault(name, _Column(np.int32, -1, self.size))
                    column.data[label] = codes.setdefault(value, len(codes))
                else:
                    column = self.numbers.setdefault(name, _Column(np.float64, np.nan, self.size))
                    column.data[label] = float(value)

    def set_alive(self, labels: Sequence[int] | np.ndarray, alive: bool) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        self.grow_to(int(labels.max(initial=-1)) + 1)
        self.alive.data[labels] = alive

    def _has_tag(self, tag: str) -> np.ndarray:
        mask = np.zeros(self.size, dtype=np.bool_)
        mask[np.asarray(self.tag_labels.get(tag, ()), dtype=np.int64)] = True
        return mask

    def mask(self, item_filter: ItemFilter) -> np.ndarray:
        """(size,) True for the live labels that pass every part of the filter."""
        mask = self.alive.view().copy()
        if item_filter.tags_any:
            mask &= np.logical_or.reduce([self._has_tag(t) for t in item_filter.tags_any])
        for tag in item_filter.tags_all:
            mask &= self._has_tag(tag)
        for tag in item_filter.tags_none:
            mask &= ~self._has_tag(tag)
        for bounds in item_filter.ranges:
            column = self.numbers.get(bounds.property)
            if column is None:  # no item has it as a number: none passes
                return np.zeros(self.size, dtype=np.bool_)
            values = column.view()
            with np.errstate(invalid="ignore"):  # NaN (missing) compares False: fails the range
                passing = ~np.isnan(values)
                if bounds.low is not None:
                    passing &= values >= bounds.low
                if bounds.high is not None:
                    passing &= values <= bounds.high
            mask &= passing
        for equal in item_filter.equals:
            codes = self.codes.get(equal.property, {})
            wanted = [codes[v] for v in equal.any_of if v in codes]
            column = self.strings.get(equal.property)
            if column is None or not wanted:
                return np.zeros(self.size, dtype=np.bool_)
            mask &= np.isin(column.view(), wanted)
        if item_filter.newer_than_ms:
            mask &= self.created_ms.view() > item_filter.newer_than_ms
        return mask
