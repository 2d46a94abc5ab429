"""Where and how many: shard count, replicas and each actor's Ray resources."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from cluster.loop import LoopConfig
from gateway.admission import AdmissionConfig
from gateway.config import DEFAULT_PORT, PagingConfig
from gateway.experiments import Experiment, experiments_from_config
from gateway.exposures import ExposureConfig
from gateway.propensity import ExplorationConfig
from protos.auth import TlsFiles, tokens_from_file
from recdata.feedback import EVERY_TYPE_POSITIVE, EventTypes

NODE_IP = "node-ip"  # as `host`: each service binds its node's cluster address (multi-node)


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
    db_path: Path = Path("recfunnel.sqlite")      # the embedded SQLite event store, on the head node
    db_url: str = field(default="", repr=False)   # postgresql://…: the store on that server instead
    num_shards: int = 2
    ranker_replicas: int = 1   # ranking services holding the same versions; gateways spread calls over them
    gateways: int = 1          # gateway processes on the head node, sharing the public port and the event log
    # With a database server store (db_url): this many gateways on every node instead (0 = off).
    gateways_per_node: int = 0
    host: str = "127.0.0.1"
    gateway_port: int = DEFAULT_PORT
    shard_resources: ActorResources = field(default_factory=ActorResources)
    ranker_resources: ActorResources = field(default_factory=lambda: ActorResources(num_cpus=0.5))
    gateway_resources: ActorResources = field(default_factory=ActorResources)
    ranker_threads: int = 1
    # Bearer tokens the gateway accepts; empty = open, which only the embedded demo on
    # loopback uses (`recfunnel up` refuses to start open unless told --no-auth).
    tokens: tuple[str, ...] = field(default=(), repr=False)
    tls: TlsFiles | None = None  # certificate and key of the gateway's public port
    # What the gateway and the controller send the recall and ranking services, which accept
    # nothing else; a fresh random one per cluster unless the config names one.
    internal_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    loop: LoopConfig | None = None  # the feedback loop actor; None = no loop
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)  # each gateway's, `[admission]`
    paging: PagingConfig = field(default_factory=PagingConfig)  # each gateway's page sessions, `[paging]`
    exposures: ExposureConfig = field(default_factory=ExposureConfig)  # each gateway's exposure log, `[exposures]`
    # The share of answers that swap a pair of places to measure position bias, `[exploration]`.
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    # What each event type means to the gateways' history reads and the loop, `[feedback]`.
    feedback: EventTypes = EVERY_TYPE_POSITIVE
    experiments: tuple[Experiment, ...] = ()  # the gateways' A/B experiment, `[[experiments]]`

    def __post_init__(self) -> None:
        if self.loop is not None and self.loop.feedback != self.feedback:  # one meaning of each type
            object.__setattr__(self, "loop", replace(self.loop, feedback=self.feedback))
        if self.loop is not None and self.loop.exploration_depth != self.exploration.depth:  # the places swapped
            object.__setattr__(self, "loop", replace(self.loop, exploration_depth=self.exploration.depth))
        if not 1 <= self.num_shards <= 256:
            raise ValueError(f"num_shards={self.num_shards} must be in 1..256")
        if not 1 <= self.ranker_replicas <= 64 or not 1 <= self.gateways <= 64:
            raise ValueError(f"ranker_replicas={self.ranker_replicas} and gateways={self.gateways} must be in 1..64")
        if not 0 <= self.gateways_per_node <= 64:
            raise ValueError(f"gateways_per_node={self.gateways_per_node} must be in 0..64")
        if self.gateways_per_node and not self.db_url:
            raise ValueError("gateways_per_node needs the event store on a database server (db_url): "
                             "the SQLite file is on the head node's disk, where the gateways stay")

    @classmethod
    def from_file(cls, path: Path | None, **overrides: Any) -> ClusterConfig:
        """A TOML file's settings (see deploy/cluster.toml), then the non-None `overrides`.

        Top-level keys are this class's fields; `[shard_resources]`, `[ranker_resources]`
        and `[gateway_resources]` tables set num_cpus / num_gpus / max_restarts, `[admission]`
        the gateways' admission control (`gateway.admission.AdmissionConfig`), `[paging]` their
        page sessions (`gateway.config.PagingConfig`), `[exposures]` their exposure log
        (`gateway.exposures.ExposureConfig`), `[exploration]` their swapped pairs
        (`gateway.propensity.ExplorationConfig`), `[feedback]` what each event type means
        (`recdata.feedback.EventTypes`), `[[experiments]]` the A/B experiment the gateways run
        (`gateway.experiments.Experiment`). Secrets are
        never in the file itself: `tokens_file` and `internal_token_file` name files holding
        them, and `tls_cert` / `tls_key` the gateway's PEM files.
        """
        values: dict[str, Any] = tomllib.loads(path.read_text("utf-8")) if path else {}
        secret = {"tokens", "internal_token", "tls"}
        allowed = {f.name for f in fields(cls)} - secret | {"tokens_file", "internal_token_file", "tls_cert", "tls_key"}
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
        if "tokens_file" in values:
            values["tokens"] = tokens_from_file(Path(values.pop("tokens_file")))
        if "internal_token_file" in values:
            values["internal_token"] = tokens_from_file(Path(values.pop("internal_token_file")))[0]
        if "tls_cert" in values or "tls_key" in values:
            if not {"tls_cert", "tls_key"} <= set(values):
                raise ValueError(f"{path}: tls_cert and tls_key go together")
            values["tls"] = TlsFiles(Path(values.pop("tls_cert")), Path(values.pop("tls_key")))
        for key in ("shard_resources", "ranker_resources", "gateway_resources"):
            if key in values:
                values[key] = ActorResources(**values[key])
        if "loop" in values:
            values["loop"] = LoopConfig.from_dict(values["loop"])
        if "admission" in values:
            values["admission"] = AdmissionConfig(**values["admission"])
        if "paging" in values:
            values["paging"] = PagingConfig(**values["paging"])
        if "exposures" in values:
            values["exposures"] = ExposureConfig(**values["exposures"])
        if "exploration" in values:
            values["exploration"] = ExplorationConfig.from_dict(values["exploration"])
        if "feedback" in values:
            values["feedback"] = EventTypes.from_dict(values["feedback"])
        if "experiments" in values:
            values["experiments"] = experiments_from_config(values["experiments"])
        for key in ("bundle", "db_path"):
            if key in values:
                values[key] = Path(values[key])
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "bundle" not in values:
            raise ValueError("setting 'bundle' is needed (config file or options)")
        if not {"db_path", "db_url"} & set(values):
            raise ValueError("an event store is needed: db_path or db_url (config file or --db)")
        return cls(**values)

    def store_location(self) -> str | Path:
        return self.db_url or self.db_path

    @property
    def gateways_everywhere(self) -> bool:
        """Gateways on every node: only a database server store allows it."""
        return bool(self.db_url and self.gateways_per_node)

    def with_gpus(self, available: float) -> ClusterConfig:
        """Give the ranker a GPU when the Ray cluster has one and the config asked for none."""
        if available >= 1 and self.ranker_resources.num_gpus == 0:
            return replace(self, ranker_resources=replace(self.ranker_resources, num_gpus=1.0))
        return self
