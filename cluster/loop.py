"""The feedback loop: the cluster learns from the events it logs, without downtime.

A round takes the events logged since the loop began (every N new events, or every T
seconds when there are some), and
  1. adds them to the base data set, each user's newest event held out (`recdata.feedback`);
  2. fine-tunes from the serving version's weights with Ray Train (`cluster.train_ray`),
     writing a new bundle;
  3. judges both versions on the held-out recent events (full-ranking NDCG@10);
  4. rolls the new version out only if it is not worse: the controller's live swap loads it
     on every service (the shards build their indexes), switches, drains and unloads the
     old one. `recfunnel versions` then lists it with its metrics. With a canary
     (`[loop.canary]`, `cluster.canary`) it first serves a share of the users as an
     experiment, and is swapped in only if its online metric is not worse.

Where the loop stands lives in the event log's own SQLite file, so a restarted loop goes on
where it was. Events logged before the cluster first started on that log are taken to be in
the base data set already (the demo seeds the data set's history into the log that way).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from cluster.canary import CanaryConfig, run_canary
from gateway.events import EventStore, open_event_store
from gateway.propensity import estimate_propensity, inverse_propensity_factors
from ranking.config import TrainConfig
from recdata.bundle import MANIFEST, load_bundle, read_manifest
from recdata.channels import SEMANTIC
from recdata.dataset import Dataset
from recdata.feedback import (
    EVERY_TYPE_POSITIVE,
    EventTypes,
    WithFeedback,
    align_to_catalogue,
    recent_positions,
    with_feedback,
)
from recdata.sources import DataSource
from recdata.split import leave_last_two

log = logging.getLogger(__name__)

SINCE_SEQ = "loop.since_seq"    # events after this one are feedback the base data set lacks
JUDGED_SEQ = "loop.judged_seq"  # the last event a round has taken
LOOP_NAME = "recfunnel-loop"


@dataclass(frozen=True)
class LoopConfig:
    source: DataSource = field(default_factory=DataSource)  # the base data set the serving version learnt
    every_events: int = 1000       # a round once this many events are new...
    every_seconds: float = 3600.0  # ...or once this long has passed since the last round, with any new
    poll_s: float = 5.0
    encoder_epochs: int = 3        # fine-tuning epochs of each phase (early stopping may keep the old weights)
    ranker_epochs: int = 1
    workers: int = 1               # Ray Train replicas
    cpus_per_worker: float = 0.5   # beside the serving actors on a small machine
    use_gpu: bool = False
    tolerance: float = 0.0         # roll out when new NDCG@10 >= serving NDCG@10 - tolerance
    min_cases: int = 10            # held-out recent events needed to judge at all
    event_types: tuple[str, ...] = ()  # the event types learnt from; () = all, as the served history
    # What each type means (`[feedback]` of the cluster config, which sets it here): only
    # positive types are learnt from.
    feedback: EventTypes = EVERY_TYPE_POSITIVE
    # Position-debiased fine-tuning (`gateway.propensity`): each attributed click weighs 1 /
    # the propensity of the place it was shown at, estimated from the gateways' swapped pairs
    # (`[exploration]`); clipped at `propensity_clip`, self-normalised. Off by default.
    inverse_propensity: bool = False
    propensity_clip: float = 0.1
    click_types: tuple[str, ...] = ("click",)  # what the propensity estimate counts as a click
    exploration_depth: int = 10
    # A version that passed offline first serves a share of the users as an experiment, and
    # serves everyone only if its online metric is not worse (`cluster.canary`); off at share 0.
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    output: Path = Path("artifacts/loop")     # one bundle folder per round
    storage: Path = Path("ray-train/loop")    # Ray Train checkpoints, one run per round
    seed: int = 0

    def __post_init__(self) -> None:
        if self.every_events < 1 or self.every_seconds <= 0 or self.poll_s <= 0:
            raise ValueError("every_events must be >= 1, every_seconds and poll_s > 0")
        if self.encoder_epochs < 1 or self.ranker_epochs < 1:
            raise ValueError("encoder_epochs and ranker_epochs must be >= 1")
        if not 0 <= self.tolerance < 1 or self.min_cases < 1:
            raise ValueError("tolerance must be in [0, 1) and min_cases >= 1")
        if not 0 < self.propensity_clip <= 1 or not self.click_types or not 2 <= self.exploration_depth <= 100:
            raise ValueError(f"propensity_clip={self.propensity_clip} must be in (0, 1], click_types non-empty, "
                             f"exploration_depth={self.exploration_depth} in 2..100")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopConfig:
        """The `[loop]` table of a cluster config: these fields, with the data set given as
        `dataset`, or `interactions` / `items` / `item_column` / `format`."""
        values = dict(values)
        source = {k: values.pop(k) for k in ("dataset", "interactions", "items", "item_column", "format")
                  if k in values}
        for key in ("interactions", "items"):
            if key in source:
                source[key] = Path(source[key])
        for key in ("output", "storage"):
            if key in values:
                values[key] = Path(values[key])
        if "canary" in values:
            values["canary"] = CanaryConfig.from_dict(values["canary"])
        for key in ("event_types", "click_types"):
            if key in values:
                values[key] = tuple(values[key])
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"[loop]: unknown settings {sorted(unknown)}")
        return cls(source=DataSource(**source), **values)

    def resolved(self) -> LoopConfig:
        """Absolute paths, for an actor that may run in another folder."""
        source = self.source
        source = replace(source, interactions=source.interactions and source.interactions.resolve(),
                         items=source.items and source.items.resolve())
        return replace(self, source=source, output=self.output.resolve(), storage=self.storage.resolve())


def mark_feedback_start(events: EventStore) -> int:
    """Record, once per event log, that the events after the current last one are feedback
    the base data set lacks; returns that mark."""
    if events.setting(SINCE_SEQ) is None:
        events.set_setting(SINCE_SEQ, str(events.last_seq()))
    return int(events.setting(SINCE_SEQ) or 0)


class Serving(Protocol):
    """What the loop needs of the cluster: the serving bundle, and the live swap."""

    def serving_bundle(self) -> Path: ...

    def swap(self, bundle: Path) -> dict[str, Any]: ...


class ControllerServing:
    """`Serving` through the controller actor."""

    def __init__(self, controller: Any, timeout_s: float = 900.0):
        self.controller, self.timeout_s = controller, timeout_s

    def serving_bundle(self) -> Path:
        import ray

        return Path(ray.get(self.controller.endpoints.remote(), timeout=60)["bundle"])

    def swap(self, bundle: Path) -> dict[str, Any]:
        import ray

        report: dict[str, Any] = ray.get(self.controller.swap.remote(str(bundle)), timeout=self.timeout_s)
        return report


def fine_tune_config(manifest: dict[str, Any], loop: LoopConfig) -> TrainConfig:
    """The serving version's own training settings, cut to the loop's few epochs."""
    trained = TrainConfig.from_dict({**manifest.get("training", {}), "model": manifest["model"]})
    return replace(trained, epochs=loop.encoder_epochs, patience=loop.encoder_epochs, ranker_epochs=loop.ranker_epochs,
                   seed=loop.seed, track_test=False, threads=max(1, int(loop.cpus_per_worker)))


def judge(fed: WithFeedback, serving: Path, candidate: Path, budgets: dict[str, int], loop: LoopConfig
          ) -> dict[str, Any]:
    """Both versions on the held-out recent events: each user's newest logged event, with
    everything before it as history; full ranking over the catalogue."""
    import torch

    from ranking.evaluation import Evaluation, FunnelScorer

    split = leave_last_two(fed.dataset)
    cases = Evaluation(split, fed.dataset.num_items, validation=False, positions=recent_positions(split, fed.added))
    verdict: dict[str, Any] = {"cases": len(cases), "tolerance": loop.tolerance}
    if len(cases) < loop.min_cases:
        return {**verdict, "roll_out": False, "reason": f"{len(cases)} held-out recent events, "
                                                       f"fewer than min_cases={loop.min_cases}"}
    with torch.inference_mode():
        verdict["serving"] = cases.full(FunnelScorer.from_bundle(serving, budgets).funnel_scores)
        verdict["candidate"] = cases.full(FunnelScorer.from_bundle(candidate, budgets).funnel_scores)
    new, old = verdict["candidate"]["ndcg@10"], verdict["serving"]["ndcg@10"]
    verdict["roll_out"] = new >= old - loop.tolerance
    verdict["reason"] = f"held-out recent NDCG@10 {new:.4f} {'>=' if verdict['roll_out'] else '<'} " \
                        f"serving {old:.4f} - tolerance {loop.tolerance}"
    return verdict


class FeedbackLoop:
    """Rounds of fine-tune, judge and roll out; `run` starts one whenever one is due."""

    def __init__(self, config: LoopConfig, events: EventStore, serving: Serving, base: Dataset | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None):
        self.config = config
        self.on_round = on_round or (lambda report: None)
        self.events = events
        self.serving = serving
        self._base = base
        self.rounds: list[dict[str, Any]] = []
        self.last_round_at = time.time()
        self._lock = threading.Lock()  # one round at a time
        self.since_seq = mark_feedback_start(events)

    @property
    def judged_seq(self) -> int:
        return int(self.events.setting(JUDGED_SEQ) or self.since_seq)

    def pending(self) -> int:
        """Events logged since the last round took its events."""
        return self.events.last_seq() - self.judged_seq

    def due(self, now: float | None = None) -> bool:
        pending = self.pending()
        waited = (now or time.time()) - self.last_round_at
        return pending >= self.config.every_events or (pending > 0 and waited >= self.config.every_seconds)

    def base(self) -> Dataset:
        if self._base is None:
            self._base = self.config.source.load()
        return self._base

    def describe(self) -> dict[str, Any]:
        return {"since_seq": self.since_seq, "judged_seq": self.judged_seq, "pending": self.pending(),
                "rounds": len(self.rounds), "last_round": self.rounds[-1] if self.rounds else None}

    def run(self, stop: threading.Event, each_pass: Callable[[], None] = lambda: None) -> None:
        """A round whenever one is due, until `stop` is set; `each_pass` runs at every look."""
        while not stop.wait(self.config.poll_s):
            each_pass()
            if self.due():
                self.run_round()

    def run_round(self) -> dict[str, Any]:
        """One round over every event logged so far; returns what it did and why."""
        with self._lock:
            started = time.time()
            through = self.events.last_seq()
            try:
                report = self._round(through)
            except Exception as error:  # noqa: BLE001 - a failed round must not end the loop
                log.exception("feedback round failed")
                report = {"decision": "failed", "error": f"{type(error).__name__}: {error}"}
            else:
                self.events.set_setting(JUDGED_SEQ, str(through))
            report = {"round": len(self.rounds) + 1, "through_seq": through,
                      "seconds": round(time.time() - started, 2), **report}
            self.rounds.append(report)
            self.last_round_at = time.time()
            log.info("feedback round: %s", report)
            self.on_round(report)
            return report

    def _round(self, through: int) -> dict[str, Any]:
        cfg = self.config
        serving = self.serving.serving_bundle()
        parent = load_bundle(serving)
        base = align_to_catalogue(self.base(), parent.item_ids)
        types = frozenset(cfg.event_types) if cfg.event_types else None
        factors, debiasing = position_factors(self.events, cfg, self.since_seq, through)
        fed = with_feedback(base, self.events.events_between(self.since_seq, through), types, cfg.feedback, factors)
        lineage = {"parent": parent.version, "feedback": fed.stats.to_dict(), **debiasing}
        report: dict[str, Any] = dict(lineage)
        if fed.stats.used == 0:
            return {**report, "decision": "nothing to learn"}
        training = fine_tune_config(parent.manifest, cfg)
        out = cfg.output / f"round-{time.strftime('%Y%m%d-%H%M%S')}-{through}"
        result = _fine_tune(fed.dataset, training, out, cfg, parent.arrays[SEMANTIC] if training.use_text else None,
                            serving, lineage)
        budgets = dict(training.candidates_per_channel)
        verdict = judge(fed, serving, out, budgets, cfg)
        _add_to_manifest(out, "loop", verdict)
        report.update(version=result.version, bundle=str(out), verdict=verdict)
        if not verdict["roll_out"]:
            return {**report, "decision": "kept serving version"}
        if cfg.canary.share > 0:
            report["canary"] = run_canary(self.events, self.serving, out, result.version, cfg.canary)
            promoted = report["canary"]["promote"]
            return {**report, "decision": "rolled out after canary" if promoted else "rolled back after canary"}
        report["swap"] = self.serving.swap(out)
        return {**report, "decision": "rolled out"}


def position_factors(events: EventStore, cfg: LoopConfig, after_seq: int, through_seq: int
                     ) -> tuple[dict[int, float], dict[str, Any]]:
    """Inverse-propensity factors of the attributed events in (after_seq, through_seq], and
    what they came from; none unless `inverse_propensity` is on."""
    if not cfg.inverse_propensity:
        return {}, {}
    estimate = estimate_propensity(events.position_outcomes(cfg.click_types, cfg.exploration_depth),
                                   cfg.exploration_depth)
    factors, summary = inverse_propensity_factors(events.shown_positions(after_seq, through_seq), estimate,
                                                  cfg.propensity_clip)
    return factors, {"propensity": estimate.to_json(), "inverse_propensity": summary}


def _fine_tune(dataset: Dataset, training: TrainConfig, out: Path, cfg: LoopConfig, text_vectors: Any,
               warm_start: Path, metrics: dict[str, Any]) -> Any:
    from cluster.train_ray import RayTrainConfig, train_on_ray

    ray_config = RayTrainConfig(workers=cfg.workers, storage=cfg.storage, use_gpu=cfg.use_gpu,
                                cpus_per_worker=cfg.cpus_per_worker, name=f"loop-{out.name}")
    return train_on_ray(dataset, training, out, ray_config, text_vectors=text_vectors, warm_start=warm_start,
                        metrics=metrics)


def _add_to_manifest(bundle: Path, key: str, value: Any) -> None:
    """Record the loop's verdict in the bundle's metrics (what `recfunnel versions` shows)."""
    manifest = read_manifest(bundle)
    manifest["metrics"][key] = value
    staged = bundle / f"{MANIFEST}.tmp"
    staged.write_text(json.dumps(manifest, indent=2, sort_keys=True), "utf-8")
    staged.replace(bundle / MANIFEST)  # atomic: readers see the old manifest or the new one


class LoopHost:
    """The loop as a Ray actor beside the controller (`recfunnel up` with a `[loop]` table):
    it runs rounds in a thread and answers `describe` and `run_round` meanwhile."""

    def __init__(self, config: LoopConfig, store: str | Path, controller_name: str, namespace: str):
        import ray

        from cluster.metrics import LoopMetrics

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        controller = ray.get_actor(controller_name, namespace=namespace)
        self.metrics = LoopMetrics()
        self.loop = FeedbackLoop(config, open_event_store(store), ControllerServing(controller),
                                 on_round=lambda report: self.metrics.round(report["decision"]))
        self._exported = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.loop.run, args=(self._stop, self._export), name="feedback-loop",
                                        daemon=True)
        self._thread.start()

    def _export(self) -> None:
        from cluster.metrics import EXPORT_EVERY_S

        if time.monotonic() - self._exported > EXPORT_EVERY_S:
            self.metrics.export(self.loop.pending())
            self._exported = time.monotonic()

    def describe(self) -> dict[str, Any]:
        import os

        return {**self.loop.describe(), "pid": os.getpid(), "running": self._thread.is_alive()}

    def run_round(self) -> dict[str, Any]:
        return self.loop.run_round()

    def stop(self) -> None:
        self._stop.set()
