"""`recfunnel bench experiment`: A/B experiments and position-debiased learning, judged
against a simulated population whose preferences and position bias are known.

The population: items belong to topics and have a quality; each user has a taste over the
topics, and the appeal of an item to a user is taste × quality, scaled to (0, 1] per user.
That appeal is the truth the figures are measured against. A user looks at place p of an
answer with propensity 1 / (1 + p) ** `position_decay` and clicks what they look at with
probability `click_scale` × appeal. Users are served by the real services (recall shards, a
ranking service and a gateway, over gRPC on loopback), and their clicks go back through
Feedback naming the answer's request id, so the exposure log and the report see exactly what
a deployment would.

Models: `better` learns from `history` interactions per user drawn by appeal, `weaker` from
`weak_history`; both train with the same settings (ID-only items: the population has no text).

  * A/A: `aa_seeds` experiments of two identical variants on the serving (weaker) model, each
    with its own salt and its own users' clicks: the share whose CTR test has p < 0.05 is the
    false positive rate (0.05 expected).
  * A/B: `better` as a variant beside `weaker`: the simulator's expected CTR of what each arm
    served (the true lift), the report's measured lift with its interval and p-value, and the
    answers per variant a 10% lift needs at 80% power, from the measured variance.
  * Debiasing: `weaker` serves with exploration on (`swap_share` of the answers swap a pair),
    logging `log_answers` answers and their clicks. From the same log, models train on the
    base interactions plus the clicks: `naive` weighs every click 1, `inverse_propensity`
    by 1 / the estimated propensity of its place (clipped, self-normalised, as the feedback
    loop does), and `inverse_true_propensity` by the simulator's own propensities (what a
    perfect estimate would give). Each is judged by NDCG@10 of its served answers against
    the true appeal.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from recdata.dataset import Dataset

log = logging.getLogger(__name__)

Z_80 = 0.8416212335729143  # the standard normal's 80% quantile: power 0.8


PHASES = ("aa", "ab", "debias")


@dataclass(frozen=True)
class ExperimentBenchConfig:
    users: int = 1200
    items: int = 300
    topics: int = 8
    # Training interactions per user of the better model and of the weaker one, which serves
    # (and logs): 6 against 5 gives the better one a true CTR lift of about 10% on this
    # population, the lift the test has to detect (8 against 5 gives about 20%).
    history: int = 6
    weak_history: int = 5
    k: int = 10
    position_decay: float = 1.0  # propensity of place p: 1 / (1 + p) ** decay
    # Past promotion: `promoted_share` of the items were pushed before the logs began, so the
    # interactions the models learnt from picked them `promotion` times as often as their
    # appeal alone would. The serving model then ranks them above their appeal, the kind of
    # misordering that clicks logged under position bias repeat (1.0: no promotion).
    promotion: float = 1.0
    promoted_share: float = 0.2
    click_scale: float = 1.0     # P(click | looked at) = click_scale × appeal
    aa_seeds: int = 20
    aa_answers: int = 600        # per A/A experiment
    ab_answers: int = 8000       # about what a 10% lift needs for a test of power 0.8
    log_answers: int = 6000      # answers logged for the debiasing comparison
    swap_share: float = 0.5      # of the logged answers that swap a pair (exploration)
    propensity_clip: float = 0.1
    train_seconds: float = 60.0  # encoder budget of each model trained (the ranker's is half)
    concurrency: int = 8         # requests in flight at once
    seed: int = 0
    phases: tuple[str, ...] = PHASES  # which of the three to run

    def __post_init__(self) -> None:
        if not self.phases or set(self.phases) - set(PHASES):
            raise ValueError(f"phases={','.join(self.phases)} must name one or more of {', '.join(PHASES)}")
        if self.users < 50 or self.items < 2 * self.k or self.topics < 2:
            raise ValueError(f"users={self.users} must be >= 50, items={self.items} >= 2 k, topics >= 2")
        if not 1 <= self.weak_history < self.history < self.items:
            raise ValueError(f"need 1 <= weak_history ({self.weak_history}) < history ({self.history}) < items")
        if not 2 <= self.k <= 100 or self.position_decay < 0 or not 0 < self.click_scale <= 1:
            raise ValueError("k must be in 2..100, position_decay >= 0, click_scale in (0, 1]")
        if self.aa_seeds < 1 or min(self.aa_answers, self.ab_answers, self.log_answers) < 20:
            raise ValueError("aa_seeds must be >= 1 and every phase needs at least 20 answers")
        if not (math.isfinite(self.promotion) and self.promotion >= 1) or not 0 <= self.promoted_share <= 1:
            raise ValueError(f"promotion={self.promotion} must be >= 1 and promoted_share={self.promoted_share} "
                             f"in 0..1")
        if not 0 < self.swap_share <= 1 or not 0 < self.propensity_clip <= 1 or self.train_seconds <= 0:
            raise ValueError("swap_share and propensity_clip must be in (0, 1], train_seconds > 0")


class Population:
    """The simulated users: what each likes (the truth) and how they click."""

    def __init__(self, config: ExperimentBenchConfig):
        rng = np.random.default_rng(config.seed)
        self.config = config
        self.item_topic = rng.integers(0, config.topics, config.items)
        quality = rng.uniform(0.2, 1.0, config.items)
        taste = rng.dirichlet(np.full(config.topics, 0.3), config.users)
        appeal = taste[:, self.item_topic] * quality
        self.appeal = appeal / appeal.max(axis=1, keepdims=True)  # (U, I)
        self.promoted = rng.random(config.items) < config.promoted_share
        self.past_exposure = np.where(self.promoted, config.promotion, 1.0)  # (I,)
        self.propensity = 1.0 / (1.0 + np.arange(config.k)) ** config.position_decay
        self.user_ids = [f"user-{u}" for u in range(config.users)]
        self.item_ids = [f"item-{i}" for i in range(config.items)]
        self.user_of = {user: u for u, user in enumerate(self.user_ids)}
        self.item_of = {item: i for i, item in enumerate(self.item_ids)}

    def dataset(self, length: int, seed: int) -> Dataset:
        """`length` distinct items per user, drawn by appeal (cubed: people mostly find what
        they like) times the past promotion of the item, in random order."""
        rng = np.random.default_rng(seed)
        sequences = []
        for appeal in self.appeal:
            weights = appeal ** 3 * self.past_exposure
            sequences.append(rng.choice(len(appeal), size=length, replace=False, p=weights / weights.sum()))
        return Dataset(f"simulated-{length}", list(self.user_ids), list(self.item_ids), sequences,
                       [f"item {i}" for i in range(len(self.item_ids))])

    def clicks(self, user: str, items: list[str], rng: np.random.Generator) -> np.ndarray:
        """Which places of an answer the user clicks."""
        looked = self.propensity[: len(items)]
        appeal = self.appeal[self.user_of[user], [self.item_of[i] for i in items]]
        return rng.random(len(items)) < looked * self.config.click_scale * appeal

    def expected_clicks(self, user: str, items: list[str]) -> float:
        appeal = self.appeal[self.user_of[user], [self.item_of[i] for i in items]]
        return float((self.propensity[: len(items)] * self.config.click_scale * appeal).sum())

    def ndcg(self, user: str, items: list[str], seen: set[int], k: int) -> float:
        """NDCG@k of an answer with the true appeal as graded relevance, the ideal being the
        k most appealing items the user has not interacted with."""
        u = self.user_of[user]
        discounts = 1.0 / np.log2(np.arange(2, k + 2))
        gains = np.array([self.appeal[u, self.item_of[i]] for i in items[:k]])
        unseen = np.delete(self.appeal[u], sorted(seen))
        ideal = np.sort(unseen)[::-1][:k]
        return float((gains * discounts[: len(gains)]).sum() / (ideal * discounts[: len(ideal)]).sum())


@dataclass
class Served:
    """One answer as the client saw it, and what the user did."""

    user: str
    variant: str
    items: list[str]
    clicks: np.ndarray
    expected: float


async def serve_and_click(address: str, population: Population, users: list[str], k: int, concurrency: int,
                          rng: np.random.Generator) -> list[Served]:
    """Each user asks once; their clicks go back through Feedback, naming the answer."""
    from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc

    gate = asyncio.Semaphore(concurrency)
    served: list[Served] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)

        async def one(user: str) -> None:
            async with gate:
                reply = await stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=k), timeout=30)
                items = [i.item_id for i in reply.items]
                clicked = population.clicks(user, items, rng)
                if clicked.any():
                    await stub.Feedback(recommender_pb2.FeedbackRequest(events=[
                        recommender_pb2.Event(user_id=user, item_id=items[p], event_type="click",
                                              request_id=reply.request_id) for p in np.flatnonzero(clicked)]),
                        timeout=30)
                served.append(Served(user, reply.variant, items, clicked, population.expected_clicks(user, items)))

        await asyncio.gather(*(one(u) for u in users))
    return served


async def until_applied(address: str, experiment_name: str, user: str, within_s: float = 600.0) -> None:
    """Wait until the gateway answers `user` within the experiment (its versions loaded)."""
    from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc

    deadline = time.monotonic() + within_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        while time.monotonic() < deadline:
            reply = await stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=1), timeout=30)
            if reply.experiment == experiment_name:
                return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"experiment {experiment_name} not applied within {within_s:g} s")


async def flushed(gateway: Any) -> None:
    """Wait until the gateway's exposure log has written what it queued."""
    stats = gateway.exposures.stats
    while stats.queued or stats.logged + stats.dropped < stats.offered:  # noqa: ASYNC110 - its counters, not an event
        await asyncio.sleep(0.05)


