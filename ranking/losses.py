"""The sampled-softmax loss of the query encoder, as one autograd function.

Each row's logits against its sampled negatives, an (N, S) matrix of tens of MB, are the
largest tensors of a training step. Written with autograd's ops, the loss keeps several of
them alive at once (logits, the shifted and exponentiated copies, the gradient and its
masked copy) and passes over them a dozen times; on a CPU those passes cost as much as the
matmuls. torch has no fused sampled softmax, so it is written here: one (N, S) buffer is the
logits and then the softmax, edited in place, and one more holds the gradient.
"""

from __future__ import annotations

from typing import Any

import torch


class SampledSoftmax(torch.autograd.Function):
    """Mean over rows of -log softmax(positive | negatives)[positive].

    users (N, d), positives (N, d): each row's target item vector; negatives (S, d);
    log_q (S,): subtracted from each negative's logit (the sampling correction);
    hits (N, S) bool: negatives that are the row's own target, left out of its softmax.
    """

    @staticmethod
    def forward(ctx: Any, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                log_q: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
        scores = users @ negatives.T                                   # (N, S): the one big buffer
        scores -= log_q
        scores.masked_fill_(hits, -torch.inf)
        positive = (users * positives).sum(-1)                         # (N,)
        top = torch.maximum(scores.amax(1), positive)                  # finite, even if all are hits
        scores -= top[:, None]
        scores.exp_()                                                  # hits become exactly 0
        positive_exp = (positive - top).exp()
        total = scores.sum(1) + positive_exp
        scores /= total[:, None]                                       # softmax over the negatives
        ctx.save_for_backward(users, positives, negatives, scores, positive_exp / total)
        return (total.log() + top - positive).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        users, positives, negatives, softmax, positive_share = ctx.saved_tensors
        scale = grad / len(users)
        negative_grad = softmax * scale                                # d loss / d logit: softmax
        positive_grad = ((positive_share - 1) * scale)[:, None]        # ... minus one at the positive
        return (negative_grad @ negatives + positive_grad * positives, positive_grad * users,
                negative_grad.T @ users, None, None)


def sampled_softmax(users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, log_q: torch.Tensor,
                    hits: torch.Tensor) -> torch.Tensor:
    """See `SampledSoftmax`."""
    loss: torch.Tensor = SampledSoftmax.apply(users, positives, negatives, log_q, hits)
    return loss
