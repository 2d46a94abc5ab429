"""Co-occurrence neighbours and recent popularity, the item2item and popular channels' data,
and each item's next items, the ranker's follow share."""

from __future__ import annotations

import numpy as np

from recdata.channels import popular_scores, recency_weights
from recdata.dataset import from_events
from recdata.item_stats import cooccurrence_neighbours, next_item_shares, recent_popularity


def test_neighbours_come_from_nearby_positions_and_discount_popularity() -> None:
    # 0 and 1 always appear together; 2 is everywhere, so it co-occurs with 0 only by chance.
    sequences = [np.array([0, 1, 2]), np.array([1, 0, 2]), np.array([0, 1, 2]), np.array([2, 3]), np.array([2, 4])]
    ids, scores = cooccurrence_neighbours(sequences, num_items=6, window=2, neighbours=3)
    assert ids.shape == scores.shape == (6, 3) and ids.dtype == np.int32
    assert ids[0, 0] == 1 and ids[1, 0] == 0          # strongest partner first
    assert scores[0, 0] > scores[0, 1] > 0            # 2 is a weaker neighbour of 0 than 1 is
    assert list(ids[5]) == [-1, -1, -1] and not scores[5].any()  # no interactions, no neighbours
    assert 0 not in ids[0]                             # an item is not its own neighbour


def test_window_bounds_the_distance_of_neighbours() -> None:
    ids, _ = cooccurrence_neighbours([np.array([0, 1, 2, 3])], num_items=4, window=1, neighbours=3)
    assert set(ids[0]) - {-1} == {1} and set(ids[1]) - {-1} == {0, 2}


def test_next_items_follow_order_and_count_by_hand() -> None:
    # 0 -> 1 twice, 0 -> 2 once; 1 -> 2 and 1 -> 3 once each; 2 is never followed; 1 -> 0 is
    # the other direction and does not count for 0.
    sequences = [np.array([0, 1, 2]), np.array([0, 1, 3]), np.array([0, 2]), np.array([1, 0]), np.array([4])]
    ids, shares = next_item_shares(sequences, num_items=5, kept=2)
    assert ids.shape == shares.shape == (5, 2) and ids.dtype == np.int32
    assert ids[0].tolist() == [1, 2] and shares[0].tolist() == [2 / 4, 1 / 4]   # three next steps, + 1
    assert ids[1].tolist() == [0, 2] and np.allclose(shares[1], [1 / 4, 1 / 4])  # ties by index; one kept out
    assert ids[2].tolist() == [-1, -1] and not shares[2].any()
    empty_ids, _ = next_item_shares([np.array([3])], num_items=4)
    assert (empty_ids == -1).all()


def test_recent_popularity_cuts_by_time_or_by_each_users_latest_share() -> None:
    dataset = from_events("t", ["a", "a", "a", "b", "b"], ["x", "y", "z", "x", "z"],
                          np.array([1, 2, 10, 3, 9]))
    assert [list(t) for t in dataset.timestamps or []] == [[1, 2, 10], [3, 9]]
    recent = recent_popularity(dataset.sequences, dataset.num_items, dataset.timestamps, share=0.4)
    assert dict(zip(dataset.item_ids, recent.tolist(), strict=True)) == {"x": 0, "y": 0, "z": 2}
    by_position = recent_popularity([np.array([0, 1, 2, 3, 4])], 5, None, share=0.2)
    assert by_position.tolist() == [0, 0, 0, 0, 1]


def test_popular_score_lifts_trending_items_and_recent_items_weigh_most() -> None:
    all_time, recent = np.array([100.0, 80.0, 5.0]), np.array([0.0, 20.0, 5.0])
    scores = popular_scores(all_time, recent, recent_share=0.1)
    assert scores[1] > scores[0]  # fewer interactions overall, but all of them lately
    weights = recency_weights(3)
    assert weights[-1] == 1.0 and weights[0] < weights[1] < weights[2]
