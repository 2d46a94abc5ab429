"""A/B experiments on serving parameters: which variant a user gets, and what it changes.

A user's variant is a salted hash of their user id, so it is the same on every request and
on every gateway, with no state to share; another salt reshuffles the users for the next
experiment. The variant changes the serving parameters of the user's answers (the diversity a
request leaves at 0, the recall channels' budgets, the place kept for a new item) or the
model that answers; the answer and its exposures name it, so that `recfunnel experiments
report` can compare what each variant's answers led to.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from recdata.channels import CHANNELS, MAX_NEW_ITEM_PLACE

log = logging.getLogger(__name__)

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_VARIANTS = 16
MAX_CHANNEL_BUDGET = 1000


@dataclass(frozen=True)
class Variant:
    name: str
    share: float                    # of the users, 0 < share <= 1; an experiment's shares sum to 1
    diversity: float | None = None  # for requests that leave it at 0; None: as requested
    channel_budgets: tuple[tuple[str, int], ...] | None = None  # None: the gateway's
    bundle: str | None = None       # a bundle every service can read: its model answers; None: the serving one
    # The place of the best new item (no interactions yet) in lists without one: 1 = first;
    # 0 = none kept; None: the ranking service's setting (the last place).
    new_item_place: int | None = None

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise ValueError(f"variant name {self.name[:70]!r} must match {NAME.pattern}")
        if not (math.isfinite(self.share) and 0 < self.share <= 1):
            raise ValueError(f"variant {self.name}: share={self.share} must be in (0, 1]")
        if self.diversity is not None and not (math.isfinite(self.diversity) and 0 <= self.diversity <= 1):
            raise ValueError(f"variant {self.name}: diversity={self.diversity} must be in 0.0..1.0")
        if self.bundle is not None and not 1 <= len(self.bundle.encode("utf-8")) <= 4096:
            raise ValueError(f"variant {self.name}: bundle must be a path of 1..4096 bytes")
        if self.new_item_place is not None and not 0 <= self.new_item_place <= MAX_NEW_ITEM_PLACE:
            raise ValueError(f"variant {self.name}: new_item_place={self.new_item_place} must be in "
                             f"0..{MAX_NEW_ITEM_PLACE} (0 = no place kept for new items)")
        for channel, budget in self.channel_budgets or ():
            if channel not in CHANNELS:
                raise ValueError(f"variant {self.name}: unknown channel {channel!r}; allowed: {', '.join(CHANNELS)}")
            if not 0 <= budget <= MAX_CHANNEL_BUDGET:
                raise ValueError(f"variant {self.name}: budget of {channel}={budget} must be in "
                                 f"0..{MAX_CHANNEL_BUDGET}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Variant:
        unknown = set(values) - {"name", "share", "diversity", "channel_budgets", "bundle", "new_item_place"}
        if unknown:
            raise ValueError(f"variant settings {sorted(unknown)} unknown; allowed: bundle, channel_budgets, "
                             f"diversity, name, new_item_place, share")
        budgets = values.get("channel_budgets")
        return cls(str(values.get("name", "")), float(values.get("share", 0.0)),
                   None if values.get("diversity") is None else float(values["diversity"]),
                   None if budgets is None else tuple((str(c), int(k)) for c, k in dict(budgets).items()),
                   None if values.get("bundle") is None else str(values["bundle"]),
                   None if values.get("new_item_place") is None else int(values["new_item_place"]))


@dataclass(frozen=True)
class Experiment:
    name: str
    variants: tuple[Variant, ...]
    control: str = "control"   # the variant the others are judged against
    salt: str = ""             # "" = the experiment's name

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise ValueError(f"experiment name {self.name[:70]!r} must match {NAME.pattern}")
        names = [v.name for v in self.variants]
        if not 2 <= len(names) <= MAX_VARIANTS or len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name}: 2..{MAX_VARIANTS} variants with distinct names; "
                             f"got {names}")
        if self.control not in names:
            raise ValueError(f"experiment {self.name}: control {self.control!r} is not one of its variants {names}")
        total = sum(v.share for v in self.variants)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"experiment {self.name}: the variants' shares sum to {total:g}; they must sum to 1")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Experiment:
        """One `[[experiments]]` table: name, control, salt, and `[[experiments.variants]]`."""
        unknown = set(values) - {"name", "variants", "control", "salt"}
        if unknown:
            raise ValueError(f"experiment settings {sorted(unknown)} unknown; allowed: control, name, salt, variants")
        return cls(str(values.get("name", "")), tuple(Variant.from_dict(v) for v in values.get("variants", [])),
                   str(values.get("control", "control")), str(values.get("salt", "")))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @property
    def bundles(self) -> set[str]:
        """The bundles its variants serve beside the serving version."""
        return {v.bundle for v in self.variants if v.bundle is not None}

    def assign(self, user_id: str) -> Variant:
        """The user's variant: the salted hash's place in [0, 1) among the cumulative shares."""
        digest = hashlib.sha256(f"{self.salt or self.name}\x1f{user_id}".encode()).digest()
        place = int.from_bytes(digest[:8], "big") / 2**64
        reached = 0.0
        for variant in self.variants:
            reached += variant.share
            if place < reached:
                return variant
        return self.variants[-1]  # shares that sum to 1 within rounding

    def label(self, variant: Variant) -> str:
        """How answers and exposures name the variant: experiment/variant."""
        return f"{self.name}/{variant.name}"

    def assignment(self, user_id: str) -> Assignment:
        variant = self.assign(user_id)
        return Assignment(self.name, variant, self.label(variant))


@dataclass(frozen=True)
class Assignment:
    """A user's place in the running experiment (`NO_EXPERIMENT` when none runs)."""

    experiment: str
    variant: Variant | None
    label: str              # experiment/variant, as the exposure log keeps it
    model_version: str = ""  # the version the variant's bundle loaded as; "" = the serving one

    @property
    def variant_name(self) -> str:
        return self.variant.name if self.variant is not None else ""


