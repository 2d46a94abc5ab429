"""The feedback loop: logged events become training data, a round fine-tunes, judges on
held-out recent events and rolls out; end to end, a new taste fed back through the gateway
changes what other users are recommended, with no failed request during the swap."""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import ray
import torch
from safetensors.numpy import load_file, save_file

from bench.loop import fan_events, new_taste, taste_in_lists
from cluster.config import ClusterConfig
from cluster.controller import NAMESPACE
from cluster.demo import seed_history
from cluster.loop import LOOP_NAME, FeedbackLoop, LoopConfig, fine_tune_config, judge
from gateway.client import RecommenderClient
from gateway.events import Event, EventLog, LoggedEvent
from ranking.evaluation import FunnelScorer
from ranking.scores import seen_mask
from recdata.bundle import read_manifest
from recdata.dataset import Dataset
from recdata.feedback import align_to_catalogue, recent_positions, with_feedback
from recdata.sources import DataSource
from recdata.split import leave_last_two
from recdata.synthetic import write_pairs
from tests.conftest import TINY_TRAINING
from tests.grpc_checks import free_port
from tests.ray_cluster import local_cluster, scrape

TASTE_SIZE, FANS = 6, 60  # a round once all the fans have sent their events
METRICS_PORT = free_port()


def logged(seq: int, user: str, item: str, event_type: str = "click") -> LoggedEvent:
    return LoggedEvent(seq, user, item, event_type, 1_000_000 + seq)


def test_feedback_extends_sequences_adds_users_and_skips_unknown_items(tiny_dataset: Dataset) -> None:
    events = [logged(10, "u0", "i3"), logged(11, "someone-new", "i4"), logged(12, "u0", "no-such-item"),
              logged(13, "someone-new", "i5", "skip"), logged(14, "someone-new", "i6")]
    fed = with_feedback(tiny_dataset, events, event_types=frozenset({"click"}))
    data = fed.dataset
    assert data.user_ids[: tiny_dataset.num_users] == tiny_dataset.user_ids and data.user_ids[-1] == "someone-new"
    assert list(data.sequences[0]) == [*tiny_dataset.sequences[0], 3]
    assert list(data.sequences[-1]) == [4, 6]
    assert fed.added[0] == 1 and fed.added[-1] == 2 and fed.added[1:-1].sum() == 0
    stats = fed.stats
    assert (stats.events, stats.used, stats.unknown_items, stats.skipped_types) == (5, 3, 1, 1)
    assert (stats.users, stats.new_users, stats.first_seq, stats.last_seq) == (2, 1, 10, 14)
    assert with_feedback(tiny_dataset, events).stats.used == 4  # every type, as the served history


def test_held_out_recent_events_are_the_last_logged_event_of_each_user(tiny_dataset: Dataset) -> None:
    events = [logged(1, "u1", "i3"), logged(2, "fan", "i4"), logged(3, "fan", "i5"), logged(4, "fan", "i6")]
    fed = with_feedback(tiny_dataset, events)
    split = leave_last_two(fed.dataset)
    positions = recent_positions(split, fed.added)
    users = [fed.dataset.user_ids[split.users[p]] for p in positions]
    assert users == ["u1", "fan"]
    assert [int(split.test_targets[p]) for p in positions] == [3, 6]
    assert list(split.train[split.users[positions[1]]]) == [4]  # i5 validates, i6 tests: neither trains


def test_a_data_set_read_in_another_order_lines_up_with_the_catalogue(tiny_dataset: Dataset, tmp_path: Path) -> None:
    pairs, items = write_pairs(tiny_dataset, tmp_path)
    read = DataSource(interactions=pairs, items=items).load()
    assert read.item_ids != tiny_dataset.item_ids  # first-seen order
    aligned = align_to_catalogue(read, tiny_dataset.item_ids)
    assert aligned.item_ids == tiny_dataset.item_ids and aligned.item_texts == tiny_dataset.item_texts
    for ours, theirs in zip(aligned.sequences, tiny_dataset.sequences, strict=True):
        assert np.array_equal(ours, theirs)
    smaller = align_to_catalogue(read, tiny_dataset.item_ids[:100])
    assert all((s < 100).all() for s in smaller.sequences)


