"""The evaluation protocol: exclusions, the served-path equivalence, baselines and the report."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.in_process import in_process_funnel
from gateway.funnel import RecommendQuery
from ranking.baselines import SASRecTrainer, popularity_scorer
from ranking.config import TrainConfig
from ranking.evaluation import Evaluation, FunnelScorer
from ranking.inference import with_new_item_slot
from ranking.quality import EvaluateConfig, beyond_accuracy, evaluate
from ranking.scores import DenseScores, SeenItems, seen_mask, top_unseen
from ranking.text_encoder import TextEncoder
from recdata.bundle import load_bundle, load_weights
from recdata.ceiling import Generator
from recdata.dataset import Dataset
from recdata.split import leave_last_two
from tests.conftest import TINY_DATA, TINY_TRAINING


def hand_dataset() -> Dataset:
    sequences = [np.array([0, 1, 2, 3]), np.array([4, 3, 2, 1, 0]), np.array([5, 5, 5])]
    return Dataset("hand", ["a", "b", "c"], [f"i{n}" for n in range(8)], sequences, [""] * 8)


def test_full_ranking_excludes_seen_items_and_never_the_target() -> None:
    split = leave_last_two(hand_dataset())
    cases = Evaluation(split, 8, validation=False)
    # Seen items score highest; they must not count. User c's target (5) is also in its history.
    def scorer(histories):
        scores = torch.zeros(len(histories), 8)
        for b, history in enumerate(histories):
            scores[b, torch.from_numpy(np.asarray(history))] = 10.0
        scores[:, 7] = 5.0  # one unseen item above every target
        return DenseScores.of_matrix(scores)

    ranks = cases.full_ranks(scorer)
    # a: target 3, seen {0,1,2}; unseen above it: item 7 only; ties (4, 5, 6 at 0) count against it.
    assert ranks[0] == 1 + 3
    # c: target 5 was seen before, yet it is ranked (score 10 beats item 7), never excluded.
    assert ranks[2] == 0


def test_sampled_protocol_draws_unseen_items_only_and_is_seeded() -> None:
    split = leave_last_two(hand_dataset())
    a = Evaluation(split, 8, validation=False, seed=3, negatives=3)
    b = Evaluation(split, 8, validation=False, seed=3, negatives=3)
    for negatives, history, target in zip(a.negatives, a.histories, a.targets.tolist(), strict=True):
        assert not set(negatives.tolist()) & (set(history.tolist()) | {target})
    assert all(np.array_equal(x, y) for x, y in zip(a.negatives, b.negatives, strict=True))


def test_sampled_protocol_ranks_against_every_unseen_item_where_fewer_than_asked_are_left() -> None:
    """Eight items and 100 negatives asked: each case ranks against all its unseen items."""
    split = leave_last_two(hand_dataset())
    cases = Evaluation(split, 8, validation=False, negatives=100)
    ranks = cases.sampled_ranks(lambda histories, items: items.float())   # the item number as its score
    for rank, history, target in zip(ranks, cases.histories, cases.targets.tolist(), strict=True):
        unseen = set(range(8)) - set(history.tolist()) - {target}
        assert rank == sum(item > target for item in unseen)


def test_batched_funnel_scores_match_the_served_path(tiny_bundle, tiny_dataset) -> None:
    """The evaluation's batched funnel and the gateway's funnel over FAISS shards agree, with
    every channel (item2item and popular included) on both sides."""
    budgets = {"sequential": 40, "semantic": 10, "item2item": 10, "popular": 5}
    scorer = FunnelScorer.from_bundle(tiny_bundle, budgets)
    served = in_process_funnel(tiny_bundle, num_shards=2, channel_budgets=budgets)
    split = leave_last_two(tiny_dataset)
    for position in range(0, 40, 4):
        history = split.test_history(position)
        batched = scorer.funnel_scores([history]).dense()[0]
        expected = [tiny_dataset.item_ids[i] for i in batched.topk(10).indices.tolist()]
        answer = asyncio.run(served.recommend(
            RecommendQuery("u", 10, [tiny_dataset.item_ids[i] for i in history]), time.monotonic() + 5))
        assert [r.item_id for r in answer.items] == expected
        np.testing.assert_allclose([r.score for r in answer.items], batched.topk(10).values.numpy(), rtol=1e-4)


def test_candidates_shown_as_cold_carry_no_item2item_or_popular_flag(tiny_bundle, tiny_dataset) -> None:
    """A real cold item is never proposed by item2item or popular, so a training candidate shown
    as cold scores the same whatever those flags say; shown as warm, the flags count."""
    scorer = FunnelScorer.from_bundle(tiny_bundle, {"sequential": 10})
    scorer.cold_table = scorer.item_table[1:] * 0.5
    histories = [tiny_dataset.sequences[u][:-2] for u in range(4)]
    users, semantic = scorer.queries(histories)
    items = torch.arange(8).repeat(4, 1)
    with_history = torch.zeros(4, 8, 4)
    with_history[..., 2:] = 1.0  # proposed by item2item and popular
    plain = torch.zeros(4, 8, 4)
    cold, warm = torch.ones(4, 8, dtype=torch.bool), torch.zeros(4, 8, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(scorer.rank(histories, users, semantic, items, with_history, cold),
                                   scorer.rank(histories, users, semantic, items, plain, cold))
        assert not torch.allclose(scorer.rank(histories, users, semantic, items, with_history, warm),
                                  scorer.rank(histories, users, semantic, items, plain, warm))


def test_popularity_and_sasrec_baselines(tiny_dataset) -> None:
    split = leave_last_two(tiny_dataset)
    valid = Evaluation(split, tiny_dataset.num_items, validation=True)
    test = Evaluation(split, tiny_dataset.num_items, validation=False)
    popular = test.full(popularity_scorer(split, tiny_dataset.num_items))
    # BCE with one negative learns slowly: give it more epochs than the funnel's tiny runs.
    sasrec = SASRecTrainer(split, tiny_dataset.num_items, replace(TINY_TRAINING, epochs=30, patience=30), valid)
    sasrec.train()
    learned = test.full(sasrec.scores)
    assert learned["hr@10"] > 2 * (10 / tiny_dataset.num_items)
    assert popular["hr@10"] > 10 / tiny_dataset.num_items
    softmax = SASRecTrainer(split, tiny_dataset.num_items, replace(TINY_TRAINING, epochs=10, patience=10), valid,
                            loss="ce")
    softmax.train()
    assert test.full(softmax.scores)["hr@10"] > 2 * (10 / tiny_dataset.num_items)


def test_the_sasrec_baselines_keep_sasrec_blocks_when_the_funnel_uses_hstu(tiny_dataset) -> None:
    from ranking.query_encoder import Block

    split = leave_last_two(tiny_dataset)
    hstu = replace(TINY_TRAINING, model=replace(TINY_TRAINING.model, encoder="hstu"))
    sasrec = SASRecTrainer(split, tiny_dataset.num_items, hstu, Evaluation(split, tiny_dataset.num_items, True))
    assert all(isinstance(block, Block) for block in sasrec.model.encoder.blocks)
    assert sasrec.model.encoder.position is not None


def test_the_bce_baseline_takes_the_papers_width_and_optimiser_and_ce_the_funnels(tiny_dataset) -> None:
    from ranking.baselines import PAPER_BETAS, PAPER_DIM, PAPER_LR

    split = leave_last_two(tiny_dataset)
    valid = Evaluation(split, tiny_dataset.num_items, True)
    bce = SASRecTrainer(split, tiny_dataset.num_items, TINY_TRAINING, valid, loss="bce")
    assert bce.model.items.embedding_dim == PAPER_DIM and bce.config.lr == PAPER_LR and bce.betas == PAPER_BETAS
    ce = SASRecTrainer(split, tiny_dataset.num_items, TINY_TRAINING, valid, loss="ce")
    assert ce.model.items.embedding_dim == TINY_TRAINING.model.dim and ce.config.lr == TINY_TRAINING.lr


class ScriptedValidation:
    """A validation whose NDCG@10 after each epoch is given in advance."""

    def __init__(self, figures: list[float]):
        self.figures = iter(figures)

    def full(self, scorer) -> dict[str, float]:  # type: ignore[no-untyped-def]
        return {"ndcg@10": next(self.figures)}


def test_a_baseline_that_keeps_improving_is_not_cut_by_a_hidden_cap(tiny_dataset) -> None:
    split = leave_last_two(tiny_dataset)
    # The funnel's own time budget is tiny here: the baseline must not read it.
    config = replace(TINY_TRAINING, epochs=6, patience=2, time_budget_s=1e-6)
    sasrec = SASRecTrainer(split, tiny_dataset.num_items, config, ScriptedValidation([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    sasrec.train()
    assert sasrec.stop["reason"] == "epochs" and sasrec.stop["epochs"] == 6 and not sasrec.stop["capped"]
    assert [p["ndcg@10"] for p in sasrec.curve] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


def test_a_baseline_stops_on_patience_and_keeps_its_best_epoch(tiny_dataset) -> None:
    split = leave_last_two(tiny_dataset)
    config = replace(TINY_TRAINING, epochs=50, patience=2)
    sasrec = SASRecTrainer(split, tiny_dataset.num_items, config, ScriptedValidation([0.1, 0.3, 0.2, 0.25, 0.9]))
    sasrec.train()
    assert sasrec.stop["reason"] == "patience" and sasrec.stop["epochs"] == 4 and sasrec.stop["best_epoch"] == 2


def test_a_capped_baseline_is_marked_as_capped(tiny_dataset) -> None:
    split = leave_last_two(tiny_dataset)
    sasrec = SASRecTrainer(split, tiny_dataset.num_items, replace(TINY_TRAINING, epochs=50, patience=50),
                           ScriptedValidation([0.1 * n for n in range(1, 51)]), time_budget_s=1e-6)
    sasrec.train()
    assert sasrec.stop["reason"] == "time budget" and sasrec.stop["capped"] and sasrec.stop["epochs"] == 1


def test_beyond_accuracy_by_hand() -> None:
    vectors = np.array([[1.0, 0], [0, 1.0], [1.0, 0], [0.6, 0.8]])
    lists = np.array([[0, 1], [0, 2]])
    metrics = beyond_accuracy(lists, vectors, popularity=np.array([9.0, 0, 4, 1]), num_users=9)
    assert metrics["coverage@10"] == pytest.approx(3 / 4)
    assert metrics["ild@10"] == pytest.approx((1.0 + 0.0) / 2)  # orthogonal pair, identical pair
    expected = np.mean([-np.log2(10 / 10), -np.log2(1 / 10), -np.log2(10 / 10), -np.log2(5 / 10)])
    assert metrics["novelty@10"] == pytest.approx(expected)


def test_evaluate_report_has_every_section(tiny_bundle, tiny_dataset, text_encoder) -> None:
    report = evaluate(tiny_bundle, tiny_dataset, EvaluateConfig(seconds_per_model=5.0, cold_draws=2), text_encoder,
                      generator=Generator(TINY_DATA, "redraw"))
    assert {"funnel", "recall", "baselines", "ablation", "cold_start", "beyond_accuracy", "ceiling"} <= set(report)
    assert set(report["funnel"]["full"]) >= {"hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20"}
    assert set(report["funnel"]["sampled100"]) == {"hr@10", "ndcg@10"}
    assert 0 < report["recall"]["hit_rate_at_budget"] <= 1 and report["recall"]["budget"] == 65
    assert set(report["baselines"]) == {"popularity", "sasrec_bce", "sasrec_ce"}
    for name in ("sasrec_bce", "sasrec_ce"):
        assert {"epochs", "reason", "capped", "best_epoch", "still_improving"} <= set(report["baselines"][name])
    cold = report["cold_start"]
    assert cold["items"] == 40 and [d["seed"] for d in cold["draws"]] == [0, 1]  # two draws of 20, pooled
    assert cold["cases"] == sum(d["cases"] for d in cold["draws"])
    assert set(cold["hr@10"]) == {"text", "no_text", "random"}
    assert report["funnel"]["sampled100"]["hr@10"] >= report["funnel"]["full"]["hr@10"]
    # The generator's own odds rank the same cases above every trained model, and the room
    # above the best SASRec is measured from that baseline.
    ceiling, room = report["ceiling"]["full"]["ndcg@10"], report["ceiling"]["room"]
    assert ceiling > report["funnel"]["full"]["ndcg@10"]
    best = max(("sasrec_bce", "sasrec_ce"), key=lambda name: report["baselines"][name]["full"]["ndcg@10"])
    assert room["best_baseline"] == best
    floor = report["baselines"][best]["full"]["ndcg@10"]
    assert room["ceiling_over_best"] == pytest.approx(ceiling / floor)
    assert room["funnel_share_of_room"] == pytest.approx((report["funnel"]["full"]["ndcg@10"] - floor)
                                                         / (ceiling - floor))


def test_evaluate_refuses_a_bundle_of_another_catalogue(tiny_bundle) -> None:
    with pytest.raises(ValueError, match="another catalogue"):
        evaluate(tiny_bundle, hand_dataset(), EvaluateConfig(baselines=False))


def test_the_last_place_goes_to_the_best_new_item_when_none_made_the_list() -> None:
    scores = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0])
    is_new = np.array([False, False, False, False, False, False, True, True])
    order = np.arange(5)
    assert with_new_item_slot(order, scores, is_new, 5).tolist() == [0, 1, 2, 3, 6]  # 6 beats 7
    assert with_new_item_slot(order[:4], scores, is_new, 4).tolist() == [0, 1, 2, 3]  # short lists: relevance
    assert with_new_item_slot(np.array([0, 1, 2, 3, 6]), scores, is_new, 5).tolist() == [0, 1, 2, 3, 6]
    assert with_new_item_slot(order, scores, np.zeros(8, bool), 5).tolist() == order.tolist()
    never_proposed = np.where(is_new, -np.inf, scores)
    assert with_new_item_slot(order, never_proposed, is_new, 5).tolist() == order.tolist()
    # Another place moves the rest down, in their order; a place beyond the list is its last.
    assert with_new_item_slot(order, scores, is_new, 5, place=1).tolist() == [6, 0, 1, 2, 3]
    assert with_new_item_slot(order, scores, is_new, 5, place=2).tolist() == [0, 6, 1, 2, 3]
    assert with_new_item_slot(order, scores, is_new, 5, place=9).tolist() == [0, 1, 2, 3, 6]


def test_served_and_evaluated_lists_keep_the_same_place_for_new_items(tiny_bundle, tiny_dataset,
                                                                      tmp_path) -> None:
    """With items that have no interactions, the gateway's answer and the evaluation's top 10
    are the same list, the best new item in its last place."""
    bundle = load_bundle(tiny_bundle)
    popularity = bundle.arrays["popularity"].copy()
    new_items = np.argsort(popularity)[-40:]  # popular ones, so recall proposes them often
    popularity[new_items] = 0
    bundle.arrays = {**bundle.arrays, "popularity": popularity}
    folder = bundle.save(tmp_path / "with-new-items", {
        name: load_weights(tiny_bundle, name) for name in ("query_encoder", "ranker")})
    budgets = {"sequential": 40, "semantic": 10, "item2item": 10, "popular": 5}
    scorer = FunnelScorer.from_bundle(folder, budgets)
    served = in_process_funnel(folder, num_shards=2, channel_budgets=budgets)
    split = leave_last_two(tiny_dataset)
    slots_used = 0
    for position in range(0, 60, 3):
        history = split.test_history(position)
        top = scorer.funnel_scores([history]).dense()[0].topk(10).indices
        evaluated = [tiny_dataset.item_ids[i] for i in top.tolist()]
        plain_scores = replace(scorer, new_item_slot=False).funnel_scores([history]).dense()[0]
        plain = plain_scores.topk(10).indices.tolist()
        answer = asyncio.run(served.recommend(
            RecommendQuery("u", 10, [tiny_dataset.item_ids[i] for i in history]), time.monotonic() + 5))
        assert [r.item_id for r in answer.items] == evaluated
        assert any(tiny_dataset.item_ids.index(i) in new_items for i in evaluated)
        slots_used += not any(i in new_items for i in plain)
    assert slots_used > 0  # the place was really given, not only already taken by relevance


def test_user_sample_is_seeded_fixed_and_all_when_small() -> None:
    from ranking.evaluation import user_sample

    assert user_sample(943, 10_000, 0) is None and user_sample(943, 0, 0) is None
    sample = user_sample(10_000, 500, 3)
    assert sample is not None and len(sample) == len(set(sample.tolist())) == 500
    assert (np.diff(sample) > 0).all() and sample.max() < 10_000
    assert (sample == user_sample(10_000, 500, 3)).all() and not (sample == user_sample(10_000, 500, 4)).all()


def dense_report(histories: list[np.ndarray], targets: torch.Tensor, scores: torch.Tensor,
                 k: int = 10) -> tuple[np.ndarray, ...]:
    """Full ranking the plain way, from one (cases, items) matrix of scores."""
    seen = seen_mask(histories, scores.shape[1])
    top = scores.masked_fill(seen, -float("inf")).topk(k, dim=1).indices
    rows = torch.arange(len(histories))
    seen[rows, targets] = False
    target_scores = scores[rows, targets][:, None]
    ranks = ((scores >= target_scores) & ~seen).sum(1) - 1
    return ranks.numpy(), torch.isfinite(target_scores[:, 0]).numpy(), top.numpy()


@pytest.mark.parametrize("scores_per_chunk", [7 * 256, 256 * 256])
def test_full_ranking_read_in_item_chunks_equals_the_whole_matrix(
        tiny_bundle: Path, tiny_dataset, monkeypatch: pytest.MonkeyPatch, scores_per_chunk: int) -> None:
    """Ranks, hits and top-10 lists do not depend on how many items a chunk holds: recall's
    dense scores, the funnel's proposed ones, and every channel's top-k inside the funnel
    (the same scores; which of two exactly tied items is kept may differ)."""
    import ranking.scores as scores

    split = leave_last_two(tiny_dataset)
    cases = Evaluation(split, tiny_dataset.num_items, validation=False)
    scorer = FunnelScorer.from_bundle(tiny_bundle, dict(TrainConfig().candidates_per_channel), "cpu")
    recall_expected = dense_report(cases.histories, cases.targets, scorer.recall_scores(cases.histories).dense())
    proposed = scorer.funnel_scores(cases.histories)
    funnel_expected = dense_report(cases.histories, cases.targets, proposed.dense())
    users, semantic = scorer.queries(cases.histories)
    channels = {"sequential": lambda a, b: users @ scorer.item_table[1 + a : 1 + b].T,
                "semantic": lambda a, b: semantic @ scorer.text_t[a:b].T,
                "item2item": scorer.item2item(cases.histories)}
    whole = {name: top_unseen(chunk, tiny_dataset.num_items, SeenItems(cases.histories), 20)[0]
             for name, chunk in channels.items()}

    monkeypatch.setattr(scores, "SCORES_PER_CHUNK", scores_per_chunk)  # 7 items a chunk at the smallest
    for got, want in zip(cases.full_report(scorer.recall_scores), recall_expected, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(proposed.report(cases.targets, SeenItems(cases.histories), 10), funnel_expected,
                         strict=True):
        np.testing.assert_array_equal(got.numpy(), want)
    for name, chunk in channels.items():
        values, _ = top_unseen(chunk, tiny_dataset.num_items, SeenItems(cases.histories), 20)
        # The same scores up to the rounding of a differently blocked matrix product.
        torch.testing.assert_close(values, whole[name], msg=name)


def test_evaluate_on_a_user_sample_says_so(tiny_bundle: Path, tiny_dataset, text_encoder: TextEncoder) -> None:
    report = evaluate(tiny_bundle, tiny_dataset, EvaluateConfig(baselines=False, users=40), text_encoder)
    assert report["cases"] == 40
    assert report["evaluated_users"] == {"sample": True, "count": 40, "seed": 0}
    whole = evaluate(tiny_bundle, tiny_dataset, EvaluateConfig(baselines=False), text_encoder)
    assert whole["evaluated_users"]["sample"] is False and whole["cases"] == tiny_dataset.num_users


def test_without_item_text_evaluate_says_what_it_measured_on(tiny_bundle, tiny_dataset, text_encoder) -> None:
    """No text: cold start is not applicable (not 0.0), diversity is on the item vectors and in
    its range, and a data set without times says its histories are in file order."""
    n = tiny_dataset.num_items
    bare = replace(tiny_dataset, item_texts=[""] * n, item_tags=[() for _ in range(n)], timestamps=None)
    report = evaluate(tiny_bundle, bare, EvaluateConfig(seconds_per_model=2.0), text_encoder)
    assert report["cold_start"]["applicable"] is False and "no text" in report["cold_start"]["why"]
    assert report["ablation"]["no_text"]["applicable"] is False  # the funnel is the no-text model
    assert report["beyond_accuracy"]["ild_on"] == "item vectors (no item text)"
    assert 0.0 <= report["beyond_accuracy"]["ild@10"] <= 2.0
    assert report["history_order"] == "file order (no timestamps)"
    with_text = evaluate(tiny_bundle, tiny_dataset, EvaluateConfig(baselines=False), text_encoder)
    assert with_text["beyond_accuracy"]["ild_on"] == "item text vectors"
