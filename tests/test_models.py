"""The models: shapes, normalisation, causality, padding, cold items, the sampled-softmax loss."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from ranking.config import ENCODERS, ModelConfig, TrainConfig
from ranking.inference import NextItems, candidate_features
from ranking.item_encoder import ItemEncoder, tag_matrix
from ranking.query_encoder import HSTUBlock, QueryEncoder
from ranking.ranker import NUM_SCORE_FEATURES, Ranker
from ranking.text_encoder import TextEncoder
from ranking.train import Trainer, training_windows

CONFIG = ModelConfig(dim=16, max_len=8, layers=2, heads=2, dropout=0.0, id_dropout=0.0)


def item_encoder(num_items: int = 10) -> ItemEncoder:
    rng = np.random.default_rng(0)
    text = rng.normal(size=(num_items, 12)).astype(np.float32)
    tags, vocab = tag_matrix([("a",) if i % 2 else ("b", "c") for i in range(num_items)])
    return ItemEncoder(CONFIG, text, tags, len(vocab))


def test_item_vectors_are_unit_length_and_padding_is_zero() -> None:
    encoder = item_encoder().eval()
    vectors = encoder(torch.tensor([[0, 1, 2], [3, 0, 10]]))
    assert vectors.shape == (2, 3, 16)
    norms = vectors.norm(dim=-1)
    torch.testing.assert_close(norms, torch.tensor([[0.0, 1, 1], [1, 0, 1]]))


def test_cold_items_are_encoded_from_text_and_tags_alone() -> None:
    encoder = item_encoder().eval()
    before = encoder(torch.tensor([3]))
    encoder.id_known[3] = 0.0
    cold = encoder(torch.tensor([3]))
    with torch.no_grad():
        encoder.id_embedding.weight[3] += 100.0  # the ID row no longer matters
    torch.testing.assert_close(encoder(torch.tensor([3])), cold)
    assert not torch.allclose(before, cold)


def test_tag_matrix_maps_tags_to_one_based_ids() -> None:
    matrix, vocab = tag_matrix([("x", "y"), (), ("y",)])
    assert vocab == ["x", "y"]
    assert matrix[:, :2].tolist() == [[1, 2], [0, 0], [2, 0]]


@pytest.mark.parametrize("kind", ENCODERS)
def test_query_encoder_is_causal(kind: str) -> None:
    torch.manual_seed(0)
    encoder = QueryEncoder(replace(CONFIG, encoder=kind)).eval()
    x = torch.randn(1, 6, 16)
    padding = torch.zeros(1, 6, dtype=torch.bool)
    y = encoder(x, padding)
    x2 = x.clone()
    x2[0, 4:] = torch.randn(2, 16)  # change the future
    torch.testing.assert_close(encoder(x2, padding)[0, :4], y[0, :4])


@pytest.mark.parametrize("kind", ENCODERS)
def test_last_position_alone_equals_the_full_forward(kind: str) -> None:
    torch.manual_seed(0)
    encoder = QueryEncoder(replace(CONFIG, encoder=kind)).eval()
    x = torch.randn(3, 6, 16)
    padding = torch.tensor([[True, True, False, False, False, False], [False] * 6, [True] * 5 + [False]])
    full = encoder(x, padding)[:, -1]
    last = encoder(x, padding, last_only=True)
    assert last.shape == (3, 1, 16)
    torch.testing.assert_close(last[:, 0], full)


@pytest.mark.parametrize("kind", ENCODERS)
def test_query_encoder_ignores_left_padding_content(kind: str) -> None:
    torch.manual_seed(0)
    encoder = QueryEncoder(replace(CONFIG, encoder=kind)).eval()
    x = torch.randn(1, 6, 16)
    padding = torch.tensor([[True, True, False, False, False, False]])
    y = encoder(x, padding)
    x2 = x.clone()
    x2[0, :2] = 5.0
    torch.testing.assert_close(encoder(x2, padding)[0, 2:], y[0, 2:])
    torch.testing.assert_close(y.norm(dim=-1)[0, 2:], torch.ones(4))


def test_hstu_blocks_keep_shapes_and_read_no_absolute_position() -> None:
    torch.manual_seed(0)
    encoder = QueryEncoder(replace(CONFIG, encoder="hstu")).eval()
    assert encoder.position is None and all(isinstance(b, HSTUBlock) for b in encoder.blocks)
    x = torch.randn(4, 8, 16)
    assert encoder(x, torch.zeros(4, 8, dtype=torch.bool)).shape == (4, 8, 16)


def test_hstu_step_by_step_equals_the_batched_forward() -> None:
    """Position t of one forward over the whole history equals the last output of a forward
    over items 0..t alone, left-padded: what training computes at once is what serving sees
    one request at a time. The relative bias makes this exact (absolute positions would not)."""
    torch.manual_seed(0)
    encoder = QueryEncoder(replace(CONFIG, encoder="hstu")).eval()
    with torch.no_grad():
        for block in encoder.blocks:  # a bias that differs by distance, so the test reads it
            block.relative_bias.copy_(torch.randn_like(block.relative_bias))
    x = torch.randn(1, 8, 16)
    batched = encoder(x, torch.zeros(1, 8, dtype=torch.bool))
    for t in range(8):
        prefix = torch.zeros(1, 8, 16)
        prefix[0, 8 - (t + 1):] = x[0, : t + 1]
        padding = torch.arange(8).unsqueeze(0) < 8 - (t + 1)
        step = encoder(prefix, padding, last_only=True)[0, -1]
        torch.testing.assert_close(step, batched[0, t], atol=1e-5, rtol=1e-4)


def test_an_hstu_row_with_only_padding_attends_to_nothing() -> None:
    """No softmax, so nothing to normalise: a position whose keys are all padding gets no
    attention (and no NaN), only its own input back."""
    torch.manual_seed(0)
    block = HSTUBlock(replace(CONFIG, encoder="hstu")).eval()
    x = torch.randn(2, 5, 16)
    y = block(x, torch.ones(2, 5, dtype=torch.bool))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, x + block.out.bias)


def test_an_hstu_funnel_trains_and_serves(tiny_dataset, text_encoder: TextEncoder, tmp_path) -> None:
    from ranking.inference import RankingModel
    from ranking.train import train
    from tests.conftest import TINY_TRAINING

    config = replace(TINY_TRAINING, model=replace(TINY_TRAINING.model, encoder="hstu"), epochs=3)
    result = train(tiny_dataset, config, tmp_path / "bundle", text_encoder)
    assert result.metrics["test"]["recall"]["hr@10"] > 2 * 10 / tiny_dataset.num_items
    model = RankingModel.load(tmp_path / "bundle", device="cpu")
    assert model.config.encoder == "hstu" and model.encode([np.array([1, 2, 3])])["sequential"].shape == (1, 32)


def test_ranker_attends_only_to_real_history() -> None:
    torch.manual_seed(0)
    ranker = Ranker(CONFIG, num_channels=3).eval()
    history = torch.randn(2, 5, 16)
    padding = torch.tensor([[True, True, False, False, False], [True] * 5])
    scores, weights = ranker(history, padding, torch.randn(2, 16), torch.randn(2, 4, 16),
                             torch.randn(2, 4, NUM_SCORE_FEATURES + 3))
    assert scores.shape == (2, 4)
    assert torch.isfinite(scores).all()
    assert weights[0, :, :2].abs().max() == 0
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(4))
    assert weights[1].abs().max() == 0  # no history: no attention, no reasons


def test_follow_share_reads_the_last_history_item_and_joins_the_side_features() -> None:
    # Item 0 was followed by 1 (half its next steps) and 2 (a quarter); 1 by 2.
    next_items = NextItems(np.array([[1, 2], [2, -1], [-1, -1]]), np.array([[0.5, 0.25], [0.3, 0.0], [0.0, 0.0]]),
                           torch.device("cpu"))
    candidates = torch.tensor([[1, 2, 0], [1, 2, 0], [1, 2, 0], [1, 2, 0]])
    # The last item counts, not the first; no history, or a last item that joined after
    # training (index 7, beyond the table), gives nothing.
    histories = [np.array([1, 0]), np.array([0, 1]), np.array([], dtype=np.int64), np.array([0, 7])]
    shares = next_items.share_after(histories, candidates)
    torch.testing.assert_close(shares, torch.tensor([[0.5, 0.25, 0.0], [0.0, 0.3, 0.0], [0.0] * 3, [0.0] * 3]))
    features = candidate_features(torch.randn(4, 16), torch.randn(4, 12), torch.randn(4, 3, 16),
                                  torch.randn(4, 3, 12), torch.zeros(4, 3), shares, torch.zeros(4, 3, 2))
    assert features.shape == (4, 3, NUM_SCORE_FEATURES + 2)
    torch.testing.assert_close(features[..., NUM_SCORE_FEATURES - 1], shares)


def test_training_windows_cover_every_position_once() -> None:
    windows = training_windows([np.arange(7), np.arange(2)], max_len=3)
    targets = windows[:, 1:][windows[:, :-1] != 0]
    assert sorted(targets.tolist()) == sorted([2, 3, 4, 5, 6, 7, 2])  # +1 shifted, first item never a target


def test_sampled_softmax_is_exact_when_the_sample_is_the_catalogue(tiny_dataset, text_encoder: TextEncoder) -> None:
    trainer = Trainer(tiny_dataset, TrainConfig(model=CONFIG, num_negatives=10_000), text_encoder)
    users = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(tiny_dataset.num_items, 16), dim=-1)
    targets = torch.tensor([0, 3, 3, 7, 9])
    expected = torch.nn.functional.cross_entropy(users @ items.T / CONFIG.temperature, targets)
    torch.testing.assert_close(trainer.sampled_softmax_loss(users, targets, items), expected)


def test_sampled_softmax_masks_accidental_hits(tiny_dataset, text_encoder: TextEncoder) -> None:
    trainer = Trainer(tiny_dataset, TrainConfig(model=CONFIG, num_negatives=50), text_encoder)
    users = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(tiny_dataset.num_items, 16), dim=-1)
    loss = trainer.sampled_softmax_loss(users, torch.tensor([1, 1, 1, 1]), items)
    assert torch.isfinite(loss)


def test_sampled_softmax_equals_cross_entropy_over_positive_and_negatives(tiny_dataset,
                                                                          text_encoder: TextEncoder) -> None:
    """The in-place loss is the textbook one: cross-entropy over [positive | corrected negatives],
    accidental hits masked, in value and in gradient."""
    trainer = Trainer(tiny_dataset, TrainConfig(model=CONFIG, num_negatives=8), text_encoder)
    users = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1).requires_grad_()
    items = torch.nn.functional.normalize(torch.randn(tiny_dataset.num_items, 16), dim=-1).requires_grad_()
    targets = torch.tensor([0, 3, 3, 7, 9, 2])
    torch.manual_seed(5)
    loss = trainer.sampled_softmax_loss(users, targets, items)
    got = torch.autograd.grad(loss, (users, items))

    torch.manual_seed(5)  # the same draws, scored the long way
    tau, known, draws = CONFIG.temperature, trainer.known_items, trainer.config.num_negatives
    uniform = known[torch.randint(len(known), (draws,))]
    others = targets.unique()
    negatives = torch.cat([uniform, others])
    log_q = torch.cat([torch.full((draws,), math.log(draws / len(known))),
                       trainer.log_q[others] + math.log(len(targets))])
    logits = torch.cat([(users * items[targets]).sum(-1, keepdim=True) / tau,
                        users @ items[negatives].T / tau - log_q], 1)
    logits[:, 1:] = logits[:, 1:].masked_fill(negatives[None, :] == targets[:, None], -math.inf)
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long))
    torch.testing.assert_close(loss, expected)
    for a, b in zip(got, torch.autograd.grad(expected, (users, items)), strict=True):
        torch.testing.assert_close(a, b)


def test_sampled_softmax_gives_no_nan_when_every_negative_is_a_hit(tiny_dataset, text_encoder: TextEncoder) -> None:
    trainer = Trainer(tiny_dataset, TrainConfig(model=CONFIG, num_negatives=1), text_encoder)
    trainer.known_items = trainer.known_items[:2]  # one draw, and it can only be the target or the other
    users = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1).requires_grad_()
    items = torch.nn.functional.normalize(torch.randn(tiny_dataset.num_items, 16), dim=-1)
    target = int(trainer.known_items[0])
    for seed in range(20):  # some seeds draw the target itself: every negative masked
        torch.manual_seed(seed)
        loss = trainer.sampled_softmax_loss(users, torch.tensor([target] * 3), items)
        (grad,) = torch.autograd.grad(loss, users)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_model_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(dim=10, heads=3)
    with pytest.raises(ValueError, match="temperature"):
        ModelConfig(temperature=0)


def full_table_encoder_loss(trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The encoder phase's loss computed over the whole catalogue's item vectors, as a
    reference for the per-step subset."""
    table = trainer.item_table()
    valid = (targets != 0) & (inputs != 0)
    users = trainer.model.encoder(table[inputs], inputs == 0)[valid]
    loss = trainer.sampled_softmax_loss(users, targets[valid] - 1, table[1:])
    return loss + trainer.config.content_loss_weight * trainer.sampled_softmax_loss(
        users, targets[valid] - 1, trainer.model.items.content_only())


