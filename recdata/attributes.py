"""Item attributes that request-time filters read, and the filters themselves.

An item carries tags, typed properties (a number such as a price or a year, or a string
such as a brand) and the time it joined the catalogue. A filter keeps the items that pass
every part given. `ItemFilter.passes` is the one-item reference the recall shards'
columnar masks (`retrieval.attributes`) must agree with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

PropertyValue = float | str


@dataclass(frozen=True)
class ItemAttributes:
    tags: tuple[str, ...] = ()
    properties: Mapping[str, PropertyValue] = field(default_factory=dict)
    created_ms: int = 0  # when the item joined the catalogue; 0 = unknown (older than any filter)

    def to_json(self) -> dict[str, object]:
        return {"tags": list(self.tags), "properties": dict(self.properties), "created_ms": self.created_ms}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ItemAttributes:
        properties = data.get("properties") or {}
        assert isinstance(properties, Mapping)
        return cls(tuple(data.get("tags") or ()),  # type: ignore[arg-type]
                   {str(k): v for k, v in properties.items()},
                   int(data.get("created_ms") or 0))  # type: ignore[call-overload]


@dataclass(frozen=True)
class NumberRange:
    """Both bounds inclusive; None is open. An item without the property (or with a string
    value) never passes."""

    property: str
    low: float | None = None
    high: float | None = None

    def holds(self, value: PropertyValue | None) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


@dataclass(frozen=True)
class PropertyEquals:
    property: str
    any_of: tuple[str, ...]

    def holds(self, value: PropertyValue | None) -> bool:
        return isinstance(value, str) and value in self.any_of


@dataclass(frozen=True)
class ItemFilter:
    tags_any: tuple[str, ...] = ()
    tags_all: tuple[str, ...] = ()
    tags_none: tuple[str, ...] = ()
    ranges: tuple[NumberRange, ...] = ()
    equals: tuple[PropertyEquals, ...] = ()
    newer_than_ms: int = 0

    @property
    def is_empty(self) -> bool:
        return not (self.tags_any or self.tags_all or self.tags_none or self.ranges or self.equals
                    or self.newer_than_ms)

    def passes(self, item: ItemAttributes) -> bool:
        tags = set(item.tags)
        return ((not self.tags_any or not tags.isdisjoint(self.tags_any))
                and tags.issuperset(self.tags_all)
                and tags.isdisjoint(self.tags_none)
                and all(r.holds(item.properties.get(r.property)) for r in self.ranges)
                and all(e.holds(item.properties.get(e.property)) for e in self.equals)
                and (not self.newer_than_ms or item.created_ms > self.newer_than_ms))


NO_FILTER = ItemFilter()
