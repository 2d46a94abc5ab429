"""Item filters and attributes: protobuf <-> `recdata.attributes`, the same on every hop
(client -> gateway -> recall shards)."""

from __future__ import annotations

from collections.abc import Mapping

from protos.recfunnel.v1 import recall_pb2, recommender_pb2
from recdata.attributes import ItemAttributes, ItemFilter, NumberRange, PropertyEquals, PropertyValue


def value_of(value: recommender_pb2.PropertyValue) -> PropertyValue | None:
    """A property's value; None when neither kind is set."""
    kind = value.WhichOneof("kind")
    return None if kind is None else (value.number if kind == "number" else value.text)


def properties_of(properties: Mapping[str, recommender_pb2.PropertyValue]) -> dict[str, PropertyValue]:
    """The set properties; unset values are dropped (validation reports them first)."""
    return {name: v for name, value in properties.items() if (v := value_of(value)) is not None}


def property_values(properties: Mapping[str, PropertyValue]) -> dict[str, recommender_pb2.PropertyValue]:
    return {name: recommender_pb2.PropertyValue(text=v) if isinstance(v, str) else recommender_pb2.PropertyValue(
        number=float(v)) for name, v in properties.items()}


def filter_from_proto(pb: recommender_pb2.ItemFilter) -> ItemFilter:
    return ItemFilter(
        tags_any=tuple(pb.tags_any), tags_all=tuple(pb.tags_all), tags_none=tuple(pb.tags_none),
        ranges=tuple(NumberRange(r.property, r.min if r.HasField("min") else None,
                                 r.max if r.HasField("max") else None) for r in pb.ranges),
        equals=tuple(PropertyEquals(e.property, tuple(e.any_of)) for e in pb.equals),
        newer_than_ms=pb.newer_than_ms)


def filter_to_proto(item_filter: ItemFilter) -> recommender_pb2.ItemFilter:
    return recommender_pb2.ItemFilter(
        tags_any=item_filter.tags_any, tags_all=item_filter.tags_all, tags_none=item_filter.tags_none,
        ranges=[recommender_pb2.NumberRange(property=r.property, min=r.low, max=r.high) for r in item_filter.ranges],
        equals=[recommender_pb2.PropertyEquals(property=e.property, any_of=e.any_of) for e in item_filter.equals],
        newer_than_ms=item_filter.newer_than_ms)


def attributes_to_proto(item: ItemAttributes) -> recall_pb2.ItemAttributes:
    return recall_pb2.ItemAttributes(tags=item.tags, properties=property_values(item.properties),
                                     created_ms=item.created_ms)


def attributes_from_proto(pb: recall_pb2.ItemAttributes) -> ItemAttributes:
    return ItemAttributes(tuple(pb.tags), properties_of(pb.properties), pb.created_ms)