def arm_figures(served: list[Served], variant: str) -> dict[str, Any]:
    arm = [s for s in served if s.variant == variant]
    shown = sum(len(s.items) for s in arm)
    return {"answers": len(arm), "exposures": shown, "clicks": int(sum(s.clicks.sum() for s in arm)),
            "true_ctr": sum(s.expected for s in arm) / max(shown, 1)}


def answers_for_lift(served: list[Served], control: str, lift: float = 0.1) -> int:
    """Answers per variant for a two-sided 5% test to detect `lift` × the control's CTR with
    power 0.8, from the control's per-answer variance of clicks (the answer as the unit)."""
    from gateway.online_metrics import Z_95

    arm = [s for s in served if s.variant == control]
    clicks = np.array([s.clicks.sum() for s in arm], dtype=np.float64)
    shown = np.array([len(s.items) for s in arm], dtype=np.float64)
    ctr = clicks.sum() / shown.sum()
    residual_var = float(np.var(clicks - ctr * shown, ddof=1)) / float(shown.mean()) ** 2  # delta method
    delta = lift * ctr
    return math.ceil((Z_95 + Z_80) ** 2 * 2 * residual_var / delta**2)


def _train(dataset: Dataset, out: Path, config: ExperimentBenchConfig, seed: int) -> Path:
    from ranking.config import TrainConfig
    from ranking.train import train

    training = TrainConfig(use_text=False, time_budget_s=config.train_seconds,
                           ranker_time_budget_s=config.train_seconds / 2, epochs=60, patience=5, seed=seed)
    train(dataset, training, out)
    return out


