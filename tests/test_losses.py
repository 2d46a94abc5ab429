"""The fused sampled-softmax loss: its gradient is the true one, however the rows are chunked."""

from __future__ import annotations

import pytest
import torch

from ranking.losses import sampled_softmax


def _problem() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    users, positives = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    negatives = torch.randn(7, 4, dtype=torch.float64)
    log_q = torch.randn(7, dtype=torch.float64)
    hits = torch.zeros(5, 7, dtype=torch.bool)
    hits[0, 2] = hits[3, :] = True  # one accidental hit, and a row whose every negative is a hit
    return users, positives, negatives, log_q, hits


WEIGHTS = torch.tensor([3.0, 1.0, 0.2, 1.0, 0.5], dtype=torch.float64)  # purchase, click, view, ...


@pytest.mark.parametrize("rows_per_chunk", [0, 1, 2])  # one chunk; one row each; uneven chunks
@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_sampled_softmax_gradient_matches_finite_differences(rows_per_chunk: int, weights: torch.Tensor | None
                                                             ) -> None:
    users, positives, negatives, log_q, hits = _problem()
    inputs = tuple(t.requires_grad_() for t in (users, positives, negatives))
    assert torch.autograd.gradcheck(
        lambda u, p, n: sampled_softmax(u, p, n, log_q, hits, weights, rows_per_chunk=rows_per_chunk), inputs)


def test_weights_make_it_the_weighted_mean_of_the_rows_losses() -> None:
    users, positives, negatives, log_q, hits = _problem()
    rows = torch.stack([sampled_softmax(users[n : n + 1], positives[n : n + 1], negatives, log_q, hits[n : n + 1])
                        for n in range(len(users))])
    weighted = sampled_softmax(users, positives, negatives, log_q, hits, WEIGHTS)
    torch.testing.assert_close(weighted, (rows * WEIGHTS).sum() / WEIGHTS.sum())
    torch.testing.assert_close(sampled_softmax(users, positives, negatives, log_q, hits), rows.mean())


def test_chunks_change_neither_the_loss_nor_its_gradients() -> None:
    users, positives, negatives, log_q, hits = _problem()
    results = []
    for rows_per_chunk in (0, 2):
        inputs = [t.clone().requires_grad_() for t in (users, positives, negatives)]
        loss = sampled_softmax(*inputs, log_q, hits, WEIGHTS, rows_per_chunk=rows_per_chunk)
        loss.backward()
        results.append([loss.detach(), *(t.grad for t in inputs)])
    for whole, chunked in zip(*results, strict=True):
        torch.testing.assert_close(chunked, whole)


def test_without_gradients_it_still_gives_the_loss() -> None:
    users, positives, negatives, log_q, hits = _problem()
    with torch.no_grad():
        plain = sampled_softmax(users, positives, negatives, log_q, hits)
    inputs = [t.clone().requires_grad_() for t in (users, positives, negatives)]
    torch.testing.assert_close(plain, sampled_softmax(*inputs, log_q, hits).detach())
