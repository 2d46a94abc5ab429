"""The sampled-softmax loss of the query encoder, as one autograd function.

Each row's logits against its sampled negatives, an (N, S) matrix of tens of MB, are the
largest tensors of a training step. Written with autograd's ops, the loss keeps several of
them alive at once (logits, the shifted and exponentiated copies, the gradient and its
masked copy) and passes over them a dozen times; on a CPU those passes cost as much as the
matmuls. torch has no fused sampled softmax, so it is written here.

The rows go through in chunks of a few MB, which stay in the CPU's cache while the logits
become the softmax and then the gradient; the gradients are computed in the same pass and
kept (they are (N, d) and (S, d), small), so no (N, S) matrix outlives its chunk.
"""

from __future__ import annotations

from typing import Any

import torch

# Logits per chunk: 4 MB of float32, small enough to stay in cache through its passes.
CHUNK_ELEMENTS = 1 << 20


class SampledSoftmax(torch.autograd.Function):
    """Weighted mean over rows of -log softmax(positive | negatives)[positive].

    users (N, d), positives (N, d): each row's target item vector; negatives (S, d);
    log_q (S,): subtracted from each negative's logit (the sampling correction);
    hits (N, S) bool: negatives that are the row's own target, left out of its softmax;
    row_weights (N,) > 0: each row's share of the mean (its event's weight; ones = plain mean);
    rows_per_chunk: rows per chunk, 0 = as many as fit CHUNK_ELEMENTS logits.
    """

    @staticmethod
    def forward(ctx: Any, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                log_q: torch.Tensor, hits: torch.Tensor, row_weights: torch.Tensor,
                rows_per_chunk: int) -> torch.Tensor:
        rows = rows_per_chunk or max(1, CHUNK_ELEMENTS // max(1, len(negatives)))
        wants_grad = any(ctx.needs_input_grad[:3])
        losses = users.new_empty(len(users))
        grad_users, grad_positives, grad_negatives = (
            torch.empty_like(users), torch.empty_like(positives), torch.zeros_like(negatives))
        for start in range(0, len(users), rows):
            chunk = slice(start, start + rows)
            user, positive_vector = users[chunk], positives[chunk]
            scores = user @ negatives.T                                    # (rows, S)
            scores -= log_q
            scores.masked_fill_(hits[chunk], -torch.inf)
            positive = (user * positive_vector).sum(-1)                    # (rows,)
            top = torch.maximum(scores.amax(1), positive)                  # finite, even if all are hits
            scores -= top[:, None]
            scores.exp_()                                                  # hits become exactly 0
            positive_exp = (positive - top).exp()
            total = scores.sum(1) + positive_exp
            losses[chunk] = total.log() + top - positive
            if not wants_grad:
                continue
            weight = row_weights[chunk, None]
            scores *= weight / total[:, None]                              # d loss / d logit: the softmax ...
            positive_grad = (positive_exp / total - 1)[:, None] * weight   # ... minus one at the positive
            grad_users[chunk] = torch.addmm(positive_grad * positive_vector, scores, negatives)
            grad_positives[chunk] = positive_grad * user
            grad_negatives.addmm_(scores.T, user)
        ctx.save_for_backward(grad_users, grad_positives, grad_negatives)
        ctx.total_weight = row_weights.sum()
        return (losses * row_weights).sum() / ctx.total_weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scale = grad / ctx.total_weight  # the loss is the rows' weighted mean
        return (*(g * scale for g in ctx.saved_tensors), None, None, None, None)


def sampled_softmax(users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, log_q: torch.Tensor,
                    hits: torch.Tensor, row_weights: torch.Tensor | None = None,
                    rows_per_chunk: int = 0) -> torch.Tensor:
    """See `SampledSoftmax`; `row_weights` None: every row weighs the same."""
    weights = users.new_ones(len(users)) if row_weights is None else row_weights.to(users.dtype)
    loss: torch.Tensor = SampledSoftmax.apply(users, positives, negatives, log_q, hits, weights, rows_per_chunk)
    return loss
