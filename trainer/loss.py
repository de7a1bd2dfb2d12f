"""The training objective, in one place for the loop, the pipeline schedule and bench/: token cross entropy (the
logged loss), the optional z-loss term, perplexity for reports, and the debug.* fault injection that multiplies a
step's loss (NaN: a diverged step; 1000: a loss spike), here so that every backend and layout sees it alike."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from normtron.trainer.chunked_loss import linear_cross_entropy


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token-level cross entropy, always in fp32 (targets -100 are not counted)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2, in fp32."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


_fault_factor: float | None = None  # set by injected_fault() around one training step


@contextlib.contextmanager
def injected_fault(factor: float | None):
    """Within this context every micro-batch's loss and objective are multiplied by `factor` (None: untouched)."""
    global _fault_factor
    _fault_factor = factor
    try:
        yield
    finally:
        _fault_factor = None


def micro_batch_objective(logits: torch.Tensor, targets: torch.Tensor, n_microbatches: int,
                          z_coefficient: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, objective) of one of a step's `n_microbatches` micro-batches: the loss is its share of the step's mean
    token cross entropy (what is logged); the objective adds the z-loss term (what is trained on)."""
    loss = cross_entropy(logits, targets) / n_microbatches
    objective = loss + z_coefficient * z_loss(logits) / n_microbatches if z_coefficient else loss
    return _with_fault(loss, objective)


def chunked_head_objective(targets: torch.Tensor, n_microbatches: int, z_coefficient: float, chunk_size: int):
    """The same (loss, objective) as micro_batch_objective, as a `head` for the model's forward
    (models/transformer.py): from the final hidden states and the head weight, `chunk_size` tokens at a time
    (trainer/chunked_loss.py), so the full logits are never held."""
    def head(hidden: torch.Tensor, weight: torch.Tensor, scale) -> tuple[torch.Tensor, torch.Tensor]:
        loss, objective = linear_cross_entropy(hidden, weight, targets, 1.0 if scale is None else scale,
                                               z_coefficient, chunk_size)
        return _with_fault(loss / n_microbatches, objective / n_microbatches)
    return head


def _with_fault(loss: torch.Tensor, objective: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _fault_factor is not None:
        return loss * _fault_factor, objective * _fault_factor
    return loss, objective


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: a diverged loss should print, not overflow
