"""`recfunnel evaluate`: a bundle's quality under DESIGN.md's protocol, against baselines
trained in the same run, with the text ablation, the cold-start test and, on a synthetic set,
the ceiling its generator sets."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ranking.baselines import BASELINE_EPOCHS, SASRecLoss, SASRecTrainer, popularity_scorer
from ranking.config import ModelConfig, TrainConfig
from ranking.devices import resolve_device
from ranking.evaluation import BatchProgress, Evaluation, FullScorer, FunnelScorer, items_from_full, user_sample
from ranking.scores import DenseScores
from ranking.text_encoder import TextEncoder
from ranking.train import Trainer, fit
from recdata.bundle import load_bundle
from recdata.ceiling import Generator, NextItemOdds
from recdata.channels import SEMANTIC, SEQUENTIAL
from recdata.dataset import Dataset
from recdata.metrics import ranking_metrics
from recdata.segments import cold_user_report
from recdata.split import leave_last_two

log = logging.getLogger(__name__)

Report = Callable[[str], None]


@dataclass(frozen=True)
class EvaluateConfig:
    seconds_per_model: float = 100.0  # training budget of each model trained during evaluation
    cold_share: float = 0.1           # share of items made cold for the cold-start test
    # Seeded draws of cold items, their cases pooled. One draw of ML-100K gives ~107 cases
    # and 0 to 5 hits, too few to tell two models apart; each extra draw trains two more
    # models (about 4.5 min here), so the default keeps `evaluate` within its time target.
    cold_draws: int = 1
    seed: int = 0
    baselines: bool = True            # train both SASRecs, the no-text ablation and the cold-start models
    baseline_seconds: float | None = None  # cap of each SASRec baseline's training; None = to convergence
    device: str | None = None         # where every model scores and trains; None: CUDA where present
    users: int = 0                    # test and validation on this seeded sample of users; 0 = all

    def __post_init__(self) -> None:
        if not 0 < self.cold_share < 1:
            raise ValueError(f"cold_share={self.cold_share} must be in (0, 1)")
        if self.cold_draws < 1:
            raise ValueError(f"cold_draws={self.cold_draws} must be >= 1")
        if self.seconds_per_model <= 0:
            raise ValueError(f"seconds_per_model={self.seconds_per_model} must be > 0")
        if self.baseline_seconds is not None and self.baseline_seconds <= 0:
            raise ValueError(f"baseline_seconds={self.baseline_seconds} must be > 0 (unset: no cap)")
        if self.users < 0:
            raise ValueError(f"users={self.users} must be >= 0 (0 = every user)")
        resolve_device(self.device)  # a device this machine lacks is refused before any work


def has_item_text(dataset: Dataset) -> bool:
    return any(text.strip() for text in dataset.item_texts)


def beyond_accuracy(lists: np.ndarray, vectors: np.ndarray, popularity: np.ndarray, num_users: int
                    ) -> dict[str, float]:
    """Catalogue coverage, intra-list diversity (mean pairwise cosine distance of the given
    item vectors, in 0..2) and novelty (mean self-information, -log2 of an item's share of
    users)."""
    coverage = len(np.unique(lists)) / len(vectors)
    unit = vectors[lists]                                                  # (U, k, D)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=-1, keepdims=True), 1e-12)
    similarity = unit @ unit.transpose(0, 2, 1)                            # (U, k, k)
    k = lists.shape[1]
    ild = float(((1 - similarity).sum((1, 2)) / (k * (k - 1))).mean())
    novelty = float((-np.log2((popularity[lists] + 1) / (num_users + 1))).mean())
    return {"coverage@10": coverage, "ild@10": ild, "novelty@10": novelty}


def ceiling_scorer(generator: Generator, dataset: Dataset) -> FullScorer:
    """The generator's own next-item odds as a scorer of the data set's items: the ranking
    no model can pass on a synthetic set (see `recdata.ceiling`)."""
    odds = NextItemOdds(generator)
    numbers = odds.catalogue_positions(dataset.item_ids)

    def scores(histories: list[np.ndarray]) -> DenseScores:
        rows = np.stack([odds.next_item(numbers[history])[numbers] for history in histories])
        return DenseScores.of_matrix(torch.from_numpy(rows.astype(np.float32)))
    return scores


def ceiling_report(generator: Generator, dataset: Dataset, users: int = 0, seed: int = 0,
                   progress: Callable[[str], BatchProgress | None] = lambda phase: None) -> dict[str, Any]:
    """`recfunnel bench ceiling`: the generator's ranking on the validation and test cases,
    under the protocol `evaluate` uses (the same split, sample of users and ties)."""
    started = time.perf_counter()
    split = leave_last_two(dataset)
    sample = user_sample(len(split.users), users, seed)
    scorer = ceiling_scorer(generator, dataset)
    result: dict[str, Any] = {"dataset": dataset.name, "walk": generator.walk, "items": dataset.num_items,
                              "evaluated_users": {"sample": sample is not None, "seed": seed}}
    for phase, validation in (("valid", True), ("test", False)):
        cases = Evaluation(split, dataset.num_items, validation=validation, positions=sample, seed=seed)
        result["evaluated_users"]["count"] = len(cases)
        result[phase] = cases.full(scorer, progress(phase))
    result["seconds"] = time.perf_counter() - started
    return result


def room_above(baselines: dict[str, Any], funnel: float, ceiling: float) -> dict[str, Any]:
    """How the funnel and the ceiling compare with the best baseline, and the share of the
    room between that baseline and the ceiling the funnel takes."""
    best = max((name for name in baselines if name.startswith("sasrec")),
               key=lambda name: baselines[name]["full"]["ndcg@10"])
    floor = baselines[best]["full"]["ndcg@10"]
    return {"best_baseline": best, "funnel_over_best": funnel / floor, "ceiling_over_best": ceiling / floor,
            "funnel_share_of_room": (funnel - floor) / (ceiling - floor) if ceiling > floor else None}


def evaluate(bundle_dir: Path, dataset: Dataset, config: EvaluateConfig, text_encoder: TextEncoder | None = None,
             report: Report | None = None, generator: Generator | None = None) -> dict[str, Any]:
    """Everything `recfunnel evaluate --json` prints, as a dict. With the `generator` of a
    synthetic set, also the ceiling: its own next-item odds' figures on the same cases."""
    say = report or (lambda message: log.info("%s", message))
    started = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    if bundle.item_ids != dataset.item_ids:
        raise ValueError(f"bundle {bundle.version} was trained on another catalogue than {dataset.name!r}")
    budgets = dict(bundle.manifest.get("candidates_per_channel") or TrainConfig().candidates_per_channel)
    split = leave_last_two(dataset)
    num_items = dataset.num_items
    sample = user_sample(len(split.users), config.users, config.seed)
    test = Evaluation(split, num_items, validation=False, positions=sample, seed=config.seed)
    valid = Evaluation(split, num_items, validation=True, positions=sample, seed=config.seed)
    scorer = FunnelScorer.from_bundle(bundle_dir, budgets, config.device)

    # Funnel scores are -inf off the candidates: "found" is the recall hit rate at the budget.
    funnel_ranks, found, lists = test.full_report(scorer.funnel_scores)
    result: dict[str, Any] = {
        "dataset": dataset.name, "users": dataset.num_users, "items": num_items, "cases": len(test),
        # Which users the figures are over: all of them, or a seeded sample (and its seed).
        "evaluated_users": {"sample": sample is not None, "count": len(test), "seed": config.seed},
        "model_version": bundle.version,
        # Histories are in time order where the data has times (ties in file order), else in file order.
        "history_order": "timestamps" if dataset.timestamps is not None else "file order (no timestamps)",
        "funnel": {"full": ranking_metrics(funnel_ranks.tolist()),
                   "sampled100": test.sampled(scorer.funnel_item_scores)},
        "recall": {"full": test.full(scorer.recall_scores), "hit_rate_at_budget": float(found.mean()),
                   "budget": sum(budgets.values())},
        "baselines": {"popularity": {"full": test.full(popularity_scorer(split, num_items))}},
    }
    say(f"funnel NDCG@10 {result['funnel']['full']['ndcg@10']:.4f}, recall {result['recall']['full']['ndcg@10']:.4f}")
    if generator is not None:
        result["ceiling"] = {"full": test.full(ceiling_scorer(generator, dataset)), "walk": generator.walk,
                             "what": "ranking by the generator's own next-item odds; no model passes it beyond noise"}
        say(f"ceiling NDCG@10 {result['ceiling']['full']['ndcg@10']:.4f}")
    text_vectors = bundle.arrays[SEMANTIC]
    popularity = np.bincount(np.concatenate(split.train), minlength=num_items).astype(np.float64)
    # Diversity on the items' text where they have some, else on their learned vectors: a
    # catalogue without text has no text vectors to tell items apart by.
    with_text = has_item_text(dataset)
    diversity_vectors = text_vectors if with_text else bundle.arrays[SEQUENTIAL]
    result["beyond_accuracy"] = {**beyond_accuracy(lists, diversity_vectors, popularity, dataset.num_users),
                                 "ild_on": "item text vectors" if with_text else "item vectors (no item text)"}
    if any(dataset.user_properties):  # users held out whole, served from their attributes alone
        result["cold_users"] = cold_user_report(dataset.sequences, dataset.user_properties, num_items,
                                                seed=config.seed)
        say(f"cold users HR@10: attributes {result['cold_users']['attributes']['hr@10']}, popularity "
            f"{result['cold_users']['popularity']['hr@10']}")

    if config.baselines:
        model = ModelConfig.from_dict(bundle.manifest["model"])
        aux = TrainConfig(model=model, time_budget_s=config.seconds_per_model, patience=5, ranker_epochs=2,
                          ranker_time_budget_s=config.seconds_per_model / 2, seed=config.seed,
                          candidates_per_channel=tuple(budgets.items()), device=config.device)
        # The published recipe (one negative, BCE) and sampled softmax, each to convergence.
        recipes: tuple[tuple[str, SASRecLoss, int], ...] = (("sasrec_bce", "bce", 1),
                                                             ("sasrec_ce", "ce", aux.num_negatives))
        for name, loss, negatives in recipes:
            sasrec = SASRecTrainer(split, num_items, replace(aux, num_negatives=negatives, epochs=BASELINE_EPOCHS),
                                   valid, loss=loss, time_budget_s=config.baseline_seconds)
            seconds = sasrec.train()
            result["baselines"][name] = {"full": test.full(sasrec.scores),
                                         "sampled100": test.sampled(items_from_full(sasrec.scores)),
                                         "train_seconds": seconds, **sasrec.stop}
            say(f"{name} NDCG@10 {result['baselines'][name]['full']['ndcg@10']:.4f} after {sasrec.stop['epochs']} "
                f"epochs ({sasrec.stop['reason']})" + (": CAPPED while improving" if sasrec.stop["still_improving"]
                                                      else ""))

        encoder = text_encoder or TextEncoder()
        if with_text:
            no_text = Trainer(dataset, replace(aux, use_text=False))
            fit(no_text)
            result["ablation"] = {"no_text": {"full": test.full(no_text.scorer().funnel_scores)}}
            say(f"no-text funnel NDCG@10 {result['ablation']['no_text']['full']['ndcg@10']:.4f}")
        else:  # a shorter-trained copy of the funnel itself would say nothing about text
            result["ablation"] = {"no_text": {"applicable": False, "why": "the items have no text: the funnel "
                                              "is already ID-only"}}
        if dataset.item_vectors:  # the same funnel without the precomputed item vectors
            no_vectors = Trainer(dataset, replace(aux, use_vectors=False), encoder, text_vectors=text_vectors)
            fit(no_vectors)
            result["ablation"]["no_vectors"] = {"full": test.full(no_vectors.scorer().funnel_scores),
                                                "vectors": sorted(dataset.item_vectors)}
            say(f"no-vectors funnel NDCG@10 {result['ablation']['no_vectors']['full']['ndcg@10']:.4f}")

        if with_text or dataset.item_vectors:
            result["cold_start"] = cold_start(dataset, aux, config, encoder, text_vectors)
            say(f"cold start HR@10 {result['cold_start']['hr@10']}")
        else:  # an item without interactions, text or vectors has nothing to be found by
            result["cold_start"] = {"applicable": False, "why": "the items have no text and no item vectors: a "
                                    "cold item has nothing the models could recommend it from"}
        if generator is not None:
            result["ceiling"]["room"] = room_above(result["baselines"], result["funnel"]["full"]["ndcg@10"],
                                                   result["ceiling"]["full"]["ndcg@10"])
    result["seconds"] = time.perf_counter() - started
    return result


