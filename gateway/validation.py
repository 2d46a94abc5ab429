"""Checks of every public request field; each failure names the field and its allowed range."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from gateway.config import Limits
from protos.recfunnel.v1 import recommender_pb2
from recdata.vectors import MAX_VECTOR_DIM, MAX_VECTOR_NAMES, check_vector_name


class InvalidRequest(ValueError):
    """Bad client input; the message is returned as INVALID_ARGUMENT."""


def check_size(method: str, size: int, limits: Limits) -> None:
    if size > limits.max_message_bytes:
        raise InvalidRequest(f"{method} request is {size} bytes; allowed up to {limits.max_message_bytes}")


def check_id(name: str, value: str, limits: Limits) -> None:
    if not value:
        raise InvalidRequest(f"{name} is empty; it must be 1..{limits.max_id_bytes} bytes of UTF-8")
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > limits.max_id_bytes:
        raise InvalidRequest(f"{name} is {size} bytes; allowed 1..{limits.max_id_bytes}")


def check_id_list(name: str, values: Sequence[str], limits: Limits, max_len: int | None = None) -> None:
    bound = limits.max_list_items if max_len is None else max_len
    if len(values) > bound:
        raise InvalidRequest(f"{name} has {len(values)} entries; allowed 0..{bound}")
    for n, value in enumerate(values):
        check_id(f"{name}[{n}]", value, limits)


def check_recommend(user_id: str, k: int, exclude: Sequence[str], context: Sequence[str],
                    diversity: float, limits: Limits, page_size: int = 0) -> None:
    check_id("user_id", user_id, limits)
    if page_size:
        if not 1 <= page_size <= limits.max_page_size:
            raise InvalidRequest(f"page_size={page_size} out of range; allowed 0 (no paging) or "
                                 f"1..{limits.max_page_size}")
    elif not 1 <= k <= limits.max_k:
        raise InvalidRequest(f"k={k} out of range; allowed 1..{limits.max_k}")
    check_id_list("exclude_item_ids", exclude, limits)
    check_id_list("context_item_ids", context, limits)
    if not (math.isfinite(diversity) and 0.0 <= diversity <= 1.0):
        raise InvalidRequest(f"diversity={diversity} out of range; allowed 0.0..1.0")


def check_event(n: int, user_id: str, item_id: str, event_type: str, value: float, timestamp_ms: int,
                event_id: str, limits: Limits, request_id: str = "") -> None:
    check_id(f"events[{n}].user_id", user_id, limits)
    check_id(f"events[{n}].item_id", item_id, limits)
    if event_id:
        check_id(f"events[{n}].event_id", event_id, limits)
    if len(request_id.encode("utf-8", errors="surrogatepass")) > 64:
        raise InvalidRequest(f"events[{n}].request_id is longer than 64 bytes; give the request_id of the answer "
                             f"that showed the item, or none")
    if len(event_type.encode("utf-8", errors="surrogatepass")) > 64:
        raise InvalidRequest(f"events[{n}].event_type is longer than 64 bytes")
    if not math.isfinite(value):
        raise InvalidRequest(f"events[{n}].value={value} must be a finite number")
    if timestamp_ms < 0:
        raise InvalidRequest(f"events[{n}].timestamp_ms={timestamp_ms} must be >= 0 (0 = now)")


def check_item(n: int, text: str, tags: Sequence[str], limits: Limits, field: str = "items") -> None:
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > limits.max_text_bytes:
        raise InvalidRequest(f"{field}[{n}].text is {size} bytes; allowed 0..{limits.max_text_bytes}")
    if len(tags) > limits.max_tags:
        raise InvalidRequest(f"{field}[{n}].tags has {len(tags)} entries; allowed 0..{limits.max_tags}")
    for t, tag in enumerate(tags):
        check_id(f"{field}[{n}].tags[{t}]", tag, limits)


def check_property_name(name: str, where: str) -> None:
    if not 1 <= len(name.encode("utf-8", errors="surrogatepass")) <= 64:
        raise InvalidRequest(f"{where} property name {name[:70]!r} must be 1..64 bytes")


def check_properties(n: int, properties: Mapping[str, recommender_pb2.PropertyValue], limits: Limits,
                     field: str = "items") -> None:
    where = f"{field}[{n}].properties"
    if len(properties) > limits.max_properties:
        raise InvalidRequest(f"{where} has {len(properties)} entries; allowed 0..{limits.max_properties}")
    for name, value in properties.items():
        check_property_name(name, f"{where}:")
        if "=" in name:
            raise InvalidRequest(f"{where} name {name[:70]!r} holds '='; property names may not")
        kind = value.WhichOneof("kind")
        if kind is None:
            raise InvalidRequest(f"{where}[{name!r}] has no value; set number or text")
        if kind == "number" and not math.isfinite(value.number):
            raise InvalidRequest(f"{where}[{name!r}].number={value.number} must be finite")
        if kind == "text":
            check_id(f"{where}[{name!r}].text", value.text, limits)


def check_vectors(n: int, vectors: Mapping[str, recommender_pb2.FloatVector], field: str = "items") -> None:
    """Bounds of an item's precomputed vectors; whether the serving model fuses a name, and
    at that size, the ranking service checks (it answers INVALID_ARGUMENT naming what it takes)."""
    where = f"{field}[{n}].vectors"
    if len(vectors) > MAX_VECTOR_NAMES:
        raise InvalidRequest(f"{where} has {len(vectors)} entries; allowed 0..{MAX_VECTOR_NAMES}")
    for name, vector in vectors.items():
        try:
            check_vector_name(name)
        except ValueError as error:
            raise InvalidRequest(f"{where}: {error}") from None
        if not 1 <= len(vector.values) <= MAX_VECTOR_DIM:
            raise InvalidRequest(f"{where}[{name!r}] has {len(vector.values)} values; allowed 1..{MAX_VECTOR_DIM}")
        if not all(math.isfinite(v) for v in vector.values):
            raise InvalidRequest(f"{where}[{name!r}] values must be finite")


def check_filter(name: str, item_filter: recommender_pb2.ItemFilter, limits: Limits) -> None:
    """Bounds of every part of a filter; the message names the part and its allowed range."""
    for part in ("tags_any", "tags_all", "tags_none"):
        check_id_list(f"{name}.{part}", getattr(item_filter, part), limits, limits.max_filter_tags)
    for part in ("ranges", "equals"):
        count = len(getattr(item_filter, part))
        if count > limits.max_filter_parts:
            raise InvalidRequest(f"{name}.{part} has {count} entries; allowed 0..{limits.max_filter_parts}")
    for n, bounds in enumerate(item_filter.ranges):
        check_property_name(bounds.property, f"{name}.ranges[{n}]")
        low = bounds.min if bounds.HasField("min") else -math.inf
        high = bounds.max if bounds.HasField("max") else math.inf
        if math.isnan(low) or math.isnan(high) or low > high:
            raise InvalidRequest(f"{name}.ranges[{n}] ({bounds.property}) has min={low} > max={high} or a NaN "
                                 f"bound; give min <= max, either may be left unset")
    for n, equal in enumerate(item_filter.equals):
        check_property_name(equal.property, f"{name}.equals[{n}]")
        if not 1 <= len(equal.any_of) <= limits.max_filter_values:
            raise InvalidRequest(f"{name}.equals[{n}].any_of has {len(equal.any_of)} values; allowed "
                                 f"1..{limits.max_filter_values}")
        for v, value in enumerate(equal.any_of):
            check_id(f"{name}.equals[{n}].any_of[{v}]", value, limits)
    if item_filter.newer_than_ms < 0:
        raise InvalidRequest(f"{name}.newer_than_ms={item_filter.newer_than_ms} must be >= 0 (0 = any time)")


def check_similar(request: recommender_pb2.SimilarItemsRequest, limits: Limits) -> None:
    if not 1 <= len(request.item_ids) <= limits.max_similar_to:
        raise InvalidRequest(f"item_ids has {len(request.item_ids)} entries; allowed 1..{limits.max_similar_to}")
    check_id_list("item_ids", request.item_ids, limits, limits.max_similar_to)
    if not 1 <= request.k <= limits.max_k:
        raise InvalidRequest(f"k={request.k} out of range; allowed 1..{limits.max_k}")
    check_id_list("exclude_item_ids", request.exclude_item_ids, limits)
    if request.user_id:
        check_id("user_id", request.user_id, limits)
    check_filter("filter", request.filter, limits)
