"""Place the services on Ray and wire them together: shards and ranker first, then the gateway."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray

from cluster.actors import GatewayHost, RankingHost, RecallShardHost
from cluster.config import ActorResources, ClusterConfig
from gateway.config import GatewayConfig
from ranking.config import RankingConfig
from retrieval.config import RecallConfig

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0


@dataclass
class RunningCluster:
    shards: list[Any]
    ranker: Any
    gateway: Any
    shard_addresses: list[str]
    ranking_address: str
    gateway_address: str

    def stop(self) -> None:
        """Stop the gateway first so no request reaches a stopped backend, then the rest."""
        ray.get(self.gateway.stop.remote(), timeout=30)
        ray.get([a.stop.remote() for a in [*self.shards, self.ranker]], timeout=30)
        for actor in [self.gateway, *self.shards, self.ranker]:
            ray.kill(actor, no_restart=True)


def _actor(host: type, name: str, resources: ActorResources, config: object) -> Any:
    """A named actor running `host(config)`, with the resources the cluster config declares."""
    return ray.remote(host).options(name=name, **resources.options()).remote(config)


def start_cluster(config: ClusterConfig) -> RunningCluster:
    """Start every service actor; returns once all of them answer on their ports."""
    shards = [
        _actor(RecallShardHost, f"recfunnel-recall-{n}", config.shard_resources,
               RecallConfig(bundle=config.bundle, shard_id=n, num_shards=config.num_shards, host=config.host))
        for n in range(config.num_shards)
    ]
    ranker = _actor(RankingHost, "recfunnel-ranking", config.ranker_resources,
                    RankingConfig(bundle=config.bundle, host=config.host, threads=config.ranker_threads))
    shard_addresses: list[str] = ray.get([s.start.remote() for s in shards], timeout=START_TIMEOUT_S)
    ranking_address: str = ray.get(ranker.start.remote(), timeout=START_TIMEOUT_S)
    gateway = _actor(GatewayHost, "recfunnel-gateway", config.gateway_resources,
                     GatewayConfig(recall_addresses=tuple(shard_addresses), ranking_address=ranking_address,
                                   db_path=config.db_path, host=config.host, port=config.gateway_port))
    gateway_address: str = ray.get(gateway.start.remote(), timeout=START_TIMEOUT_S)
    log.info("cluster up: gateway %s, shards %s, ranking %s", gateway_address, shard_addresses, ranking_address)
    return RunningCluster(shards, ranker, gateway, shard_addresses, ranking_address, gateway_address)
