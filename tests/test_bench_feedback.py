"""`recfunnel bench feedback`'s data sets: every variant is judged on the same positive targets."""

from __future__ import annotations

import numpy as np

from bench.feedback import rating_variants
from recdata.dataset import Dataset
from recdata.split import leave_last_two


def test_every_variant_holds_out_the_same_last_two_positive_ratings() -> None:
    sequences = [np.array([0, 1, 2, 3, 4, 5, 6]), np.array([1, 2, 3]), np.array([4, 5, 6, 0])]
    ratings = [np.array([5.0, 1, 4, 2, 3, 5, 1]), np.array([4.0, 1, 5]), np.array([1.0, 2, 5, 4])]
    times = [np.arange(len(s), dtype=np.float64) for s in sequences]
    data = Dataset("d", ["u", "v", "w"], [str(i) for i in range(7)], sequences, [""] * 7, timestamps=times)
    variants = rating_variants(data, ratings, dislike_at=2.0)
    splits = {name: leave_last_two(d) for name, d in variants.items()}
    # u: positives 0, 2, 4, 5 -> targets 4 (valid) and 5 (test); its last dislike (6) came after.
    for split in splits.values():
        assert split.users.tolist() == [0] and split.valid_targets.tolist() == [4]
        assert split.test_targets.tolist() == [5]
    assert splits["all_positive"].train[0].tolist() == [0, 1, 2, 3]      # dislikes read as history
    assert splits["dislikes"].train[0].tolist() == [0, 2]
    assert variants["dislikes"].negatives[0].tolist() == [1, 3]           # disliked before the targets
    assert variants["all_positive"].negatives[0].tolist() == []
    assert variants["dropped"].sequences[0].tolist() == variants["dislikes"].sequences[0].tolist()
    assert variants["dropped"].negatives[0].tolist() == []
    weighted = variants["weighted"]
    assert weighted.weights is not None and weighted.weights[0].tolist() == [5.0, 4.0, 3.0, 5.0]
    # v and w have too few positives to judge: in every variant they train on those alone.
    assert all(d.sequences[1].tolist() == [1, 3] and d.sequences[2].tolist() == [6, 0] for d in variants.values())