def _experiment_report(store: Any, name: str, k: int) -> dict[str, Any]:
    from gateway.online_metrics import ReportConfig, online_report

    report = online_report(store, ReportConfig(k=k, control=f"{name}/control"))
    return {group: figures for group, figures in report["groups"].items() if group.startswith(f"{name}/")}


async def _aa(weaker: Path, db: Path, population: Population, config: ExperimentBenchConfig,
              progress: Callable[[str], None]) -> dict[str, Any]:
    from bench.harness import grpc_stack
    from gateway.experiments import EXPERIMENT_SETTING, Experiment, Variant

    rng = np.random.default_rng(config.seed + 1)
    async with grpc_stack(weaker, db, experiment_poll_s=0.2, swap_drain_s=1.0) as (gateway, _, _):
        store = gateway.events
        p_values = []
        for seed in range(config.aa_seeds):
            name = f"aa-{seed}"
            experiment = Experiment(name, (Variant("control", 0.5), Variant("treatment", 0.5)), salt=name)
            store.set_setting(EXPERIMENT_SETTING, experiment.to_json())
            await until_applied(gateway.address, name, population.user_ids[0])
            users = [population.user_ids[u] for u in rng.choice(config.users, config.aa_answers, replace=True)]
            await serve_and_click(gateway.address, population, users, config.k, config.concurrency, rng)
            await flushed(gateway)
            groups = _experiment_report(store, name, config.k)
            p_values.append(groups[f"{name}/treatment"]["against_control"][f"ctr@{config.k}"]["p_value"])
            progress(f"A/A {seed + 1}/{config.aa_seeds}: p = {p_values[-1]:.3f}")
        store.set_setting(EXPERIMENT_SETTING, "")
    return {"seeds": config.aa_seeds, "answers_per_seed": config.aa_answers, "p_values": p_values,
            "false_positive_rate": float(np.mean(np.asarray(p_values) < 0.05)), "alpha": 0.05}