def cold_start(dataset: Dataset, aux: TrainConfig, config: EvaluateConfig, text_encoder: TextEncoder,
               text_vectors: np.ndarray | None = None) -> dict[str, Any]:
    """HR@10 on test cases whose target lost all its training interactions, with the items'
    content (`text`: text, tags and any item vectors), without the item vectors
    (`no_vectors`, where the data has some) and without any content (`no_text`), against a
    random ranking's expectation (10 / the user's candidate count); the cases of
    `cold_draws` seeded draws of cold items are pooled, and each draw is reported too."""
    split = leave_last_two(dataset)
    modes = {"text": replace(aux, use_text=True, use_vectors=True), "no_text": replace(aux, use_text=False)}
    if dataset.item_vectors:
        modes["no_vectors"] = replace(aux, use_text=True, use_vectors=False)
    hits: dict[str, list[np.ndarray]] = {name: [] for name in [*modes, "random"]}
    draws = []
    for draw in range(config.cold_draws):
        rng = np.random.default_rng(config.seed + draw)
        cold = rng.choice(dataset.num_items, size=max(1, int(config.cold_share * dataset.num_items)), replace=False)
        cases = np.flatnonzero(np.isin(split.test_targets, cold))
        if len(cases) == 0:
            continue
        evaluation = Evaluation(split, dataset.num_items, validation=False, positions=cases, seed=config.seed)
        for name, mode in modes.items():
            trainer = Trainer(dataset, mode, text_encoder, cold_items=cold, text_vectors=text_vectors)
            fit(trainer)
            hits[name].append(evaluation.full_ranks(trainer.scorer().funnel_scores) < 10)
        unseen = np.array([dataset.num_items - len(set(h.tolist())) for h in evaluation.histories])
        hits["random"].append(10 / unseen)
        draws.append({"seed": config.seed + draw, "items": len(cold), "cases": len(cases),
                      "hr@10": {name: float(values[-1].mean()) for name, values in hits.items()}})
    if not draws:
        return {"applicable": True, "items": 0, "cases": 0, "hr@10": {}, "draws": []}
    return {"applicable": True, "items": sum(d["items"] for d in draws), "cases": sum(d["cases"] for d in draws),
            "hr@10": {name: float(np.concatenate(values).mean()) for name, values in hits.items()},
            "draws": draws}
