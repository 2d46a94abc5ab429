"""The fused sampled-softmax loss: its gradient is the true one."""

from __future__ import annotations

import torch

from ranking.losses import sampled_softmax


def test_sampled_softmax_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    users, positives = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    negatives = torch.randn(7, 4, dtype=torch.float64)
    log_q = torch.randn(7, dtype=torch.float64)
    hits = torch.zeros(5, 7, dtype=torch.bool)
    hits[0, 2] = hits[3, :] = True  # one accidental hit, and a row whose every negative is a hit
    inputs = tuple(t.requires_grad_() for t in (users, positives, negatives))
    assert torch.autograd.gradcheck(lambda u, p, n: sampled_softmax(u, p, n, log_q, hits), inputs)
