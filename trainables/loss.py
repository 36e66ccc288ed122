"""The training loss: mean cross-entropy of the output layer's logits, a chunk of words at a time.

A batch's logits are (words, vocabulary): at Flickr8k scale 3,700 x 2,539 floats, 38 MB, and
`cross_entropy(linear(...))` holds three tensors that size at once (logits, log-softmax, their
gradient). Here each chunk's gradient is worked out as soon as its logits are, so only one chunk's
logits exist at a time: the same arithmetic (no recomputation), a few MB instead of 110.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

CHUNK_ELEMENTS = 2**21  # logits per chunk: 8 MB in float32


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """cross_entropy(linear(hidden, weight, bias), targets), its gradient computed in the forward.
    hidden (N, H), weight (V, H), bias (V,), targets (N,) -> the mean over the N words."""
    # In chunks where trials share a node's RAM; on a GPU in one piece, fewer kernel launches.
    rows = max(1, hidden.shape[0] if hidden.is_cuda else CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int):
        n = hidden.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)  # softmax and sums: float32 at least
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=acc)
        grad_bias = torch.zeros_like(bias, dtype=acc)
        for start in range(0, n, rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = F.linear(h, weight, bias).to(acc)  # (c, V); a bf16 matmul under autocast
            lse = logits.logsumexp(1)  # (c,)
            loss += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(t), device=t.device), t] -= 1
            grad /= n  # d(mean loss)/d(logits)
            grad_hidden[start:start + rows] = grad.to(weight.dtype) @ weight  # (c, H)
            grad_weight += grad.T.to(h.dtype) @ h  # (V, H)
            grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = weight.dtype, bias.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), (grad_weight * grad_loss).to(weight_dtype),
                (grad_bias * grad_loss).to(bias_dtype), None, None)