def test_the_event_log_reads_ranges_and_keeps_settings(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.sqlite")
    assert log.last_seq() == 0 and log.setting("loop.since_seq") is None
    log.append([Event("a", "i1", "click", timestamp_ms=5), Event("b", "i2"), Event("a", "i3")])
    assert log.last_seq() == 3
    assert [(e.seq, e.user_id, e.item_id) for e in log.events_between(1, 3)] == [(2, "b", "i2"), (3, "a", "i3")]
    log.set_setting("loop.since_seq", "2")
    log.set_setting("loop.since_seq", "3")
    log.close()
    assert EventLog(tmp_path / "events.sqlite").setting("loop.since_seq") == "3"  # durable


class RecordingServing:
    def __init__(self, bundle: Path):
        self.bundle, self.swapped = bundle, []

    def serving_bundle(self) -> Path:
        return self.bundle

    def swap(self, bundle: Path) -> dict[str, Any]:
        self.swapped.append(bundle)
        return {"model_version": read_manifest(bundle)["version"]}


def test_rounds_are_due_every_n_events_or_t_seconds_and_resume_where_they_were(
        tiny_bundle: Path, tiny_dataset: Dataset, tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.sqlite")
    seed_history(log, tiny_dataset)
    config = LoopConfig(every_events=3, every_seconds=60, output=tmp_path / "loop", storage=tmp_path / "rt")
    loop = FeedbackLoop(config, log, RecordingServing(tiny_bundle), base=tiny_dataset)
    assert loop.since_seq == log.last_seq() and loop.pending() == 0  # the seeded history is the base
    assert not loop.due(now=time.time() + 3600)
    log.append([Event("u1", "i3"), Event("u2", "i4")])
    assert loop.pending() == 2 and not loop.due() and loop.due(now=time.time() + 61)
    log.append([Event("u3", "i5")])
    assert loop.due()
    # Another loop over the same log (a restarted actor) starts from the same marks.
    again = FeedbackLoop(config, log, RecordingServing(tiny_bundle), base=tiny_dataset)
    assert again.since_seq == loop.since_seq and again.pending() == 3


def test_a_round_after_a_user_is_erased_never_trains_on_their_events(
        tiny_bundle: Path, tiny_dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cluster.loop as loop_module

    log = EventLog(tmp_path / "events.sqlite")
    config = LoopConfig(every_events=1, output=tmp_path / "loop", storage=tmp_path / "rt")
    loop = FeedbackLoop(config, log, RecordingServing(tiny_bundle), base=tiny_dataset)
    items = list(tiny_dataset.item_ids)
    log.append([Event("erased-user", items[n]) for n in range(5)] + [Event("kept-user", items[n]) for n in range(3)])
    assert log.erase_user("erased-user") == 5
    trained_on: list[Dataset] = []

    def fine_tune(dataset: Dataset, *args: Any, **kwargs: Any) -> Any:
        trained_on.append(dataset)
        raise RuntimeError("stop here: what the round would train on is known")

    monkeypatch.setattr(loop_module, "_fine_tune", fine_tune)
    report = loop.run_round()
    assert "stop here" in report["error"]
    (dataset,) = trained_on
    assert "erased-user" not in dataset.user_ids
    assert len(dataset.sequences[dataset.user_ids.index("kept-user")]) == 3


def test_the_fine_tune_keeps_the_serving_versions_settings_with_the_loops_epochs(tiny_bundle: Path) -> None:
    manifest = read_manifest(tiny_bundle)
    tuned = fine_tune_config(manifest, LoopConfig(encoder_epochs=2, ranker_epochs=1, seed=5))
    assert tuned.model == TINY_TRAINING.model and tuned.candidates_per_channel == TINY_TRAINING.candidates_per_channel
    assert (tuned.batch_size, tuned.num_negatives) == (TINY_TRAINING.batch_size, TINY_TRAINING.num_negatives)
    assert (tuned.epochs, tuned.ranker_epochs, tuned.seed) == (2, 1, 5)


def test_loop_settings_come_from_the_cluster_config(tmp_path: Path) -> None:
    toml = tmp_path / "cluster.toml"
    toml.write_text('bundle = "b"\ndb_path = "e.sqlite"\n[loop]\ndataset = "ml-100k"\nevery_events = 50\n'
                    'event_types = ["click"]\n', "utf-8")
    config = ClusterConfig.from_file(toml)
    assert config.loop is not None and config.loop.every_events == 50 and config.loop.event_types == ("click",)
    toml.write_text('bundle = "b"\ndb_path = "e.sqlite"\n[loop]\nevery_event = 5\n', "utf-8")
    with pytest.raises(ValueError, match="every_event"):
        ClusterConfig.from_file(toml)
    with pytest.raises(ValueError, match="unknown dataset"):
        LoopConfig.from_dict({"dataset": "ml-1b"})
    # The example shipped in deploy/ parses: every key it names is one the config knows.
    shipped = ClusterConfig.from_file(Path(__file__).parents[1] / "deploy" / "cluster.toml")
    assert shipped.loop is not None and shipped.loop.workers == 1 and not shipped.loop.use_gpu
    assert shipped.admission.enabled and shipped.admission.max_queue == 32
    toml.write_text('bundle = "b"\ndb_path = "e.sqlite"\n[admission]\nmin_limit = 0\n', "utf-8")
    with pytest.raises(ValueError, match="min_limit"):
        ClusterConfig.from_file(toml)


# ---- end to end ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def looping_cluster(tiny_bundle: Path, tiny_dataset: Dataset, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("loop")
    pairs, items = write_pairs(tiny_dataset, folder / "data")
    loop = LoopConfig(source=DataSource(interactions=pairs, items=items), every_events=FANS * 2 * TASTE_SIZE,
                      every_seconds=3600, poll_s=0.5, encoder_epochs=3, ranker_epochs=1, min_cases=5,
                      output=folder / "rounds", storage=folder / "ray-train")
    with local_cluster(ClusterConfig(bundle=tiny_bundle, db_path=folder / "events.sqlite", num_shards=2,
                                     gateway_port=0, loop=loop), tiny_dataset, METRICS_PORT) as running:
        yield running


@pytest.mark.fault
def test_feedback_with_a_new_taste_changes_recommendations_after_one_round_with_no_failed_request(
        looping_cluster, tiny_dataset: Dataset) -> None:
    taste = new_taste(tiny_dataset, probe_recent=4, tags=("topic0", "topic1"))
    assert len(taste.probes) >= 10
    before_version = looping_cluster.status()["model_version"]
    before, _ = asyncio.run(taste_in_lists(looping_cluster.gateway_address, tiny_dataset, taste))
    fans = fan_events(tiny_dataset, taste, FANS)

    async def feed_and_watch() -> tuple[dict[str, Any], list[grpc.StatusCode], int]:
        client = RecommenderClient(looping_cluster.gateway_address, timeout=10)
        failures: list[grpc.StatusCode] = []
        served = 0
        try:
            for start in range(0, len(fans), 100):
                await client.feedback(fans[start : start + 100])
            deadline = time.monotonic() + 400
            loop: dict[str, Any] = {}
            while time.monotonic() < deadline:  # requests all through the round and its swap
                for u in taste.probes[:5]:
                    try:
                        await client.recommend(tiny_dataset.user_ids[u], k=10)
                        served += 1
                    except grpc.aio.AioRpcError as error:
                        failures.append(error.code())
                loop = (await asyncio.to_thread(looping_cluster.status))["loop"]
                if loop["last_round"] is not None:
                    break
                await asyncio.sleep(0.2)
            return loop, failures, served
        finally:
            await client.close()

    loop, failures, served = asyncio.run(feed_and_watch())
    round_ = loop["last_round"]
    assert round_ is not None, "no round within 400 s"
    assert round_["decision"] == "rolled out", round_
    assert failures == [] and served > 20
    assert round_["feedback"]["used"] == len(fans) and round_["feedback"]["new_users"] == FANS
    verdict = round_["verdict"]
    assert verdict["cases"] == FANS and verdict["candidate"]["ndcg@10"] > verdict["serving"]["ndcg@10"]

    status = looping_cluster.status()
    assert status["model_version"] == round_["version"] != before_version
    assert all(s["model_version"] == round_["version"] for s in status["services"])
    after, degraded = asyncio.run(taste_in_lists(looping_cluster.gateway_address, tiny_dataset, taste))
    # The probes sent nothing: only the new model can have taught their lists the taste.
    assert after >= before + 1.0 and degraded == 0, (before, after)
    listed = ray.get(looping_cluster.controller.versions.remote(), timeout=30)
    assert [v["serving"] for v in listed] == [False, True]
    assert listed[-1]["metrics"]["loop"]["roll_out"] and listed[-1]["metrics"]["parent"] == before_version
    loop_actor = ray.get_actor(LOOP_NAME, namespace=NAMESPACE)
    assert ray.get(loop_actor.describe.remote(), timeout=30)["pending"] == 0

    # What the dashboard's metrics view shows of it: serving, training progress, the loop.
    metrics = scrape(METRICS_PORT, ["ray_recfunnel_requests_total", "ray_recfunnel_feedback_events_total",
                                    "ray_recfunnel_ranker_batches_total", "ray_recfunnel_index_items",
                                    "ray_recfunnel_training_epochs_total", "ray_recfunnel_training_valid_ndcg",
                                    "ray_recfunnel_loop_rounds_total", "ray_recfunnel_loop_pending_events",
                                    "ray_recfunnel_admission_limit", "ray_recfunnel_admitted_requests_total"])
    assert metrics["ray_recfunnel_requests_total"] >= served
    assert metrics["ray_recfunnel_feedback_events_total"] == len(fans)
    assert metrics["ray_recfunnel_training_epochs_total"] >= 2  # at least one epoch of each phase
    assert metrics["ray_recfunnel_loop_rounds_total"] == 1
    # Read from the gateway's counters every few seconds: behind the requests, never absent.
    assert metrics["ray_recfunnel_admitted_requests_total"] > 0 and metrics["ray_recfunnel_admission_limit"] >= 2
    gateway = next(s for s in status["services"] if s["role"] == "gateway")
    assert gateway["admission"]["enabled"] and gateway["admission"]["admitted"] > 0


def scrambled_copy(bundle: Path, folder: Path) -> Path:
    """The bundle with a ranker of random weights: a candidate that is plainly worse."""
    shutil.copytree(bundle, folder)
    weights = load_file(folder / "ranker.safetensors")
    rng = np.random.default_rng(0)
    save_file({k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in weights.items()},
              folder / "ranker.safetensors")
    return folder


def test_a_worse_candidate_or_too_few_recent_events_keep_the_serving_version(
        tiny_bundle: Path, tiny_dataset: Dataset, tmp_path: Path) -> None:
    # Recent events the serving version saw coming: each user's top item after their history.
    budgets = dict(TINY_TRAINING.candidates_per_channel)
    histories = list(tiny_dataset.sequences[:40])
    with torch.no_grad():
        scores = FunnelScorer.from_bundle(tiny_bundle, budgets).funnel_scores(histories).dense()
    scores = scores.masked_fill(seen_mask(histories, tiny_dataset.num_items), -math.inf)
    events = [logged(u + 1, tiny_dataset.user_ids[u], tiny_dataset.item_ids[int(best)])
              for u, best in enumerate(scores.argmax(1))]
    fed = with_feedback(tiny_dataset, events)
    worse = scrambled_copy(tiny_bundle, tmp_path / "worse")
    verdict = judge(fed, tiny_bundle, worse, budgets, LoopConfig(min_cases=5))
    assert verdict["cases"] == len(events) and not verdict["roll_out"], verdict
    assert verdict["candidate"]["ndcg@10"] < verdict["serving"]["ndcg@10"] == 1.0
    same = judge(fed, tiny_bundle, tiny_bundle, budgets, LoopConfig(min_cases=5))
    assert same["roll_out"] and same["candidate"] == same["serving"]  # not worse is enough
    few = judge(fed, tiny_bundle, tiny_bundle, budgets, LoopConfig(min_cases=1000))
    assert not few["roll_out"] and "fewer than min_cases=1000" in few["reason"]


def test_a_round_with_nothing_to_learn_moves_on_without_training(tiny_bundle: Path, tiny_dataset: Dataset,
                                                                 tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.sqlite")
    serving = RecordingServing(tiny_bundle)
    loop = FeedbackLoop(LoopConfig(event_types=("purchase",), output=tmp_path / "loop"), log, serving,
                        base=tiny_dataset)
    log.append([Event("u1", "i3", "click"), Event("u2", "no-such-item", "purchase")])
    report = loop.run_round()
    assert report["decision"] == "nothing to learn" and serving.swapped == []
    assert report["feedback"]["skipped_types"] == 1 and report["feedback"]["unknown_items"] == 1
    assert loop.pending() == 0 and not (tmp_path / "loop").exists()
