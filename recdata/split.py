"""The per-user time split: last interaction = test, second-last = validation, the rest train."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recdata.dataset import Dataset

MIN_SEQUENCE_FOR_EVAL = 3  # one train item at least, then validation and test


@dataclass(frozen=True)
class Split:
    """Train prefixes and held-out targets; `users` are the users with a valid/test target."""

    train: list[np.ndarray]       # per user, all but the last two (or everything if too short)
    users: np.ndarray             # (U_eval,) users evaluated
    valid_targets: np.ndarray     # (U_eval,) second-last item of each evaluated user
    test_targets: np.ndarray      # (U_eval,) last item of each evaluated user
    # Per user, the training weight of each item of `train`; None: all weigh 1.
    train_weights: list[np.ndarray] | None = None
    # (U_eval,) the weight of each validation target's event, so that choosing the best epoch
    # counts each case as training counts its events; None: all weigh 1.
    valid_weights: np.ndarray | None = None

    def valid_history(self, position: int) -> np.ndarray:
        """Items seen before the validation target of evaluated user `position`."""
        return self.train[self.users[position]]

    def test_history(self, position: int) -> np.ndarray:
        """Items seen before the test target: train items plus the validation item."""
        return np.append(self.train[self.users[position]], self.valid_targets[position])


def leave_last_two(dataset: Dataset) -> Split:
    """Split every user with at least three interactions; shorter users only train."""
    train, users, valid, test = [], [], [], []
    for user, seq in enumerate(dataset.sequences):
        if len(seq) >= MIN_SEQUENCE_FOR_EVAL:
            train.append(seq[:-2])
            users.append(user)
            valid.append(seq[-2])
            test.append(seq[-1])
        else:
            train.append(seq)
    weights = valid_weights = None
    if dataset.weights is not None:
        weights = [w[: len(t)] for w, t in zip(dataset.weights, train, strict=True)]
        valid_weights = np.asarray([dataset.weights[u][-2] for u in users], dtype=np.float64)
    return Split(
        train=train,
        users=np.asarray(users, dtype=np.int64),
        valid_targets=np.asarray(valid, dtype=np.int64),
        test_targets=np.asarray(test, dtype=np.int64),
        train_weights=weights,
        valid_weights=valid_weights,
    )