@pytest.mark.parametrize("num_negatives", [16, 10_000])  # sampled, and exact (the sample is the catalogue)
def test_a_step_over_the_items_it_touches_equals_the_full_table(tiny_dataset, text_encoder: TextEncoder,
                                                                 num_negatives: int) -> None:
    trainer = Trainer(tiny_dataset, TrainConfig(model=CONFIG, num_negatives=num_negatives), text_encoder)
    trainer.model.eval()  # no dropout: both sides see the same vectors
    windows = torch.from_numpy(training_windows(trainer.split.train, CONFIG.max_len))[:6]
    inputs, targets = windows[:, :-1], windows[:, 1:]
    parameters = list(trainer.model.items.parameters()) + list(trainer.model.encoder.parameters())
    torch.manual_seed(3)
    loss = trainer.encoder_loss(inputs, targets)
    got = torch.autograd.grad(loss, parameters, allow_unused=True)
    torch.manual_seed(3)  # the same negatives
    expected = full_table_encoder_loss(trainer, inputs, targets)
    torch.testing.assert_close(loss, expected)
    for a, b in zip(got, torch.autograd.grad(expected, parameters, allow_unused=True), strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:  # the ID table's gradient is sparse: the same rows, summed the same
            torch.testing.assert_close(a.to_dense() if a.is_sparse else a, b.to_dense() if b.is_sparse else b)


def test_a_step_encodes_only_the_items_it_touches(text_encoder: TextEncoder) -> None:
    from recdata.synthetic import SyntheticConfig, generate

    data = generate(SyntheticConfig(num_users=400, num_items=3000, num_topics=10, mean_length=10, seed=1))
    trainer = Trainer(data, TrainConfig(model=CONFIG, num_negatives=32), text_encoder)
    encoded: list[int] = []
    trainer.model.items.register_forward_hook(lambda _module, args, _out: encoded.append(args[0].numel()))
    windows = torch.from_numpy(training_windows(trainer.split.train, CONFIG.max_len))[:4]
    trainer.encoder_loss(windows[:, :-1], windows[:, 1:]).backward()
    # One call over the step's histories, targets and both negative samples: 4 x 8 + 4 x 8 + 2 x (32 + 32).
    assert len(encoded) == 1 and encoded[0] <= 4 * 8 * 2 + 2 * 64 < data.num_items
