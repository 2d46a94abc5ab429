"""LazyAdamW: AdamW on dense gradients, the same update on the rows of a sparse one alone."""

from __future__ import annotations

import pytest
import torch

from ranking.optim import LazyAdamW


def test_dense_steps_equal_torch_adamw() -> None:
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5, 3))
    theirs.data.copy_(ours.data)
    a, b = LazyAdamW([ours], lr=0.01, weight_decay=0.1), torch.optim.AdamW([theirs], lr=0.01, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(5, 3)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    torch.testing.assert_close(ours.data, theirs.data)


def test_sparse_rows_move_like_dense_adamw_and_untouched_rows_stay() -> None:
    torch.manual_seed(1)
    table = torch.nn.Embedding(6, 4, sparse=True)
    dense = torch.nn.Parameter(table.weight.detach()[[1, 3]].clone())  # the two rows a step reads
    before = table.weight.detach().clone()
    a, b = LazyAdamW(table.parameters(), lr=0.05), torch.optim.AdamW([dense], lr=0.05, weight_decay=0.0)
    for _ in range(3):
        target = torch.randn(2, 4)
        loss = ((table(torch.tensor([1, 3])) - target) ** 2).sum()
        a.zero_grad()
        loss.backward()
        assert table.weight.grad is not None and table.weight.grad.is_sparse
        a.step()
        b.zero_grad()
        ((dense - target) ** 2).sum().backward()
        b.step()
    torch.testing.assert_close(table.weight.detach()[[1, 3]], dense.detach())
    untouched = [0, 2, 4, 5]
    torch.testing.assert_close(table.weight.detach()[untouched], before[untouched])


def test_repeated_rows_in_a_sparse_gradient_are_summed_once() -> None:
    table = torch.nn.Embedding(3, 2, sparse=True)
    optimiser = LazyAdamW(table.parameters(), lr=0.1)
    table(torch.tensor([2, 2, 2])).sum().backward()
    optimiser.step()
    state = optimiser.state[table.weight]
    torch.testing.assert_close(state["exp_avg"][2], torch.full((2,), 0.1 * 3))  # (1 - beta1) x the summed 3
    assert (state["exp_avg"][:2] == 0).all()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="lr=0"):
        LazyAdamW([torch.nn.Parameter(torch.zeros(1))], lr=0)
