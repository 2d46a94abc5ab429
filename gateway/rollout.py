"""Swapping the cluster to a new model version while it serves.

1. Pin every request to the serving version (the funnel names it on every call).
2. Load the new bundle on the ranker and every shard, beside the serving one.
3. Replay the live catalogue changes onto it, then switch the funnel's version in one
   assignment, both under the catalogue's lock so no change lands in the old version only.
4. Wait for requests that started on the old version to finish, then unload it.

A request reads the version once, at its start, so it sees one version end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.admission import Admission
from gateway.catalogue import Catalogue
from gateway.experiments import Experiment, Variant
from gateway.funnel import Funnel, StageFailed

log = logging.getLogger(__name__)


class VersionHolder(Protocol):
    async def load_version(self, bundle_path: str, timeout: float, keep_default: bool = False) -> str: ...

    async def unload_version(self, version: str, timeout: float) -> list[str]: ...


@dataclass(frozen=True)
class SwapReport:
    model_version: str
    previous_version: str
    replayed_changes: int
    seconds: float


class Rollout:
    def __init__(self, funnel: Funnel, catalogue: Catalogue, ranking: VersionHolder,
                 shards: Sequence[VersionHolder], drain_s: float, load_timeout_s: float = 600.0,
                 admission: Admission | None = None):
        self.funnel = funnel
        self.admission = admission
        self.catalogue = catalogue
        self.ranking = ranking
        self.shards = list(shards)
        self.drain_s = drain_s
        self.load_timeout_s = load_timeout_s
        self._swapping = asyncio.Lock()  # one swap at a time

    async def serving_version(self, timeout: float = 5.0) -> str:
        """The version requests use now, asking the ranker for its default if none ran yet."""
        if not self.funnel.model_version:
            _, version = await self.funnel.ranking.encode([], timeout, "")
            self.funnel.model_version = self.funnel.model_version or version
        return self.funnel.model_version

    async def replay(self, version: str = "", switch: bool = False) -> int:
        """Apply the recorded catalogue changes to `version` (default: the serving one), and
        with `switch` make it the serving version in the same step. Also what brings a
        restarted service, which starts from its bundle, back to the live catalogue; changes
        are idempotent, so services that had them are unchanged."""
        version = version or await self.serving_version()
        async with self.catalogue.lock:  # no change lands between the replay and the switch
            replayed = await self.catalogue.replay(version, self.load_timeout_s)
            if switch:
                self.funnel.model_version = version
        return replayed

    async def load(self, bundle_path: str, keep_default: bool = False) -> str:
        """Load a bundle on the ranker and every shard, beside what they serve; its version.
        With `keep_default` the services' default stays what it was."""
        holders = [self.ranking, *self.shards]
        with self.admission.limit_held() if self.admission else contextlib.nullcontext():
            loaded = await asyncio.gather(*(h.load_version(bundle_path, self.load_timeout_s, keep_default)
                                            for h in holders))
        if len(set(loaded)) != 1:
            raise StageFailed(f"services loaded different versions from {bundle_path}: {sorted(set(loaded))}")
        return loaded[0]

    async def retire(self, version: str) -> None:
        """Once requests that read `version` have finished, unload it everywhere."""
        await asyncio.sleep(self.drain_s)
        holders = [self.ranking, *self.shards]
        results = await asyncio.gather(*(h.unload_version(version, self.load_timeout_s) for h in holders),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):  # a restarted service may not hold it any more
                log.warning("unloading %s: %s", version, result)

    async def add_beside(self, bundle_path: str) -> str:
        """Load a bundle beside the serving version without switching to it (an experiment
        variant's), bring it to the live catalogue, and keep every later change reaching it."""
        serving = await self.serving_version()  # pinned first: the services' default may be any
        version = await self.load(bundle_path, keep_default=True)
        if version != serving:
            async with self.catalogue.lock:  # no change lands between the replay and joining `beside`
                await self.catalogue.replay(version, self.load_timeout_s)
                self.catalogue.beside.add(version)
        return version

    async def drop_beside(self, version: str) -> None:
        """Stop feeding catalogue changes to a version served beside and, once the requests
        that named it have finished, unload it."""
        async with self.catalogue.lock:
            self.catalogue.beside.discard(version)
        if version != self.funnel.model_version:
            await self.retire(version)

    async def swap(self, bundle_path: str) -> SwapReport:
        """Load, replay and switch, drain, unload: the whole swap for a cluster of one gateway
        (with several, the controller runs these steps across all of them)."""
        async with self._swapping:
            started = time.monotonic()
            previous = await self.serving_version()
            version = await self.load(bundle_path)
            replayed = await self.replay(version, switch=True)
            log.info("serving %s (was %s); %d catalogue changes replayed", version, previous, replayed)
            self.catalogue.beside.discard(version)  # a variant's version promoted: serving now
            if previous != version and previous not in self.catalogue.beside:
                await self.retire(previous)
            return SwapReport(version, previous, replayed, time.monotonic() - started)


class VariantVersions:
    """The model versions the running experiment's variants name, loaded beside the serving one
    on every service. An experiment is applied only once all its versions are loaded: until
    then (minutes, for an index build) its users get the serving version and no variant, so no
    answer is labelled with a variant whose model did not make it. A bundle that fails to load
    keeps its experiment off, and says why in the log; versions no longer named are unloaded."""

    def __init__(self, rollout: Rollout):
        self.rollout = rollout
        self.loaded: dict[str, str] = {}   # bundle path -> its model version
        self.failed: dict[str, str] = {}   # bundle path -> why it did not load
        self._wanted: set[str] = set()
        self._following: asyncio.Task[None] | None = None

    def ready(self, experiment: Experiment | None) -> bool:
        """Whether `experiment` can be applied now; starts loading (or unloading) what it needs."""
        wanted = experiment.bundles if experiment is not None else set()
        self._wanted = wanted  # a running follow picks up a change when it is done
        pending = wanted - set(self.failed) != set(self.loaded)  # a failed bundle is not retried each request
        if pending and (self._following is None or self._following.done()):
            self._following = asyncio.get_running_loop().create_task(self._follow())
        return wanted <= set(self.loaded)

    def version_of(self, variant: Variant | None) -> str:
        """The version a variant's requests name; "" for the serving one."""
        return self.loaded.get(variant.bundle, "") if variant is not None and variant.bundle else ""

    async def _follow(self) -> None:
        while True:
            wanted = set(self._wanted)
            for bundle in sorted(wanted - set(self.loaded) - set(self.failed)):
                try:
                    self.loaded[bundle] = await self.rollout.add_beside(bundle)
                    log.info("experiment version %s loaded beside the serving one from %s",
                             self.loaded[bundle], bundle)
                except Exception as error:  # noqa: BLE001 - the experiment stays off; serving goes on
                    self.failed[bundle] = f"{type(error).__name__}: {error}"
                    log.error("experiment bundle %s not loaded, the experiment stays off: %s", bundle, error)
            for bundle in sorted(set(self.loaded) - wanted):
                await self.rollout.drop_beside(self.loaded.pop(bundle))
            if wanted == self._wanted:
                return
