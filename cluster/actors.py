"""What each Ray actor runs: one gRPC service in the actor's own event loop.

The service itself is the plain one (`retrieval.server`, `ranking.server`,
`gateway.server`); these hosts only give Ray something to place, restart and address,
one class per service so the Ray dashboard names them. They are plain classes:
`cluster.launch` turns them into actors with `ray.remote` and applies the resources
declared in `cluster.config` with `.options()`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol


class Running(Protocol):
    """A started service: where it listens, and how to stop it gracefully."""

    @property
    def address(self) -> str: ...

    async def stop(self, grace: float = 2.0) -> None: ...


class ServiceHost:
    def __init__(self, config: Any):
        logging.basicConfig(level=os.environ.get("RECFUNNEL_LOG_LEVEL", "WARNING"),
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
        self.config = config
        self.running: Running | None = None

    async def _start(self) -> Running:
        raise NotImplementedError

    async def start(self) -> str:
        """Start the service once; returns its address."""
        if self.running is None:
            self.running = await self._start()
        return self.running.address

    async def stop(self) -> None:
        if self.running is not None:
            await self.running.stop()
            self.running = None


class RecallShardHost(ServiceHost):
    async def _start(self) -> Running:
        from retrieval.server import start

        return await start(self.config)


class RankingHost(ServiceHost):
    async def _start(self) -> Running:
        from ranking.server import start

        return await start(self.config)

    async def stats(self) -> dict[str, dict[str, float]]:
        """Micro-batching counters of the running service ({} when it is not running)."""
        return self.running.stats() if self.running is not None else {}  # type: ignore[attr-defined]


class GatewayHost(ServiceHost):
    async def _start(self) -> Running:
        from gateway.server import start

        return await start(self.config)
