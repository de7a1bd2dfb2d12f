"""The one place the model builds normalization layers.

Statistics are always computed in fp32 (bf16 means/variances drift at large hidden sizes); the output is cast back
to the input dtype. Each norm runs in PyTorch ops or in the fused Triton kernels (`kernels/`, chosen by
`model.kernels`), with the same parameters either way, and can take the residual add that precedes it
(`add_forward`), which the Triton kernels do in the same pass. DyT is the norm-free member of the family: an
element-wise tanh with a learnable scalar, taking the same places and the same fused residual add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normtron.kernels.dispatch import use_triton

NORM_TYPES = ("rmsnorm", "layernorm", "dyt")


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or kept in float64 (used by exact reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Norm(nn.Module):
    """What RMSNorm and LayerNorm share: parameters, the choice of kernels, and the fused residual add."""

    rms: bool  # RMSNorm (no centring, no bias) or LayerNorm

    def __init__(self, dim: int, eps: float, bias: bool, kernels: str):
        super().__init__()
        self.eps, self.kernels = eps, kernels
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.kernels, x.device):  # Triton is imported only where it runs
            from normtron.kernels.triton_norm import norm
            return norm(x, self.weight, self.bias, self.eps, rms=self.rms)
        return self.torch_forward(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), in one kernel with Triton; residual None means just x."""
        if residual is None:
            return self(x), x
        if use_triton(self.kernels, x.device):
            from normtron.kernels.triton_norm import add_norm
            return add_norm(x, residual, self.weight, self.bias, self.eps, rms=self.rms)
        h = x + residual
        return self.torch_forward(h), h

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        bias = "" if self.rms else f", bias={self.bias is not None}"
        return f"{self.weight.shape[0]}, eps={self.eps}{bias}, kernels={self.kernels}"


class RMSNorm(Norm):
    """y = x / sqrt(mean(x^2) + eps) * weight."""

    rms = True

    def __init__(self, dim: int, eps: float, kernels: str = "torch"):
        super().__init__(dim, eps, bias=False, kernels=kernels)

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_fp32(x)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * at_least_fp32(self.weight)).to(x.dtype)


class LayerNorm(Norm):
    """y = (x - mean) / sqrt(var + eps) * weight (+ bias)."""

    rms = False

    def __init__(self, dim: int, eps: float, bias: bool, kernels: str = "torch"):
        super().__init__(dim, eps, bias=bias, kernels=kernels)

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_fp32(x)
        bias = self.bias.to(x32.dtype) if self.bias is not None else None
        y = F.layer_norm(x32, (x.shape[-1],), self.weight.to(x32.dtype), bias, self.eps)
        return y.to(x.dtype)


class DyT(Norm):
    """Dynamic Tanh (Zhu, Chen, He, LeCun, Liu 2025, "Transformers without Normalization", Eq. 1):
    y = weight * tanh(alpha * x) (+ bias), alpha one learnable scalar; no statistics, so no eps. Computed in fp32."""

    rms = False

    def __init__(self, dim: int, alpha_init: float, bias: bool, kernels: str = "torch"):
        nn.Module.__init__(self)  # Norm.__init__ would reset parameters before alpha exists
        self.eps, self.kernels, self.alpha_init = 0.0, kernels, alpha_init
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.alpha = nn.Parameter(torch.empty(1))  # shape (1,), not (): FSDP2 shards and DCP saves it like a vector
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.constant_(self.alpha, self.alpha_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.kernels, x.device):
            from normtron.kernels.triton_dyt import dyt
            return dyt(x, self.alpha, self.weight, self.bias)
        return self.torch_forward(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self(x), x
        if use_triton(self.kernels, x.device):
            from normtron.kernels.triton_dyt import add_dyt
            return add_dyt(x, residual, self.alpha, self.weight, self.bias)
        h = x + residual
        return self.torch_forward(h), h

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_fp32(x)
        y = torch.tanh(self.alpha.to(x32.dtype) * x32) * self.weight.to(x32.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x32.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, alpha_init={self.alpha_init}, bias={self.bias is not None}, " \
               f"kernels={self.kernels}"


class NoNorm(nn.Identity):
    """Where a placement has no norm: the identity, and a plain residual add."""

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = x if residual is None else x + residual
        return h, h


def build_norm(norm_type: str, dim: int, eps: float, bias: bool = True, kernels: str = "torch",
               dyt_alpha_init: float = 0.5) -> Norm:
    """A norm layer of `norm_type` ('rmsnorm' | 'layernorm' | 'dyt') over the last `dim` features, computed by
    `kernels` ('torch' | 'triton' | 'auto': Triton on CUDA GPUs); DyT's alpha starts at `dyt_alpha_init`."""
    if norm_type == "rmsnorm":
        return RMSNorm(dim, eps, kernels)
    if norm_type == "layernorm":
        return LayerNorm(dim, eps, bias, kernels)
    if norm_type == "dyt":
        return DyT(dim, dyt_alpha_init, bias, kernels)
    raise ValueError(f"unknown norm type {norm_type!r}; choose one of {', '.join(NORM_TYPES)}")
