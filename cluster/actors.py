"""What each Ray actor runs: one gRPC service in the actor's own event loop.

The service itself is the plain one (`retrieval.server`, `ranking.server`,
`gateway.server`); these hosts only give Ray something to place, restart and address,
one class per service so the Ray dashboard names them. They are plain classes:
`cluster.controller` turns them into actors with `ray.remote` and applies the resources
declared in `cluster.config` with `.options()`.

Ray restarts a dead host by constructing it again; the service starts on the next
`start()`, which the controller calls on every host it watches.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from typing import Any, Protocol

from cluster.config import NODE_IP


class Running(Protocol):
    """A started service: where it listens, and how to stop it gracefully."""

    @property
    def address(self) -> str: ...

    async def stop(self, grace: float = 2.0) -> None: ...


class ServiceHost:
    def __init__(self, config: Any):
        logging.basicConfig(level=os.environ.get("RECFUNNEL_LOG_LEVEL", "WARNING"),
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
        if getattr(config, "host", "") == NODE_IP:
            import ray

            # Each service listens on, and advertises, the address of the node Ray placed it on.
            config = replace(config, host=ray.util.get_node_ip_address())
        self.config = config
        self.running: Running | None = None
        self._exporter: asyncio.Task[None] | None = None

    async def _start(self) -> Running:
        raise NotImplementedError

    def _export_metrics(self) -> None:
        """Read the running service's counters into its Ray metrics (none by default)."""

    async def _export_forever(self) -> None:
        from cluster.metrics import EXPORT_EVERY_S

        while True:
            await asyncio.sleep(EXPORT_EVERY_S)
            if self.running is not None:
                try:
                    self._export_metrics()
                except Exception:  # noqa: BLE001 - metrics must never take the service down
                    logging.getLogger(__name__).exception("metrics export failed")

    async def _versions(self) -> tuple[str, list[str]]:
        """(default version, loaded versions) of the running service."""
        versions = self.running.servicer.versions  # type: ignore[union-attr]  # recall and ranking
        return versions.default, versions.names

    async def start(self) -> str:
        """Start the service once; returns its address."""
        if self.running is None:
            self.running = await self._start()
            if self._exporter is None:
                self._exporter = asyncio.get_running_loop().create_task(self._export_forever())
        return self.running.address

    async def describe(self) -> dict[str, Any]:
        """Where this host runs and what it serves, for the controller and `recfunnel status`."""
        import psutil
        import ray

        version, loaded = await self._versions() if self.running is not None else ("", [])
        return {"address": self.running.address if self.running else "", "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "model_version": version,
                "loaded_versions": loaded, "rss_bytes": psutil.Process().memory_info().rss}

    async def stop(self) -> None:
        if self.running is not None:
            await self.running.stop()
            self.running = None


class RecallShardHost(ServiceHost):
    async def _start(self) -> Running:
        from cluster.metrics import RecallMetrics
        from retrieval.server import start, use_serving_threads

        self.metrics = RecallMetrics(self.config.shard_id)
        service = await start(self.config)
        use_serving_threads(self.config)
        return service

    def _export_metrics(self) -> None:
        self.metrics.export(self.running.servicer.versions.get())  # type: ignore[union-attr]


class RankingHost(ServiceHost):
    async def _start(self) -> Running:
        from cluster.metrics import RankerMetrics
        from ranking.server import start

        self.metrics = RankerMetrics()
        return await start(self.config)

    def _export_metrics(self) -> None:
        self.metrics.export(self.running.stats())  # type: ignore[union-attr]

    async def stats(self) -> dict[str, dict[str, float]]:
        """Micro-batching counters of the running service ({} when it is not running)."""
        return self.running.stats() if self.running is not None else {}  # type: ignore[attr-defined]


class GatewayHost(ServiceHost):
    async def _start(self) -> Running:
        from cluster.metrics import AdmissionMetrics, ExposureMetrics, RayGatewayMetrics
        from gateway.server import start

        self.metrics = AdmissionMetrics()
        self.exposure_metrics = ExposureMetrics()
        return await start(self.config, RayGatewayMetrics())

    def _export_metrics(self) -> None:
        self.metrics.export(self.running.admission.snapshot())  # type: ignore[union-attr,attr-defined]
        exposures = self.running.exposures  # type: ignore[union-attr,attr-defined]
        self.exposure_metrics.export(exposures.stats.to_dict(), exposures.groups)

    async def describe(self) -> dict[str, Any]:
        described = await super().describe()
        if self.running is not None:
            described["admission"] = self.running.admission.snapshot()  # type: ignore[attr-defined]
            described["exposures"] = self.running.exposures.stats.to_dict()  # type: ignore[attr-defined]
        return described

    async def _versions(self) -> tuple[str, list[str]]:
        try:  # the version its requests use; asks the ranker if none has run yet
            version = await self.running.rollout.serving_version()  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - the ranker is down: the gateway cannot know yet
            version = ""
        return version, [version] if version else []

    async def start_with(self, recall_addresses: list[str], ranking_addresses: list[str]) -> str:
        """Start (or keep running) with these backends; a restarted gateway starts with the
        current addresses rather than those it was first configured with."""
        if self.running is None:
            self.config = replace(self.config, recall_addresses=tuple(recall_addresses),
                                  ranking_addresses=tuple(ranking_addresses))
            return await self.start()
        self.running.retarget(recall_addresses, ranking_addresses)  # type: ignore[attr-defined]
        return self.running.address

    async def replay_catalogue(self) -> int:
        return await self.running.rollout.replay() if self.running else 0  # type: ignore[attr-defined]

    # The steps of a live swap, which the controller runs across every gateway (see
    # `gateway.rollout`): load once, switch each gateway, retire the old version once.
    async def load_version(self, bundle_path: str) -> str:
        return await self.running.rollout.load(bundle_path)  # type: ignore[union-attr,attr-defined,no-any-return]

    async def switch_version(self, version: str) -> tuple[str, int]:
        """Serve `version` from now on; returns (the version served before, changes replayed)."""
        rollout = self.running.rollout  # type: ignore[union-attr,attr-defined]
        previous = await rollout.serving_version()
        return previous, await rollout.replay(version, switch=True)

    async def retire_version(self, version: str) -> None:
        await self.running.rollout.retire(version)  # type: ignore[union-attr,attr-defined]