async def _ab(weaker: Path, better: Path, db: Path, population: Population, config: ExperimentBenchConfig,
              progress: Callable[[str], None]) -> dict[str, Any]:
    """The better model beside the serving one, on a log of its own: the users' histories are
    the ones both models learnt from, so the lift is the models' (after the A/A phase's clicks
    the weaker model serves histories it never trained on, and the lift grows several-fold)."""
    from bench.harness import grpc_stack
    from gateway.experiments import EXPERIMENT_SETTING, Experiment, Variant

    rng = np.random.default_rng(config.seed + 3)
    async with grpc_stack(weaker, db, experiment_poll_s=0.2, swap_drain_s=1.0) as (gateway, _, _):
        store = gateway.events
        name = "ab"
        experiment = Experiment(name, (Variant("control", 0.5), Variant("better", 0.5, bundle=str(better))),
                                salt=name)
        store.set_setting(EXPERIMENT_SETTING, experiment.to_json())
        progress("A/B: loading the better model beside the serving one")
        await until_applied(gateway.address, name, population.user_ids[0])
        users = [population.user_ids[u] for u in rng.choice(config.users, config.ab_answers, replace=True)]
        served = await serve_and_click(gateway.address, population, users, config.k, config.concurrency, rng)
        await flushed(gateway)
        groups = _experiment_report(store, name, config.k)
        store.set_setting(EXPERIMENT_SETTING, "")
    test = groups[f"{name}/better"]["against_control"][f"ctr@{config.k}"]
    control, treated = arm_figures(served, "control"), arm_figures(served, "better")
    return {"control": {**control, "measured_ctr": groups[f"{name}/control"][f"ctr@{config.k}"]},
            "better": {**treated, "measured_ctr": groups[f"{name}/better"][f"ctr@{config.k}"]},
            "true_lift": treated["true_ctr"] / control["true_ctr"] - 1,
            "measured_lift": test["lift"], "difference": test, "p_value": test["p_value"],
            "detected": test["p_value"] < 0.05 and test["difference"] > 0,
            "answers_per_variant_for_10pct_lift": answers_for_lift(served, "control"),
            "p_value_by_answers": p_value_curve(served, "control", "better")}


def p_value_curve(served: list[Served], control: str, treatment: str, points: int = 12) -> list[list[float]]:
    """The test's p-value as the answers came in: [answers so far, p]."""
    from gateway.online_metrics import against_control, ratio_estimate

    curve = []
    for end in np.linspace(len(served) / points, len(served), points).astype(int):
        part = served[:end]
        estimates = []
        for variant in (treatment, control):
            arm = [s for s in part if s.variant == variant]
            estimates.append(ratio_estimate(np.array([s.clicks.sum() for s in arm], dtype=np.float64),
                                            np.array([len(s.items) for s in arm], dtype=np.float64)))
        curve.append([int(end), against_control(estimates[0], estimates[1])["p_value"]])
    return curve


async def _logged_clicks(weaker: Path, db: Path, population: Population, config: ExperimentBenchConfig
                         ) -> tuple[int, int]:
    """Serve with exploration on and log the clicks; the log's seq range of them."""
    from bench.harness import grpc_stack
    from gateway.propensity import ExplorationConfig

    rng = np.random.default_rng(config.seed + 2)
    exploration = ExplorationConfig(swap_share=config.swap_share, depth=config.k)
    async with grpc_stack(weaker, db, exploration=exploration) as (gateway, _, _):
        since = gateway.events.last_seq()
        users = [population.user_ids[u] for u in rng.choice(config.users, config.log_answers, replace=True)]
        await serve_and_click(gateway.address, population, users, config.k, config.concurrency, rng)
        await flushed(gateway)
        return since, gateway.events.last_seq()


