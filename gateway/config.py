"""Configuration of the gateway and the limits of its public fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.admission import AdmissionConfig
from gateway.experiments import Experiment
from gateway.exposures import ExposureConfig
from gateway.propensity import ExplorationConfig
from protos.auth import TlsFiles
from recdata.feedback import EVERY_TYPE_POSITIVE, EventTypes

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class Limits:
    """Allowed ranges of the public request fields; errors quote them."""

    max_k: int = 1000
    max_id_bytes: int = 256
    max_list_items: int = 1000      # exclude_item_ids, context_item_ids
    max_events: int = 1000          # per Feedback call
    max_items: int = 1000           # per UpsertItems / DeleteItems call
    max_text_bytes: int = 16_384
    max_tags: int = 32
    max_properties: int = 64        # per item
    max_filter_tags: int = 32       # each of tags_any, tags_all, tags_none
    max_filter_parts: int = 16      # ranges, and equals, per filter
    max_filter_values: int = 100    # any_of values of one equals
    max_similar_to: int = 100       # SimilarItems item_ids
    max_page_size: int = 1000
    # Whole request; a full UpsertItems (max_items texts of max_text_bytes) fits. Larger
    # messages, up to the transport's cap, are refused by this check with INVALID_ARGUMENT;
    # beyond the cap gRPC itself answers RESOURCE_EXHAUSTED.
    max_message_bytes: int = 20 * 1024 * 1024


@dataclass(frozen=True)
class PagingConfig:
    """Page sessions: the ranked list a page token continues, held by the gateway that issued it."""

    ttl_s: float = 1800.0        # a token unused this long is forgotten
    max_sessions: int = 100_000  # the least recently used go first beyond this
    pages_ahead: int = 5         # pages ranked at once; the list is extended when they are used up


@dataclass(frozen=True)
class GatewayConfig:
    recall_addresses: tuple[str, ...]
    ranking_addresses: tuple[str, ...]  # replicas of the ranking service, same versions
    db_path: Path = Path("recfunnel.sqlite")
    db_url: str = field(default="", repr=False)  # postgresql://…: the store on that server, not db_path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # Candidates asked of every shard per channel; the merged funnel keeps each channel's
    # quota so no channel starves the others.
    channel_budgets: tuple[tuple[str, int], ...] = (
        ("sequential", 100), ("semantic", 20), ("item2item", 20), ("popular", 10))
    history_length: int = 200       # most recent events read per user
    default_deadline_s: float = 1.0 # budget when the client sets no deadline
    explain_top: int = 3            # because_item_ids per item when explain is set
    # After a swap, how long the old version stays loaded for requests that started on it.
    swap_drain_s: float = 5.0
    limits: Limits = field(default_factory=Limits)
    paging: PagingConfig = field(default_factory=PagingConfig)
    exposures: ExposureConfig = field(default_factory=ExposureConfig)
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)  # swapped pairs, for position bias
    feedback: EventTypes = EVERY_TYPE_POSITIVE  # which event types are history, which keep items out
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    experiments: tuple[Experiment, ...] = ()  # the running A/B experiment, `[[experiments]]`; at most one
    experiment_poll_s: float = 2.0  # how often the store's experiment setting (start / stop) is re-read
    # Bearer tokens clients must send; empty = open (the embedded demo on loopback only).
    tokens: tuple[str, ...] = field(default=(), repr=False)
    internal_token: str | None = field(default=None, repr=False)  # sent to recall and ranking
    tls: TlsFiles | None = None  # certificate and key of the public port; None = plaintext

    def store_location(self) -> str | Path:
        return self.db_url or self.db_path

    def __post_init__(self) -> None:
        if not self.recall_addresses:
            raise ValueError("at least one recall shard address is needed")
        if not self.ranking_addresses:
            raise ValueError("at least one ranking service address is needed")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in 0..65535")
        if self.default_deadline_s <= 0:
            raise ValueError(f"default_deadline_s={self.default_deadline_s} must be > 0")
        if len(self.experiments) > 1:
            raise ValueError(f"{len(self.experiments)} experiments given; one runs at a time")
        if self.experiment_poll_s <= 0:
            raise ValueError(f"experiment_poll_s={self.experiment_poll_s} must be > 0")
        if any(k < 0 for _, k in self.channel_budgets):
            raise ValueError("channel budgets must be >= 0")
