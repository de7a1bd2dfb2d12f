"""Chunked linear cross-entropy: the output head and the loss computed together over chunks of tokens, so that
neither the full (tokens x vocabulary) logits nor their gradient is ever held. With Llama-3's 128,256-token
vocabulary, 8,192 tokens' fp32 logits take 4.2 GB, and as much again their gradient.

Since the objective is a scalar, its gradient with respect to each chunk's logits is known in the forward (up to
the scalar that backward passes in): each chunk's logits are computed, reduced to the loss, turned into their
gradient and multiplied into the gradients of the hidden states and the head weight, then dropped. The backward
only scales those two by its incoming gradient. That is the same three matmuls per token as the unchunked head
(logits, d hidden, d weight) and no recomputation (Liger-Kernel's fused linear cross-entropy works this way); the
extra memory is one chunk's logits plus a gradient buffer of the hidden states' and the head weight's size.

The math matches trainer/loss.py in fp32: mean token cross entropy over the counted targets (-100 ignored) plus
`z_coefficient` * mean over all tokens of logsumexp(logits)^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """(hidden (N, dim), weight (V, dim)) -> (cross entropy, objective); only the objective is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale: float, z_coefficient: float, chunk_size: int,
                needs_grad: bool):
        counted = targets != IGNORE_INDEX
        n_counted, n_tokens = counted.sum(), targets.numel()
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        for start in range(0, n_tokens, chunk_size):
            h, t, valid = (v[start:start + chunk_size] for v in (hidden, targets, counted))
            logits = F.linear(h, weight)  # under autocast: a bf16 matmul, then fp32 loss math as unchunked
            matmul_dtype, logits = logits.dtype, logits.float()
            if scale != 1.0:
                logits = logits * scale
            lse = torch.logsumexp(logits, dim=-1)
            safe_t = t.masked_fill(~valid, 0)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            ce_sum += ((lse - target_logit) * valid).sum()
            if z_coefficient:
                z_sum += lse.pow(2).sum()
            if not needs_grad:
                continue
            # d objective / d logits = softmax * (counted / n_counted + 2 z lse / N) - onehot(target) * counted / n_counted
            row_weight = valid / n_counted
            factor = row_weight + (2 * z_coefficient / n_tokens) * lse if z_coefficient else row_weight
            grad_logits = logits.sub_(lse[:, None]).exp_().mul_(factor[:, None])  # in place: one chunk buffer
            grad_logits[torch.arange(len(t), device=t.device), safe_t] -= row_weight
            if scale != 1.0:
                grad_logits.mul_(scale)
            grad_logits = grad_logits.to(matmul_dtype)  # the gradient matmuls in the forward's precision
            grad_hidden[start:start + chunk_size] = grad_logits @ weight.to(matmul_dtype)
            grad_weight += grad_logits.t() @ h.to(matmul_dtype)
        ce = ce_sum / n_counted
        objective = ce + z_coefficient * z_sum / n_tokens if z_coefficient else ce.clone()
        ctx.mark_non_differentiable(ce)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if needs_grad else None)
        return ce, objective

    @staticmethod
    def backward(ctx, _grad_ce, grad_objective):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_objective.to(grad_hidden.dtype), grad_weight * grad_objective.to(grad_weight.dtype), \
            None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float = 1.0,
                         z_coefficient: float = 0.0, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean token cross entropy, objective = it + z_coefficient * mean logsumexp^2) of the logits
    `scale * hidden @ weight.T`, computed `chunk_size` tokens at a time. hidden (..., dim), targets (...)."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, float(scale), float(z_coefficient), chunk_size,
                                     needs_grad)