async def true_ndcg(bundle: Path, dataset: Dataset, population: Population, k: int) -> float:
    """Mean NDCG@k against the true appeal of the served funnel's answer to every user, from
    the history the model learnt (in process: the same funnel code, no gRPC)."""
    from bench.in_process import in_process_funnel
    from gateway.funnel import RecommendQuery

    funnel = in_process_funnel(bundle)
    scores = []
    for user, sequence in zip(dataset.user_ids, dataset.sequences, strict=True):
        history = [dataset.item_ids[i] for i in sequence]
        answer = await funnel.recommend(RecommendQuery(user, k, history), time.monotonic() + 30)
        scores.append(population.ndcg(user, [r.item_id for r in answer.items], set(map(int, sequence)), k))
    return float(np.mean(scores))


def run_experiment_bench(config: ExperimentBenchConfig, progress: Callable[[str], None] = lambda _: None
                         ) -> dict[str, Any]:
    from cluster.demo import fresh_event_log

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="recfunnel-experiment-bench-"))
    population = Population(config)
    weak_data, full_data = population.dataset(config.weak_history, config.seed), population.dataset(
        config.history, config.seed)
    report: dict[str, Any] = {"config": asdict(config),
                              "true_propensity": [round(float(p), 4) for p in population.propensity]}
    progress(f"training the weaker model ({config.weak_history} interactions a user)")
    weaker = _train(weak_data, workdir / "weaker", config, config.seed)
    if "ab" in config.phases:
        progress(f"training the better model ({config.history} interactions a user)")
        better = _train(full_data, workdir / "better", config, config.seed)
        report["models_true_ndcg@10"] = {"weaker": asyncio.run(true_ndcg(weaker, weak_data, population, 10)),
                                         "better": asyncio.run(true_ndcg(better, weak_data, population, 10))}
    if "aa" in config.phases:
        report["aa"] = asyncio.run(_aa(weaker, fresh_event_log(workdir / "aa.sqlite", weak_data), population,
                                       config, progress))
    if "ab" in config.phases:
        report["ab"] = asyncio.run(_ab(weaker, better, fresh_event_log(workdir / "ab.sqlite", weak_data),
                                       population, config, progress))
    if "debias" in config.phases:
        report["debiasing"] = _debiasing(weaker, weak_data, population, config, workdir, progress)
    report["seconds"] = round(time.perf_counter() - started, 1)
    shutil.rmtree(workdir, ignore_errors=True)
    return report


def _debiasing(weaker: Path, weak_data: Dataset, population: Population, config: ExperimentBenchConfig,
               workdir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """Serve with exploration, estimate the propensities, and train naive and inverse-propensity
    models from the same logged clicks."""
    from cluster.demo import fresh_event_log
    from cluster.loop import LoopConfig, position_factors
    from gateway.events import EventLog
    from gateway.propensity import PositionPropensity, inverse_propensity_factors
    from recdata.feedback import with_feedback

    progress(f"logging {config.log_answers} answers with {config.swap_share:.0%} exploration")
    log_db = fresh_event_log(workdir / "logged.sqlite", weak_data)
    since, through = asyncio.run(_logged_clicks(weaker, log_db, population, config))
    store = EventLog(log_db)
    loop_config = LoopConfig(inverse_propensity=True, propensity_clip=config.propensity_clip,
                             exploration_depth=config.k)
    factors, debiasing = position_factors(store, loop_config, since, through)
    # The same weighting with the simulator's own propensities: what a perfect estimate would
    # give, which tells the estimate's error apart from what weighting can do at all.
    true_propensity = PositionPropensity(tuple(float(p) for p in population.propensity), (), config.k)
    true_factors, _ = inverse_propensity_factors(store.shown_positions(since, through), true_propensity,
                                                 config.propensity_clip)
    events = store.events_between(since, through)
    store.close()
    learnt: dict[str, Any] = {}
    for name, weights in (("naive", None), ("inverse_propensity", factors),
                          ("inverse_true_propensity", true_factors)):
        data = with_feedback(weak_data, events, factors=weights).dataset
        progress(f"training on the logged clicks: {name}")
        bundle = _train(data, workdir / name, config, config.seed)
        learnt[name] = asyncio.run(true_ndcg(bundle, data, population, 10))
    return {"clicks": len(events), "estimated_propensity": debiasing["propensity"],
            "weights": debiasing["inverse_propensity"], "true_ndcg@10": learnt,
            "inverse_propensity_over_naive": learnt["inverse_propensity"] / learnt["naive"],
            "true_propensity_over_naive": learnt["inverse_true_propensity"] / learnt["naive"]}
