"""The per-user time split and the ranking metrics, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recdata.dataset import Dataset
from recdata.metrics import ranking_metrics, sample_unseen, sampled_rank, target_rank
from recdata.split import leave_last_two


def dataset(sequences: list[list[int]], num_items: int = 6) -> Dataset:
    return Dataset("hand", [f"u{n}" for n in range(len(sequences))], [f"i{n}" for n in range(num_items)],
                   [np.asarray(s) for s in sequences], [""] * num_items)


def test_split_holds_out_the_last_two_items_in_time_order() -> None:
    split = leave_last_two(dataset([[0, 1, 2, 3], [4, 5], [5, 4, 3]]))
    assert split.users.tolist() == [0, 2]  # user 1 is too short to evaluate
    assert [t.tolist() for t in split.train] == [[0, 1], [4, 5], [5]]
    assert split.valid_targets.tolist() == [2, 4]
    assert split.test_targets.tolist() == [3, 3]
    assert split.valid_history(0).tolist() == [0, 1]
    assert split.test_history(0).tolist() == [0, 1, 2]
    assert split.test_history(1).tolist() == [5, 4]


def test_target_rank_skips_seen_items_and_counts_ties_against_the_target() -> None:
    scores = np.array([0.9, 0.8, 0.5, 0.5, 0.1])
    assert target_rank(scores, 2, seen=[]) == 3   # 0, 1 and the tie at 3 rank ahead
    assert target_rank(scores, 2, seen=[0, 3]) == 1
    assert target_rank(scores, 2, seen=[2]) == 3  # the target is never excluded


def test_constant_scores_put_the_target_last() -> None:
    assert target_rank(np.zeros(10), 4, seen=[0]) == 8


def test_metrics_match_hand_computed_values() -> None:
    m = ranking_metrics([0, 1, 9, 10, 25], ks=(10, 20))
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 10) / 5)
    assert m["hr@20"] == pytest.approx(4 / 5)
    assert m["mrr@20"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11) / 5)


def test_metrics_need_cases() -> None:
    with pytest.raises(ValueError):
        ranking_metrics([])


def test_sampled_protocol_never_samples_seen_items_or_the_target() -> None:
    rng = np.random.default_rng(0)
    negatives = sample_unseen(rng, 200, seen=np.arange(50), target=120, count=100)
    assert len(set(negatives.tolist())) == 100
    assert not set(negatives.tolist()) & (set(range(50)) | {120})
    scores = np.arange(200, dtype=float)
    assert sampled_rank(scores, 120, negatives) == int((negatives > 120).sum())


def test_validation_cases_weigh_as_their_events_and_test_cases_alike() -> None:
    from dataclasses import replace

    import torch

    from ranking.evaluation import Evaluation
    from ranking.scores import DenseScores

    plain = dataset([[0, 1, 2, 3], [4, 5], [5, 4, 3]])
    weighted = replace(plain, weights=[np.array([1.0, 1, 3, 1]), np.ones(2), np.array([1.0, 1, 1])])
    split = leave_last_two(weighted)
    assert split.valid_weights is not None and split.valid_weights.tolist() == [3.0, 1.0]
    assert leave_last_two(plain).valid_weights is None
    # Hand example: ranks 0 and 3, the first case weighing 3: HR@1 = 3/4, NDCG@10 = (3 + 1/log2 5)/4.
    metrics = ranking_metrics([0, 3], ks=(1, 10), weights=np.array([3.0, 1.0]))
    assert metrics["hr@1"] == pytest.approx(0.75)
    assert metrics["ndcg@10"] == pytest.approx((3 + 1 / math.log2(5)) / 4)
    with pytest.raises(ValueError, match="1 weights for 2 cases"):
        ranking_metrics([0, 3], weights=np.array([1.0]))

    table = torch.tensor([[0.0], [6], [5], [4], [3], [2], [1]])  # padding row, then item 0 best .. item 5 worst

    def lower_items_first(histories: list[np.ndarray]) -> DenseScores:
        return DenseScores.inner_products(torch.ones(len(histories), 1), table)

    valid = Evaluation(split, 6, validation=True).full(lower_items_first)
    # Validation targets: item 2 after [0, 1] (rank 0), weighing 3; item 4 after [5] (rank 4).
    assert valid["ndcg@10"] == pytest.approx((3 * 1.0 + 1 / math.log2(6)) / 4)
    test = Evaluation(split, 6, validation=False)
    assert test.weights is None and test.full(lower_items_first)["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 2)
