"""What each Ray actor runs: one gRPC service in the actor's own event loop.

The service itself is the plain one (`retrieval.server`, `ranking.server`,
`gateway.server`); these hosts only give Ray something to place, restart and address.
They are plain classes: `cluster.launch` turns them into actors with `ray.remote` and
applies the resources declared in `cluster.config` with `.options()`.
"""

from __future__ import annotations

import logging
import os

from gateway.config import GatewayConfig
from gateway.server import Gateway
from protos.serving import ServerHandle
from ranking.config import RankingConfig
from retrieval.config import RecallConfig


def _configure_logging() -> None:
    level = os.environ.get("RECFUNNEL_LOG_LEVEL", "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")


class RecallShardHost:
    def __init__(self, config: RecallConfig):
        _configure_logging()
        self.config = config
        self.handle: ServerHandle | None = None

    async def start(self) -> str:
        from retrieval.server import start

        if self.handle is None:
            self.handle = await start(self.config)
        return self.handle.address

    async def stop(self) -> None:
        if self.handle is not None:
            await self.handle.stop()
            self.handle = None


class RankingHost:
    def __init__(self, config: RankingConfig):
        _configure_logging()
        self.config = config
        self.handle: ServerHandle | None = None

    async def start(self) -> str:
        from ranking.server import start

        if self.handle is None:
            self.handle = await start(self.config)
        return self.handle.address

    async def stop(self) -> None:
        if self.handle is not None:
            await self.handle.stop()
            self.handle = None


class GatewayHost:
    def __init__(self, config: GatewayConfig):
        _configure_logging()
        self.config = config
        self.gateway: Gateway | None = None

    async def start(self) -> str:
        from gateway.server import start

        if self.gateway is None:
            self.gateway = await start(self.config)
        return self.gateway.address

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
