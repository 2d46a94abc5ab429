"""The controller actor: which service listens where and serves which model version.

It creates the service actors, then watches them. Ray restarts a dead actor by building
its host again; on its next pass the controller starts the service in it, loads the
serving version if that is not the one its bundle holds, replays the catalogue changes,
and points the gateways at the new address. Nothing else restarts. It also runs the live
swap across every gateway, and starts the feedback loop's actor when the config has one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.actors import GatewayHost, RankingHost, RecallShardHost
from cluster.config import ActorResources, ClusterConfig
from cluster.loop import LOOP_NAME, LoopHost, mark_feedback_start
from gateway.backends import GrpcRanking, GrpcRecall
from gateway.config import GatewayConfig
from gateway.events import open_event_store
from ranking.config import RankingConfig
from recdata.bundle import read_manifest
from retrieval.config import RecallConfig

log = logging.getLogger(__name__)

CONTROLLER_NAME = "recfunnel-controller"
CONTROLLER_STATE = "controller.state"  # in the event log's settings
NAMESPACE = "recfunnel"
START_TIMEOUT_S = 300.0   # building indexes and loading models
CALL_TIMEOUT_S = 10.0     # anything else the controller asks of a host


@dataclass
class ServiceRecord:
    name: str
    role: str                 # "recall", "ranking" or "gateway"
    actor: Any = field(repr=False)
    address: str = ""
    pid: int = 0
    node_id: str = ""
    model_version: str = ""
    loaded_versions: list[str] = field(default_factory=list)
    state: str = "STARTING"   # STARTING, ALIVE, UNREACHABLE (dead or restarting)
    restarts: int = 0
    rss_bytes: int = 0        # resident memory of the actor's process at the last look
    admission: dict[str, Any] = field(default_factory=dict)  # a gateway's admission control, at the last look

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "actor"}


def service_actor(host: type, name: str, resources: ActorResources, config: object, placement: Any) -> Any:
    """A named actor running `host(config)`, with the resources the cluster config declares;
    the running one of that name if there is one (what a restarted controller adopts).

    Detached, so that it does not share the fate of the controller that created it: Ray
    would otherwise end every service with a dying controller. `stop` ends them."""
    return ray.remote(host).options(name=name, namespace=NAMESPACE, scheduling_strategy=placement,
                                    get_if_exists=True, lifetime="detached", **resources.options()).remote(config)


def on_node(node_id: str, soft: bool = False) -> NodeAffinitySchedulingStrategy:
    """`soft`: placed there while the node lives, elsewhere when Ray restarts it after a loss."""
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=soft)


class Controller:
    def __init__(self, config: ClusterConfig, poll_s: float = 1.0):
        """Runs on the head node (see `cluster.launch`). Recall shards and rankers spread over
        the nodes; the gateways stay on the head node, whose disk holds the SQLite event log,
        unless the store is on a database server and `gateways_per_node` puts them everywhere.

        Ray restarts a controller that dies. The new one reads what was serving from the event
        log's file, adopts the running services by name (`start` is idempotent) and watches
        them again; meanwhile the services go on answering on their own."""
        self.config = config
        self.head_node = ray.get_runtime_context().get_node_id()
        self.poll_s = poll_s
        self.serving_bundle = str(config.bundle)
        self.serving_version = read_manifest(config.bundle)["version"]
        # Every version this cluster has served, oldest first: what `recfunnel versions` lists
        # and `recfunnel rollback` can return to.
        self.history: list[dict[str, Any]] = [self._version_entry(self.serving_bundle, self.serving_version)]
        self.records: dict[str, ServiceRecord] = {}
        self.loop: Any = None  # the feedback loop's actor, when the config has one
        self._watcher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one reconcile or swap at a time
        self.adopting = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        # Set once a restarted controller has adopted the services: until then its records are
        # partial, and a status read would show a cluster with services missing.
        self._adopted: asyncio.Event | None = asyncio.Event() if self.adopting else None
        if self.adopting:
            saved = self._saved_state()
            if saved is not None:
                self.serving_bundle, self.serving_version = saved["serving_bundle"], saved["serving_version"]
                self.history = saved["history"]
            # Queued behind this constructor: adopt the services and watch them again. Ray may
            # refuse a call sent while this actor still shows as restarting (it then fails at
            # once, and a status read would wait for an adoption that never runs); retried, it
            # runs once the actor is alive. `start` is idempotent, so a repeat changes nothing.
            ray.get_runtime_context().current_actor.start.options(max_task_retries=-1).remote()

    def _saved_state(self) -> dict[str, Any] | None:
        events = open_event_store(self.config.store_location())
        try:
            saved = events.setting(CONTROLLER_STATE)
        finally:
            events.close()
        return None if saved is None else dict(json.loads(saved))

    def _save_state(self) -> None:
        """What a restarted controller needs: the serving bundle and version, the history."""
        events = open_event_store(self.config.store_location())
        try:
            events.set_setting(CONTROLLER_STATE, json.dumps({
                "serving_bundle": self.serving_bundle, "serving_version": self.serving_version,
                "history": self.history}))
        finally:
            events.close()

    # ---- start and stop ------------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Create every service (or adopt the running one of its name) and start it; returns
        the endpoints once all answer. Running it again changes nothing that runs."""
        try:
            return await self._create_or_adopt()
        finally:
            if self._adopted is not None:
                self._adopted.set()

    async def _create_or_adopt(self) -> dict[str, Any]:
        config = self.config
        # What the log holds now is what the serving version learnt from; the feedback loop
        # (started now or later, by `up` or `recfunnel loop`) learns from what comes after.
        events = open_event_store(config.store_location())
        try:
            mark_feedback_start(events)
        finally:
            events.close()
        for n in range(config.num_shards):
            name = f"recfunnel-recall-{n}"
            recall = RecallConfig(bundle=config.bundle, shard_id=n, num_shards=config.num_shards, host=config.host,
                                  internal_token=config.internal_token)
            self.records[name] = ServiceRecord(name, "recall", service_actor(
                RecallShardHost, name, config.shard_resources, recall, "SPREAD"))
        ranking = RankingConfig(bundle=config.bundle, host=config.host, threads=config.ranker_threads,
                                internal_token=config.internal_token)
        for n in range(config.ranker_replicas):
            name = f"recfunnel-ranking-{n}"
            self.records[name] = ServiceRecord(name, "ranking", service_actor(
                RankingHost, name, config.ranker_resources, ranking, "SPREAD"))
        backends = [r for r in self.records.values() if r.role != "gateway"]
        await asyncio.gather(*(asyncio.wait_for(r.actor.start.remote(), START_TIMEOUT_S) for r in backends))
        for record in backends:
            await self._describe(record)
        # Every gateway on the head node, where the SQLite event log they share is, or on every
        # node with a database server store. With a fixed port the gateways of a node all listen
        # on it (gRPC sets SO_REUSEPORT) and the kernel spreads clients' connections over them:
        # the gateway's Python work scales by processes.
        gateway = GatewayConfig(recall_addresses=tuple(self.shard_addresses()),
                                ranking_addresses=tuple(self.ranking_addresses()), db_path=config.db_path,
                                db_url=config.db_url, host=config.host, port=config.gateway_port, tokens=config.tokens,
                                internal_token=config.internal_token, tls=config.tls, admission=config.admission,
                                paging=config.paging, exposures=config.exposures, exploration=config.exploration,
                                feedback=config.feedback,
                                experiments=config.experiments)
        for n, node in enumerate(self.gateway_nodes()):
            name = f"recfunnel-gateway-{n}"
            self.records[name] = ServiceRecord(name, "gateway", service_actor(
                GatewayHost, name, config.gateway_resources, gateway, on_node(node, soft=config.gateways_everywhere)))
        for record in self.gateways():
            await asyncio.wait_for(record.actor.start.remote(), START_TIMEOUT_S)
            await self._describe(record)
        if config.loop is not None:
            # Beside the gateways: it reads the event log's SQLite file on this node's disk.
            self.loop = ray.remote(LoopHost).options(
                name=LOOP_NAME, namespace=NAMESPACE, num_cpus=0, max_restarts=-1, max_concurrency=4, get_if_exists=True,
                lifetime="detached",
                scheduling_strategy=on_node(self.head_node)).remote(config.loop.resolved(),
                                                                    config.store_location(),
                                                                    CONTROLLER_NAME, NAMESPACE)
        if self.adopting:  # services may have restarted while no controller watched them
            for record in self.records.values():
                if record.model_version != self.serving_version and record.role != "gateway":
                    await self._load_serving_version(record)
            replayed = await asyncio.wait_for(self.gateways()[0].actor.replay_catalogue.remote(), START_TIMEOUT_S)
            log.info("controller restarted: %d services adopted, %d catalogue changes replayed",
                     len(self.records), replayed)
        self._save_state()
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self.endpoints()

    async def stop(self) -> None:
        """Stop the gateway first so no request reaches a stopped backend, then the rest."""
        if self._watcher is not None:
            self._watcher.cancel()
        if self.loop is not None:
            ray.kill(self.loop, no_restart=True)  # a round in flight is abandoned; its bundle never served
            self.loop = None
        order = sorted(self.records.values(), key=lambda r: r.role != "gateway")
        for record in order:
            try:
                await asyncio.wait_for(record.actor.stop.remote(), CALL_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - a dead actor has nothing left to stop
                log.warning("stopping %s: %s", record.name, error)
            ray.kill(record.actor, no_restart=True)
        self.records.clear()

    # ---- what operators and the CLI ask --------------------------------------------------
    def shard_addresses(self) -> list[str]:
        return [r.address for r in self.records.values() if r.role == "recall"]

    def ranking_addresses(self) -> list[str]:
        return [r.address for r in self.records.values() if r.role == "ranking"]

    def gateway_nodes(self) -> list[str]:
        """The node of each gateway: with the store on a database server, `gateways_per_node`
        on every live node, the head node's first; with the SQLite file, `gateways` on the
        head node, whose disk holds it."""
        config = self.config
        if not config.gateways_everywhere:
            return [self.head_node] * config.gateways
        others = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != self.head_node)
        return [node for node in [self.head_node, *others] for _ in range(config.gateways_per_node)]

    def gateways(self) -> list[ServiceRecord]:
        return [r for r in self.records.values() if r.role == "gateway"]

    def endpoints(self) -> dict[str, Any]:
        gateways = [g.address for g in self.gateways()]
        return {"gateway": gateways[0] if gateways else "", "gateways": gateways, "recall": self.shard_addresses(),
                "ranking": self.ranking_addresses(), "model_version": self.serving_version,
                "bundle": self.serving_bundle, "db": str(self.config.store_location())}

    async def status(self) -> dict[str, Any]:
        if self._adopted is not None:
            await asyncio.wait_for(self._adopted.wait(), START_TIMEOUT_S)
        return {**self.endpoints(), "services": [r.to_dict() for r in self.records.values()],
                "loop": await self.loop_status()}

    async def loop_status(self) -> dict[str, Any] | None:
        """Where the feedback loop stands, None without one."""
        if self.loop is None:
            return None
        try:
            described: dict[str, Any] = await asyncio.wait_for(self.loop.describe.remote(), CALL_TIMEOUT_S)
            return described
        except Exception as error:  # noqa: BLE001 - restarting: say so rather than fail the status
            return {"running": False, "error": f"{type(error).__name__}: {error}"}

    async def swap(self, bundle_path: str) -> dict[str, Any]:
        """Roll the cluster to another bundle with no failed request: the first gateway loads
        it on every service, each gateway replays the catalogue changes onto it and switches,
        then the old version is unloaded once drained. Restarted services follow it."""
        async with self._lock:
            started = time.monotonic()
            gateways = self.gateways()
            version = await asyncio.wait_for(gateways[0].actor.load_version.remote(bundle_path), START_TIMEOUT_S)
            switched = [await asyncio.wait_for(g.actor.switch_version.remote(version), START_TIMEOUT_S)
                        for g in gateways]
            previous, replayed = switched[0]
            self.serving_bundle, self.serving_version = bundle_path, version
            self.history.append(self._version_entry(bundle_path, version))
            self._save_state()
            for old in {p for p, _ in switched} - {version}:
                await asyncio.wait_for(gateways[0].actor.retire_version.remote(old), START_TIMEOUT_S)
            for record in self.records.values():  # so that a status read now shows the new version
                await self._describe(record)
            return {"model_version": version, "previous_version": previous, "replayed_changes": replayed,
                    "seconds": time.monotonic() - started}

    def versions(self) -> list[dict[str, Any]]:
        """Each version served, oldest first, with its bundle, its training metrics and whether it serves now."""
        return [{**entry, "serving": entry["version"] == self.serving_version} for entry in self.history]

    async def rollback(self, version: str) -> dict[str, Any]:
        """Serve an earlier version again, by the same live swap."""
        earlier = [e for e in self.history if e["version"] == version]
        if not earlier:
            known = ", ".join(dict.fromkeys(e["version"] for e in self.history))
            raise ValueError(f"version {version!r} was never served here; served: {known}")
        if version == self.serving_version:
            raise ValueError(f"version {version!r} is serving already")
        return await self.swap(earlier[-1]["bundle"])

    @staticmethod
    def _version_entry(bundle_path: str, version: str) -> dict[str, Any]:
        manifest = read_manifest(Path(bundle_path))
        return {"version": version, "bundle": bundle_path, "metrics": manifest.get("metrics", {}),
                "served_since": time.time()}

    # ---- watching ------------------------------------------------------------------------
    async def _describe(self, record: ServiceRecord) -> bool | None:
        """Refresh a record from its host: True when it runs in a new process (a restart, which
        it counts), False when not, None when the host did not answer."""
        try:
            info = await asyncio.wait_for(record.actor.describe.remote(), CALL_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - dead, restarting or busy: try again next pass
            record.state = "UNREACHABLE"
            return None
        restarted = bool(record.pid) and info["pid"] != record.pid
        record.restarts += restarted
        record.address, record.pid, record.node_id = info["address"], info["pid"], info["node_id"]
        record.model_version, record.loaded_versions = info["model_version"], info["loaded_versions"]
        record.rss_bytes = info["rss_bytes"]
        record.admission = info.get("admission", {})
        record.state = "ALIVE" if record.address else "STARTING"
        return restarted

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                async with self._lock:
                    await self.reconcile()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad pass
                log.exception("reconcile failed")

    async def reconcile(self) -> None:
        """Bring every restarted service back into the cluster."""
        restarted = False
        for record in [r for r in self.records.values() if r.role != "gateway"]:
            if not await self._start(record, record.actor.start.remote()):
                continue
            if await self._describe(record):
                restarted = True
                if record.model_version != self.serving_version:
                    await self._load_serving_version(record)
        replay_through = None
        for gateway in self.gateways():
            if not await self._start(gateway, gateway.actor.start_with.remote(self.shard_addresses(),
                                                                              self.ranking_addresses())):
                continue
            if await self._describe(gateway) or restarted:
                replay_through = gateway
        if replay_through is not None:
            # A service that started again from its bundle lacks the live catalogue changes;
            # they are idempotent, so replaying them through one gateway serves them all.
            replayed = await asyncio.wait_for(replay_through.actor.replay_catalogue.remote(), START_TIMEOUT_S)
            log.info("services back in the cluster; %d catalogue changes replayed", replayed)

    async def _start(self, record: ServiceRecord, call: Any) -> bool:
        """Await a host's start call (it starts the service in a rebuilt actor); False if it failed."""
        try:
            await asyncio.wait_for(call, START_TIMEOUT_S)
            return True
        except Exception as error:  # noqa: BLE001 - dead or restarting: try again next pass
            record.state = "UNREACHABLE"
            log.warning("%s did not start: %s", record.name, error)
            return False

    async def _load_serving_version(self, record: ServiceRecord) -> None:
        client = (GrpcRecall if record.role == "recall" else GrpcRanking)(record.address, self.config.internal_token)
        try:
            await client.load_version(self.serving_bundle, START_TIMEOUT_S)
        finally:
            await client.close()
        await self._describe(record)