NO_EXPERIMENT = Assignment("", None, "")


def experiments_from_config(tables: list[dict[str, Any]]) -> tuple[Experiment, ...]:
    """`[[experiments]]` of a cluster config. One runs at a time: two experiments changing the
    same parameters of the same users would confound each other."""
    if len(tables) > 1:
        raise ValueError(f"{len(tables)} experiments configured; one runs at a time")
    return tuple(Experiment.from_dict(t) for t in tables)


# The event store's setting that starts and stops an experiment while the gateways serve:
# an experiment's JSON, or "" for none. Unset, a gateway runs its configured experiment.
EXPERIMENT_SETTING = "experiment"
CONFIGURED = "configured"  # the setting's value for "the gateway's configured one", as if never set


class SettingSource(Protocol):
    def setting(self, key: str) -> str | None: ...


class RunningExperiment:
    """The experiment a gateway runs: its config's, until the event store's setting (written
    by `recfunnel experiments start` / `stop`) says otherwise. Every gateway re-reads the
    setting at most every `poll_s` while it serves, off the request path, so all of them
    switch within about that long of each other without a restart."""

    def __init__(self, configured: Experiment | None, store: SettingSource, executor: Executor | None = None,
                 poll_s: float = 2.0):
        self.current = configured
        self.configured = configured
        self.store = store
        self.executor = executor
        self.poll_s = poll_s
        self._read_at = -math.inf
        self._reading: asyncio.Future[None] | None = None

    def refresh(self) -> None:
        """Read the setting now; a setting that does not parse is logged and ignored."""
        raw = self.store.setting(EXPERIMENT_SETTING)
        if raw is None or raw == CONFIGURED:
            self.current = self.configured
            return
        try:
            self.current = Experiment.from_dict(json.loads(raw)) if raw else None
        except (ValueError, TypeError) as error:
            log.warning("experiment setting ignored, %s still runs: %s",
                        self.current.name if self.current else "no experiment", error)

    def get(self) -> Experiment | None:
        """The experiment to assign this request by; starts a re-read when the last is stale."""
        now = time.monotonic()
        if now - self._read_at >= self.poll_s and (self._reading is None or self._reading.done()):
            self._read_at = now
            self._reading = asyncio.get_running_loop().run_in_executor(self.executor, self._refresh_logged)
        return self.current

    def _refresh_logged(self) -> None:
        try:
            self.refresh()
        except Exception as error:  # noqa: BLE001 - a store that is down keeps the experiment running
            log.warning("experiment setting unread, %s still runs: %s",
                        self.current.name if self.current else "no experiment", error)
