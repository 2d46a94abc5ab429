"""Configuration of the ranking models, their training and the Ranking service."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ENCODERS = ("sasrec", "hstu")


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64            # item/user vector width; small catalogues need no more
    max_len: int = 50        # history positions the query encoder reads (SASRec's 50)
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    temperature: float = 0.07  # softmax temperature over cosine scores
    id_dropout: float = 0.1  # share of items whose ID embedding is hidden per step, so text
                             # alone must carry them: that is what serves cold-start items
    ranker_hidden: int = 64
    encoder: str = "sasrec"  # query encoder blocks: "sasrec" (softmax attention) or "hstu" (`ranking.query_encoder`)

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be positive and divisible by heads={self.heads}")
        if not 1 <= self.max_len <= 1000:
            raise ValueError(f"max_len={self.max_len} must be in 1..1000")
        if not 0 <= self.dropout < 1 or not 0 <= self.id_dropout < 1:
            raise ValueError("dropout and id_dropout must be in [0, 1)")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder={self.encoder!r} must be one of {', '.join(ENCODERS)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 100          # upper bound; early stopping usually ends sooner
    patience: int = 5          # epochs without better validation NDCG@10 before stopping
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    num_negatives: int = 1024  # uniform negatives per batch; >= catalogue means exact softmax
    content_loss_weight: float = 0.5  # weight of the same loss over content-only item vectors, which
                                      # is what makes items without interactions retrievable
    negative_feedback_weight: float = 1.0  # weight of the loss that ranks each target above the items
                                           # its user disliked (where the data has dislikes)
    ranker_epochs: int = 6     # upper bound (0: no ranker training; the data-size rule sets it when unset);
                               # patience usually ends it sooner
    ranker_patience: int = 3   # ranker epochs without beating its best before it stops; the first
                               # best is the funnel it starts from, so it trains until it beats that
    ranker_positions: int = 8  # training positions per user for the ranker (most recent)
    ranker_examples_per_epoch: int = 40_000  # sampled per epoch when users x positions is larger
    ranker_time_budget_s: float = 300.0      # stop the ranker phase after this many seconds
    ranker_cold_share: float = 0.3   # candidates shown as cold (content only, no popularity) while
                                     # the ranker trains, so cold items are not ranked as bad ones
    candidates_per_channel: tuple[tuple[str, int], ...] = (
        ("sequential", 100), ("semantic", 20), ("item2item", 20), ("popular", 10))
    seed: int = 0
    threads: int = 2           # torch intra-op threads; the build machines have 2 cores
    time_budget_s: float = 600.0  # stop the query-encoder phase after this many seconds
    use_text: bool = True      # False: ID-only items (no LM text, no tags, no item vectors, no semantic channel)
    use_vectors: bool = True   # False: leave the data's precomputed item vectors out (the ablation)
    recent_popularity: bool = True  # False: the popular channel ranks by all-time interactions only
    track_test: bool = False   # also measure test NDCG@10 after every epoch (for the training curve)
    validation_users: int = 10_000  # early stopping ranks this seeded sample of users against the whole
                                    # catalogue after every epoch (0 = every user): O(sample x items)
    test_users: int = 100_000  # the final test metrics rank this seeded sample (0 = every user); ranking
                               # every one of 10^6 users against 10^6 items would outlast training
    device: str | None = None  # "cpu" / "cuda[:N]"; None = CUDA when present

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
        if self.patience < 1 or self.ranker_patience < 1:
            raise ValueError("patience and ranker_patience must be >= 1")
        if self.negative_feedback_weight < 0 or self.content_loss_weight < 0:
            raise ValueError("negative_feedback_weight and content_loss_weight must be >= 0")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives={self.num_negatives} must be >= 1")
        if self.validation_users < 0:
            raise ValueError(f"validation_users={self.validation_users} must be >= 0 (0 = every user)")
        if self.test_users < 0:
            raise ValueError(f"test_users={self.test_users} must be >= 0 (0 = every user)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read_file(cls, path: Path) -> dict[str, Any]:
        """The settings a training config file (TOML) sets: training fields at the top level,
        model fields in a `[model]` table, e.g. `epochs = 20`, `[model] dim = 128`. An
        unknown name is refused."""
        import tomllib

        values = tomllib.loads(path.read_text("utf-8"))
        model = values.get("model", {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__)) + sorted(
            f"model.{k}" for k in set(model) - set(ModelConfig.__dataclass_fields__))
        if unknown:
            allowed = sorted(set(cls.__dataclass_fields__) - {"model"}) + sorted(
                f"model.{k}" for k in ModelConfig.__dataclass_fields__)
            raise ValueError(f"{path}: unknown settings {unknown}; allowed: {', '.join(allowed)}")
        return values

    @classmethod
    def from_file(cls, path: Path, **overrides: Any) -> TrainConfig:
        """A config file's settings over the defaults; `overrides` (the command line's explicit
        options) win over the file. Unset model fields keep their defaults."""
        return cls.from_dict({"model": {}, **cls.read_file(path), **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The inverse of `to_dict` (JSON lists back to tuples); unknown keys are ignored."""
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        if "model" in known:
            known["model"] = ModelConfig.from_dict(known["model"])
        if "candidates_per_channel" in known:
            known["candidates_per_channel"] = tuple((str(c), int(k)) for c, k in known["candidates_per_channel"])
        return cls(**known)


@dataclass(frozen=True)
class RankingConfig:
    bundle: Path
    host: str = "127.0.0.1"
    port: int = 0              # 0 = any free port
    threads: int = 1           # torch threads for inference
    max_history: int = 200     # history items read per request (the encoder keeps max_len)
    max_candidates: int = 2000
    max_batch_size: int = 32   # Encode / Rank requests scored in one model call; 1 = no batching
    max_batch_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    device: str | None = None  # "cuda" / "cpu"; None = CUDA when present
    new_item_slot: bool = True # lists of 5+ items keep a place for the best new item (no interactions yet)
    internal_token: str | None = field(default=None, repr=False)  # required of callers when set

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in 0..65535")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")
        if not 1 <= self.max_batch_size <= 1024:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be in 1..1024")
        if not 0 <= self.max_batch_wait_ms <= 100:
            raise ValueError(f"max_batch_wait_ms={self.max_batch_wait_ms} must be in 0..100")
