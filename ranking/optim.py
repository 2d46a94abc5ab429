"""The encoder phase's optimiser: AdamW, with an ID embedding's rows updated only when a step
touches them.

A step's gradient for the item ID table covers the few thousand rows the step read. A dense
gradient would be the whole table, zeroed, filled and run through Adam every step: cost in
the catalogue's size, not the batch's. The table's gradient is therefore sparse, and its
rows get Adam's update lazily (moments and weights of untouched rows stay as they are), as
TorchRec and TensorFlow's LazyAdam train embedding tables. torch has SparseAdam for sparse
parameters and AdamW for dense ones but no single optimiser for both, and one optimiser
keeps one state to checkpoint; hence written here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class LazyAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) on dense gradients; on sparse ones, the same update
    applied to the gradient's rows alone. Bias correction counts this optimiser's steps."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"lr={lr} and eps={eps} must be > 0, weight_decay={weight_decay} >= 0, "
                             f"betas={betas} in [0, 1)")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    # A counter: on the CPU wherever the parameter is, as torch's own Adam keeps it.
                    state["step"] = torch.zeros((), dtype=torch.float32, device="cpu")
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                step_size = lr / (1 - beta1**step)
                root_correction = (1 - beta2**step) ** 0.5
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if p.grad.is_sparse:
                    grad = p.grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()           # (R,), (R, d)
                    row_avg = exp_avg[rows].lerp_(values, 1 - beta1)
                    row_avg_sq = exp_avg_sq[rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
                    exp_avg[rows], exp_avg_sq[rows] = row_avg, row_avg_sq
                    weights = p[rows].mul_(1 - lr * decay)
                    weights.addcdiv_(row_avg, (row_avg_sq.sqrt() / root_correction).add_(eps), value=-step_size)
                    p[rows] = weights
                else:
                    p.mul_(1 - lr * decay)
                    exp_avg.lerp_(p.grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    p.addcdiv_(exp_avg, (exp_avg_sq.sqrt() / root_correction).add_(eps), value=-step_size)
