"""Training from typed feedback: each target counts by its event's weight, and each user's
dislikes are extra negatives for that user."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from ranking.text_encoder import TextEncoder
from ranking.train import EventWeights, Trainer, disliked_loss, training_windows, window_layout
from recdata.dataset import Dataset
from recdata.split import leave_last_two
from tests.conftest import TINY_TRAINING


def test_a_windows_number_finds_its_users_event_weights() -> None:
    sequences = [np.array([4, 5, 6, 7, 8]), np.array([1, 2])]
    windows = training_windows(sequences, max_len=2)
    users, ends = window_layout(sequences, max_len=2)
    assert users.tolist() == [0, 0, 1] and ends.tolist() == [5, 3, 2]
    assert windows.tolist() == [[7, 8, 9], [5, 6, 7], [0, 2, 3]]  # item index + 1, left-padded
    data = Dataset("d", ["u", "v"], [str(i) for i in range(9)], [np.append(s, [0, 0]) for s in sequences],
                   [""] * 9, weights=[np.array([1.0, 2, 3, 4, 5, 9, 9]), np.array([7.0, 8, 9, 9])],
                   negatives=[np.array([0, 1]), np.zeros(0, np.int64)])
    events = EventWeights(leave_last_two(data), data.negatives, max_len=2, device=torch.device("cpu"))
    # The held-out last two (weights 9) are not training's; padding weighs 1.
    assert events.position_weights(torch.tensor([0, 1, 2])).tolist() == [[3, 4, 5], [1, 2, 3], [1, 7, 8]]
    negatives = events.user_negatives(torch.tensor([2, 0]))
    assert negatives[0].max() == -1 and sorted(negatives[1][negatives[1] >= 0].tolist()) == [0, 1]


def test_the_disliked_loss_is_the_softmax_of_the_target_against_the_users_dislikes() -> None:
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    disliked = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    present = torch.tensor([[True, True], [False, False]])  # the second row's user disliked nothing
    expected = math.log(math.exp(2) + math.exp(1) + math.exp(0)) - 2
    assert disliked_loss(users, positives, disliked, present, None).item() == pytest.approx(expected)
    assert disliked_loss(users, positives, disliked, present & False, None).item() == 0.0


@pytest.fixture(scope="module")
def with_feedback_events(tiny_dataset: Dataset) -> Dataset:
    """The tiny data set with weighted events and three disliked items per user."""
    rng = np.random.default_rng(3)
    weights = [rng.choice([0.2, 1.0, 3.0], size=len(s)) for s in tiny_dataset.sequences]
    negatives = [rng.choice(np.setdiff1d(np.arange(tiny_dataset.num_items), s), size=3, replace=False)
                 for s in tiny_dataset.sequences]
    return replace(tiny_dataset, weights=weights, negatives=negatives)


def _first_batch_loss(data: Dataset, text_encoder: TextEncoder, **config: object) -> tuple[Trainer, torch.Tensor]:
    trainer = Trainer(data, replace(TINY_TRAINING, **config), text_encoder)  # type: ignore[arg-type]
    windows = torch.from_numpy(training_windows(trainer.split.train, trainer.config.model.max_len))
    numbers = torch.arange(64)
    torch.manual_seed(0)  # the same sampled negatives and dropout for each trainer
    trainer.model.train()
    return trainer, trainer.encoder_loss(windows[numbers, :-1], windows[numbers, 1:], numbers)


@pytest.mark.parametrize("num_negatives", [16, 10_000])  # sampled softmax; the exact one
def test_weights_and_dislikes_change_the_encoder_loss_and_dislikes_get_gradients(
        tiny_dataset: Dataset, with_feedback_events: Dataset, text_encoder: TextEncoder, num_negatives: int) -> None:
    _, plain = _first_batch_loss(tiny_dataset, text_encoder, num_negatives=num_negatives)
    doubled = replace(tiny_dataset, weights=[np.full(len(s), 2.0) for s in tiny_dataset.sequences])
    _, uniform = _first_batch_loss(doubled, text_encoder, num_negatives=num_negatives)
    torch.testing.assert_close(uniform, plain)  # a weighted mean: equal weights change nothing
    weighted_only = replace(with_feedback_events, negatives=[])
    _, weighted = _first_batch_loss(weighted_only, text_encoder, num_negatives=num_negatives)
    assert not torch.isclose(weighted, plain)
    trainer, with_dislikes = _first_batch_loss(with_feedback_events, text_encoder, num_negatives=num_negatives)
    _, dislikes_off = _first_batch_loss(with_feedback_events, text_encoder, num_negatives=num_negatives,
                                        negative_feedback_weight=0.0)
    torch.testing.assert_close(dislikes_off, weighted)
    trainer, with_dislikes = _first_batch_loss(with_feedback_events, text_encoder, num_negatives=num_negatives,
                                               model=replace(TINY_TRAINING.model, id_dropout=0.0))
    assert with_dislikes > weighted  # the dislikes' softmax adds a positive term
    with_dislikes.backward()
    ids = trainer.model.items.id_embedding.weight.grad
    assert ids is not None
    first_users = trainer.events.window_users[:64].unique()  # type: ignore[union-attr]
    disliked = np.unique(np.concatenate([with_feedback_events.negatives[u] for u in first_users.tolist()]))
    assert (ids.to_dense()[torch.from_numpy(disliked) + 1].abs().sum(1) > 0).all()



def _ranker_epoch(data: Dataset, text_encoder: TextEncoder) -> dict[str, float]:
    """The first ranker epoch's summed loss and validation NDCG@10, from the same start."""
    trainer = Trainer(data, replace(TINY_TRAINING, ranker_epochs=1), text_encoder)
    return trainer.train_ranker()[0]


def test_the_ranker_learns_from_each_target_by_its_events_weight(
        tiny_dataset: Dataset, with_feedback_events: Dataset, text_encoder: TextEncoder) -> None:
    weighted_only = replace(with_feedback_events, negatives=[])
    trainer = Trainer(weighted_only, TINY_TRAINING, text_encoder)
    weights = trainer.split.train_weights
    assert weights is not None
    expected = [(seq[:end].tolist(), int(seq[end]), float(weights[u][end])) for u, seq in enumerate(trainer.split.train)
                for end in range(max(1, len(seq) - TINY_TRAINING.ranker_positions), len(seq))]
    assert [(h.tolist(), t, w) for h, t, w in trainer.ranker_examples()] == expected
    # Equal weights change nothing (a weighted mean); unequal ones change what it learns.
    plain = _ranker_epoch(tiny_dataset, text_encoder)
    doubled = replace(tiny_dataset, weights=[np.full(len(s), 2.0) for s in tiny_dataset.sequences])
    uniform = _ranker_epoch(doubled, text_encoder)
    assert uniform["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert uniform["ndcg@10"] == pytest.approx(plain["ndcg@10"], rel=1e-5)
    assert _ranker_epoch(weighted_only, text_encoder)["loss"] != pytest.approx(plain["loss"], rel=1e-3)
