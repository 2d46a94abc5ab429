"""`recfunnel loadtest`: open-loop load on any recfunnel gateway, reported as JSON and a PNG.

The request mix (known and unknown users, context items, exclusions, feedback) comes from a
mix file or, by default, from MovieLens-100K's ids, the catalogue the embedded demo serves.
A mix file (TOML or JSON) may set:

    k = 10
    users_file = "users.txt"     # or users = ["u1", ...]: ids the deployment knows
    items_file = "items.txt"     # or items = ["i1", ...]
    [weights]                    # relative shares of the request kinds (KINDS)
    known = 0.3
    feedback = 0.2
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from bench.harness import Call, LoadResult, open_loop
from protos.auth import call_metadata, open_channel
from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc
from protos.serving import CHANNEL_OPTIONS

KINDS = ("known", "known_exclude", "known_context", "unknown", "unknown_context", "feedback")
DEFAULT_WEIGHTS = {"known": 0.3, "known_exclude": 0.1, "known_context": 0.15, "unknown": 0.15,
                   "unknown_context": 0.1, "feedback": 0.2}


@dataclass(frozen=True)
class Mix:
    users: tuple[str, ...]
    items: tuple[str, ...]
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    k: int = 10

    def __post_init__(self) -> None:
        if not self.users or not self.items:
            raise ValueError("a mix needs at least one user id and one item id")
        unknown = set(self.weights) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown request kinds {sorted(unknown)}; allowed: {', '.join(KINDS)}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError("weights must be >= 0 and not all 0")
        if not 1 <= self.k <= 1000:
            raise ValueError(f"k={self.k} must be in 1..1000")

    @classmethod
    def from_file(cls, path: Path) -> Mix:
        text = path.read_text("utf-8")
        values: dict[str, Any] = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        folder = path.parent
        for name in ("users", "items"):
            listed = values.pop(f"{name}_file", None)
            if listed is not None:
                values[name] = [line.strip() for line in (folder / listed).read_text("utf-8").splitlines()
                                if line.strip()]
            values[name] = tuple(values.get(name, ()))
        allowed = {"users", "items", "weights", "k"}
        if set(values) - allowed:
            raise ValueError(f"{path}: unknown settings {sorted(set(values) - allowed)}")
        return cls(**values)

    @classmethod
    def movielens(cls) -> Mix:
        from recdata.movielens import load_ml100k

        dataset = load_ml100k()
        return cls(tuple(dataset.user_ids), tuple(dataset.item_ids))

    def requests(self, count: int, seed: int) -> list[Any]:
        """`count` requests drawn by the weights: RecommendRequest or FeedbackRequest."""
        rng = np.random.default_rng(seed)
        kinds = list(self.weights)
        shares = np.asarray([self.weights[k] for k in kinds], dtype=np.float64)
        drawn = rng.choice(len(kinds), size=count, p=shares / shares.sum())
        out: list[Any] = []
        for n, index in enumerate(drawn):
            kind = kinds[index]
            known_user = self.users[rng.integers(len(self.users))]
            items = [self.items[i] for i in rng.integers(len(self.items), size=5)]
            if kind == "feedback":
                # A fresh idempotency key per event: a retry by the caller would reuse it.
                out.append(recommender_pb2.FeedbackRequest(events=[recommender_pb2.Event(
                    user_id=known_user, item_id=items[0], event_type="click", event_id=uuid.uuid4().hex)]))
                continue
            out.append(recommender_pb2.RecommendRequest(
                user_id=known_user if kind.startswith("known") else f"loadtest-visitor-{seed}-{n}", k=self.k,
                exclude_item_ids=items[:3] if kind.endswith("exclude") else [],
                context_item_ids=items[3:] if kind.endswith("context") else []))
        return out


@dataclass(frozen=True)
class LoadTest:
    target: str
    qps: float
    duration_s: float
    token: str | None = None
    tls_ca: Path | None = None
    timeout_s: float = 1.0     # each call's deadline, which the gateway turns into its budget
    warmup_s: float = 2.0      # unmeasured load before the run, at the same rate
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.qps <= 100_000:
            raise ValueError(f"qps={self.qps} must be in (0, 100000]")
        if not 0 < self.duration_s <= 86_400:
            raise ValueError(f"duration={self.duration_s} must be in (0, 86400] seconds")


def mix_call(stub: recommender_pb2_grpc.RecommenderStub, test: LoadTest,
             acknowledged: list[recommender_pb2.Event] | None = None) -> Call:
    """Sends one request of a mix (Recommend or Feedback) with the test's deadline and token;
    the acknowledged Feedback events go to `acknowledged` when given."""
    metadata = call_metadata(test.token)

    async def call(request: Any) -> bool:
        if isinstance(request, recommender_pb2.FeedbackRequest):
            await stub.Feedback(request, timeout=test.timeout_s, metadata=metadata)
            if acknowledged is not None:
                acknowledged.extend(request.events)
            return False
        reply = await stub.Recommend(request, timeout=test.timeout_s, metadata=metadata)
        return bool(reply.degraded)

    return call


async def run_load(test: LoadTest, mix: Mix) -> LoadResult:
    """Warm up, then the measured open-loop run."""
    async with open_channel(test.target, tls_ca=test.tls_ca, options=CHANNEL_OPTIONS) as channel:
        call = mix_call(recommender_pb2_grpc.RecommenderStub(channel), test)

        if test.warmup_s > 0:
            await open_loop(call, mix.requests(max(1, int(test.qps * test.warmup_s)), test.seed + 1), test.qps,
                            test.warmup_s, test.seed + 1)
        count = min(int(test.qps * test.duration_s * 1.2) + 10, 200_000)  # cycled beyond this
        return await open_loop(call, mix.requests(count, test.seed), test.qps, test.duration_s, test.seed)


def report(test: LoadTest, result: LoadResult) -> dict[str, Any]:
    kinds = sorted({s.kind for s in result.samples})
    return {"target": test.target, "duration_s": test.duration_s, **result.summary(),
            "by_kind": {kind: result.summary(kind) for kind in kinds}}


def soak(test: LoadTest, mix: Mix, read_status: Any, warmup_s: float = 60.0) -> tuple[dict[str, Any], LoadResult]:
    """A long run against a cluster started with `recfunnel up`: the load report, and each
    service actor's resident memory after a warm-up at the same rate and at the end.

    `read_status` returns `recfunnel status --json`'s dict (it connects to Ray); growth is
    measured from the warmed-up state, since the first minutes fill caches and arenas."""
    import asyncio
    from dataclasses import replace

    asyncio.run(run_load(replace(test, duration_s=warmup_s, warmup_s=0), mix))
    before = {s["name"]: s for s in read_status()["services"]}
    result = asyncio.run(run_load(replace(test, warmup_s=0), mix))
    after = {s["name"]: s for s in read_status()["services"]}
    memory = {name: {"rss_mb_after_warmup": round(before[name]["rss_bytes"] / 2**20, 1),
                     "rss_mb_at_end": round(after[name]["rss_bytes"] / 2**20, 1),
                     "growth": round(after[name]["rss_bytes"] / before[name]["rss_bytes"] - 1, 4),
                     "restarts": after[name]["restarts"] - before[name]["restarts"]}
              for name in before if name in after}
    total_before = sum(before[n]["rss_bytes"] for n in memory)
    total_after = sum(after[n]["rss_bytes"] for n in memory)
    return {**report(test, result), "warmup_s": warmup_s, "memory": memory,
            "rss_growth_total": round(total_after / total_before - 1, 4),
            "rss_growth_max": max(m["growth"] for m in memory.values())}, result
