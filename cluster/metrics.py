"""recfunnel's metrics as `ray.util.metrics`, which Ray exports in Prometheus format from
every node (the dashboard's metrics view and any Prometheus that scrapes it show them).

Every name starts with `recfunnel_`; tags say which service, method or channel.
"""

from __future__ import annotations

from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES_S = [0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
EXPORT_EVERY_S = 5.0  # how often hosts read their service's counters into the gauges


class RayGatewayMetrics:
    """The gateway's observer (`gateway.observe.GatewayObserver`): requests, latency,
    degraded answers and feedback events."""

    def __init__(self) -> None:
        self.requests = Counter("recfunnel_requests", "Public calls answered, by method and status",
                                tag_keys=("method", "status"))
        self.latency = Histogram("recfunnel_request_seconds", "Latency of public calls answered OK",
                                 boundaries=LATENCY_BOUNDARIES_S, tag_keys=("method",))
        self.degraded = Counter("recfunnel_degraded_answers", "Answers with a missing stage (partial recall "
                                "or recall order)", tag_keys=("method",))
        self.events = Counter("recfunnel_feedback_events", "Feedback events acknowledged, by whether they were "
                              "new or already logged", tag_keys=("outcome",))

    def answered(self, method: str, seconds: float, degraded: bool) -> None:
        self.requests.inc(1, tags={"method": method, "status": "OK"})
        self.latency.observe(seconds, tags={"method": method})
        if degraded:
            self.degraded.inc(1, tags={"method": method})

    def refused(self, method: str, status: str) -> None:
        self.requests.inc(1, tags={"method": method, "status": status})

    def feedback(self, written: int, duplicates: int) -> None:
        if written:
            self.events.inc(written, tags={"outcome": "written"})
        if duplicates:
            self.events.inc(duplicates, tags={"outcome": "duplicate"})


class AdmissionMetrics:
    """The gateway's admission control (`gateway.admission`), read from its counters every few
    seconds: the concurrency limit, calls running and queued, calls shed, time spent queued."""

    def __init__(self) -> None:
        self.limit = Gauge("recfunnel_admission_limit", "Concurrent calls the gateway admits now")
        self.in_flight = Gauge("recfunnel_admission_in_flight", "Calls running in the gateway")
        self.queued = Gauge("recfunnel_admission_queued", "Calls waiting for a slot")
        self.shed = Counter("recfunnel_shed_requests", "Calls refused RESOURCE_EXHAUSTED, not started")
        self.queue_seconds = Counter("recfunnel_admission_queue_seconds", "Seconds admitted calls waited "
                                     "for a slot, summed (divide by the admitted calls for the mean)")
        self.admitted = Counter("recfunnel_admitted_requests", "Calls admitted")
        self._seen: dict[str, float] = {}

    def export(self, snapshot: dict[str, Any]) -> None:
        self.limit.set(snapshot["limit"])
        self.in_flight.set(snapshot["in_flight"])
        self.queued.set(snapshot["queued"])
        for name, counter in (("shed", self.shed), ("queue_wait_s", self.queue_seconds),
                              ("admitted", self.admitted)):
            new = snapshot[name] - self._seen.get(name, 0)
            if new > 0:
                counter.inc(new)
            self._seen[name] = snapshot[name]


class ExposureMetrics:
    """The gateway's exposure log (`gateway.exposures`): exposures written and dropped, and the
    queue a killed gateway would lose."""

    def __init__(self) -> None:
        self.logged = Counter("recfunnel_exposures_logged", "Exposures (items shown in answers) written")
        self.dropped = Counter("recfunnel_exposures_dropped", "Exposures dropped: queue full or write failed")
        self.queued = Gauge("recfunnel_exposures_queued", "Exposures waiting to be written")
        # The experiment report's counts, live: per variant ("" outside any experiment).
        self.answers = Counter("recfunnel_variant_answers", "Answers served, by experiment variant",
                               tag_keys=("variant",))
        self.shown = Counter("recfunnel_variant_exposures", "Items shown, by experiment variant",
                             tag_keys=("variant",))
        self.events = Counter("recfunnel_variant_events", "Feedback events naming an answer, by the answer's "
                              "variant and the event type", tag_keys=("variant", "event_type"))
        self._seen: dict[Any, int] = {}

    def _add(self, counter: Counter, key: Any, total: int, tags: dict[str, str] | None = None) -> None:
        new = total - self._seen.get(key, 0)
        if new > 0 and tags:
            counter.inc(new, tags=tags)
        elif new > 0:
            counter.inc(new)
        self._seen[key] = total

    def export(self, stats: dict[str, int], groups: Any = None) -> None:
        self.queued.set(stats["queued"])
        self._add(self.logged, "logged", stats["logged"])
        self._add(self.dropped, "dropped", stats["dropped"])
        if groups is None:
            return
        for variant, answers in list(groups.answers.items()):
            self._add(self.answers, ("answers", variant), answers, {"variant": variant})
            self._add(self.shown, ("exposures", variant), groups.exposures[variant], {"variant": variant})
        for (variant, event_type), count in list(groups.events.items()):
            self._add(self.events, ("events", variant, event_type), count,
                      {"variant": variant, "event_type": event_type})


class RankerMetrics:
    """Micro-batching of the ranking service, read from its counters every few seconds."""

    def __init__(self) -> None:
        self.calls = Counter("recfunnel_ranker_requests", "Encode/Rank requests scored", tag_keys=("method",))
        self.batches = Counter("recfunnel_ranker_batches", "Model calls (batches)", tag_keys=("method",))
        self.batch_size = Gauge("recfunnel_ranker_batch_size", "Mean requests per model call since the "
                                "last export", tag_keys=("method",))
        self._seen: dict[str, tuple[int, int]] = {}

    def export(self, stats: dict[str, dict[str, float]]) -> None:
        for method, counts in stats.items():
            requests, batches = int(counts["requests"]), int(counts["batches"])
            old_requests, old_batches = self._seen.get(method, (0, 0))
            new_requests, new_batches = requests - old_requests, batches - old_batches
            if new_requests > 0:
                self.calls.inc(new_requests, tags={"method": method})
            if new_batches > 0:
                self.batches.inc(new_batches, tags={"method": method})
                self.batch_size.set(new_requests / new_batches, tags={"method": method})
            self._seen[method] = (requests, batches)


class RecallMetrics:
    """Size of a recall shard's indexes."""

    def __init__(self, shard_id: int) -> None:
        self.shard = str(shard_id)
        self.items = Gauge("recfunnel_index_items", "Items in a recall shard's indexes", tag_keys=("shard",))
        self.bytes = Gauge("recfunnel_index_bytes", "Bytes of a recall shard's index, per channel",
                           tag_keys=("shard", "channel"))

    def export(self, shard: Any) -> None:
        self.items.set(shard.size, tags={"shard": self.shard})
        for channel, report in shard.index_reports.items():
            self.bytes.set(report.bytes, tags={"shard": self.shard, "channel": channel})


class TrainingMetrics:
    """Training progress, from the first replica of a Ray Train run (and so from every round
    of the feedback loop): epochs done, validation NDCG@10 and loss of the latest epoch."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.epochs = Counter("recfunnel_training_epochs", "Training epochs completed", tag_keys=("run", "phase"))
        self.ndcg = Gauge("recfunnel_training_valid_ndcg", "Validation NDCG@10 after the latest epoch",
                          tag_keys=("run", "phase"))
        self.loss = Gauge("recfunnel_training_loss", "Summed training loss of the latest epoch",
                          tag_keys=("run", "phase"))

    def epoch(self, phase: str, valid_ndcg: float, loss: float) -> None:
        self.epochs.inc(1, tags={"run": self.run, "phase": phase})
        self._latest(phase, valid_ndcg, loss)

    def finished(self, curve: list[dict[str, float]]) -> None:
        """Each phase's last epoch, set again by the process that ran the training: Ray drops
        a dead worker's gauges, and the replica that set them ends with the run."""
        for stage, phase in ((0.0, "encoder"), (1.0, "ranker")):
            points = [point for point in curve if point["stage"] == stage]
            if points:
                self._latest(phase, points[-1]["ndcg@10"], points[-1]["loss"])

    def _latest(self, phase: str, valid_ndcg: float, loss: float) -> None:
        tags = {"run": self.run, "phase": phase}
        self.ndcg.set(valid_ndcg, tags=tags)
        self.loss.set(loss, tags=tags)


class LoopMetrics:
    """The feedback loop: rounds by decision, events waiting for the next round."""

    def __init__(self) -> None:
        self.rounds = Counter("recfunnel_loop_rounds", "Feedback-loop rounds, by decision", tag_keys=("decision",))
        self.pending = Gauge("recfunnel_loop_pending_events", "Events logged since the last round took its events")

    def round(self, decision: str) -> None:
        self.rounds.inc(1, tags={"decision": decision})

    def export(self, pending: int) -> None:
        self.pending.set(pending)
