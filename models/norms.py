"""The one place the model builds normalization layers.

Statistics are always computed in fp32 (bf16 means/variances drift at large hidden sizes); the output is cast back
to the input dtype. Later kernels (fused Triton norms) plug in here, so the model never names a norm class itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORM_TYPES = ("rmsnorm", "layernorm")


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or kept in float64 (used by exact reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_fp32(x)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * at_least_fp32(self.weight)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight (+ bias)."""

    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_fp32(x)
        bias = self.bias.to(x32.dtype) if self.bias is not None else None
        y = F.layer_norm(x32, (x.shape[-1],), self.weight.to(x32.dtype), bias, self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"


def build_norm(norm_type: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """A norm layer of `norm_type` ('rmsnorm' | 'layernorm') over the last `dim` features."""
    if norm_type == "rmsnorm":
        return RMSNorm(dim, eps)
    if norm_type == "layernorm":
        return LayerNorm(dim, eps, bias)
    raise ValueError(f"unknown norm type {norm_type!r}; choose one of {', '.join(NORM_TYPES)}")
