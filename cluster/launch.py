"""Start the cluster on Ray: the controller actor, which creates and watches every service."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray

from cluster.config import ClusterConfig
from cluster.controller import CONTROLLER_NAME, NAMESPACE, START_TIMEOUT_S, Controller, on_node

log = logging.getLogger(__name__)


@dataclass
class RunningCluster:
    controller: Any
    shard_addresses: list[str]
    ranking_addresses: list[str]
    gateway_addresses: list[str]

    @property
    def gateway_address(self) -> str:
        """The first gateway's address (all of them serve the same)."""
        return self.gateway_addresses[0]

    def actor(self, name: str) -> Any:
        """A service actor by its name, e.g. "recfunnel-ranking-0"."""
        return ray.get_actor(name, namespace=NAMESPACE)

    @property
    def ranker(self) -> Any:
        return self.actor("recfunnel-ranking-0")

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = ray.get(self.controller.status.remote(), timeout=30)
        return status

    def stop(self) -> None:
        ray.get(self.controller.stop.remote(), timeout=60)
        ray.kill(self.controller, no_restart=True)  # a stopped cluster's controller stays down


def start_cluster(config: ClusterConfig, detached: bool = False, poll_s: float = 1.0) -> RunningCluster:
    """Start the controller and through it every service; returns once all of them answer.

    `detached` keeps the cluster running after this process exits (`recfunnel up`).
    """
    # The controller and the gateway live on this (the head) node: losing another node must
    # not take them with it.
    options: dict[str, Any] = {"name": CONTROLLER_NAME, "namespace": NAMESPACE, "num_cpus": 0,
                               "max_restarts": -1,
                               "scheduling_strategy": on_node(ray.get_runtime_context().get_node_id())}
    if detached:
        options["lifetime"] = "detached"
    controller_actor: Any = ray.remote(Controller)
    controller = controller_actor.options(**options).remote(config, poll_s)
    endpoints: dict[str, Any] = ray.get(controller.start.remote(), timeout=START_TIMEOUT_S)
    log.info("cluster up: %s", endpoints)
    return RunningCluster(controller, endpoints["recall"], endpoints["ranking"], endpoints["gateways"])


def find_cluster() -> RunningCluster:
    """The cluster a detached controller runs on the connected Ray cluster."""
    controller: Any = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    endpoints: dict[str, Any] = ray.get(controller.endpoints.remote(), timeout=30)
    return RunningCluster(controller, endpoints["recall"], endpoints["ranking"], endpoints["gateways"])
