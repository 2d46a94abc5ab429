"""Checks of every public request field; each failure names the field and its allowed range."""

from __future__ import annotations

import math
from collections.abc import Sequence

from gateway.config import Limits


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
                    diversity: float, limits: Limits) -> None:
    check_id("user_id", user_id, limits)
    if not 1 <= k <= limits.max_k:
        raise InvalidRequest(f"k={k} out of range; allowed 1..{limits.max_k}")
    check_id_list("exclude_item_ids", exclude, limits)
    check_id_list("context_item_ids", context, limits)
    if not (math.isfinite(diversity) and 0.0 <= diversity <= 1.0):
        raise InvalidRequest(f"diversity={diversity} out of range; allowed 0.0..1.0")


def check_event(n: int, user_id: str, item_id: str, event_type: str, value: float, timestamp_ms: int,
                event_id: str, limits: Limits) -> None:
    check_id(f"events[{n}].user_id", user_id, limits)
    check_id(f"events[{n}].item_id", item_id, limits)
    if event_id:
        check_id(f"events[{n}].event_id", event_id, limits)
    if len(event_type.encode("utf-8", errors="surrogatepass")) > 64:
        raise InvalidRequest(f"events[{n}].event_type is longer than 64 bytes")
    if not math.isfinite(value):
        raise InvalidRequest(f"events[{n}].value={value} must be a finite number")
    if timestamp_ms < 0:
        raise InvalidRequest(f"events[{n}].timestamp_ms={timestamp_ms} must be >= 0 (0 = now)")


def check_item(n: int, text: str, tags: Sequence[str], limits: Limits) -> None:
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > limits.max_text_bytes:
        raise InvalidRequest(f"items[{n}].text is {size} bytes; allowed 0..{limits.max_text_bytes}")
    if len(tags) > limits.max_tags:
        raise InvalidRequest(f"items[{n}].tags has {len(tags)} entries; allowed 0..{limits.max_tags}")
    for t, tag in enumerate(tags):
        check_id(f"items[{n}].tags[{t}]", tag, limits)
