"""Where and how many: shard count, replicas and each actor's Ray resources."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import DEFAULT_PORT


@dataclass(frozen=True)
class ActorResources:
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    max_restarts: int = -1  # Ray restarts a dead service actor without limit

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")

    def options(self) -> dict[str, float | int]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_restarts": self.max_restarts}


@dataclass(frozen=True)
class ClusterConfig:
    bundle: Path
    db_path: Path
    num_shards: int = 2
    host: str = "127.0.0.1"
    gateway_port: int = DEFAULT_PORT
    shard_resources: ActorResources = field(default_factory=ActorResources)
    ranker_resources: ActorResources = field(default_factory=lambda: ActorResources(num_cpus=0.5))
    gateway_resources: ActorResources = field(default_factory=ActorResources)
    ranker_threads: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.num_shards <= 256:
            raise ValueError(f"num_shards={self.num_shards} must be in 1..256")
