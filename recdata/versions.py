"""The model versions one service holds: the default and any loaded beside it.

Recall shards and the ranking service keep a new version next to the serving one while
callers switch over, so a request that named a version is answered by it to the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

Served = TypeVar("Served")


class VersionNotLoaded(LookupError):
    """A request named a version this service does not hold."""


class DefaultVersionInUse(ValueError):
    """Unloading the default version would leave version-less callers with nothing."""


class LoadedVersions(Generic[Served]):
    def __init__(self, first: Served, version_of: Callable[[Served], str]):
        self._version_of = version_of
        self._served = {version_of(first): first}
        self.default = version_of(first)

    @property
    def names(self) -> list[str]:
        return sorted(self._served)

    def all(self) -> list[Served]:
        return list(self._served.values())

    def get(self, version: str = "") -> Served:
        """The named version, or the default for an empty name."""
        served = self._served.get(version or self.default)
        if served is None:
            raise VersionNotLoaded(f"model_version {version!r} not loaded; loaded: {', '.join(self.names)}")
        return served

    def add(self, served: Served, make_default: bool = True) -> str:
        """Hold `served` (replacing a version of the same name) and, unless told otherwise,
        make it the default."""
        version = self._version_of(served)
        self._served[version] = served
        if make_default:
            self.default = version
        return version

    def remove(self, version: str) -> Served:
        if version == self.default:
            raise DefaultVersionInUse(f"model_version {version!r} is the default; load another one first")
        if version not in self._served:
            raise VersionNotLoaded(f"model_version {version!r} not loaded; loaded: {', '.join(self.names)}")
        return self._served.pop(version)
