"""nGPT (Loshchilov, Hsieh, Sun, Ginsburg, 2024, "nGPT: Normalized Transformer with Representation Learning on the
Hypersphere"): hidden states and weight matrices live on the unit hypersphere.

What the model needs for it, in one place:
- `l2_normalize` / `L2Norm`: x / ||x|| (the paper's Norm, no learnable gain, no epsilon in the reference code);
- `ScaledVector`: the paper's learnable scaling vectors with their "init value vs scale" trick (Sec. 2.5);
- the post-step projection: modules list which of their weights live on the hypersphere and along which dim
  (`hypersphere_dims`, set by the model only when it is an nGPT), and `normalize_hypersphere_` renormalizes them
  after every optimizer step (Sec. 2.6), on plain tensors and on DTensor shards alike (FSDP2, tensor parallelism).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from normtron.models.norms import at_least_fp32


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / ||x||_2 along `dim`, computed in fp32 (or float64) and cast back. On a DTensor whose `dim` is sharded the
    sum of squares is reduced across shards by DTensor itself."""
    x32 = at_least_fp32(x)
    squares = x32.pow(2).sum(dim, keepdim=True).clamp_min(1e-30)  # the clamp only guards an all-zero vector
    return (x32 * squares.rsqrt()).to(x.dtype)


class L2Norm(nn.Module):
    """The hypersphere projection as a norm layer (no parameters); `add_forward` as models.norms.Norm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = x if residual is None else x + residual
        return l2_normalize(h), h


class ScaledVector(nn.Module):
    """A learnable per-feature scale s, stored the nGPT way (Sec. 2.5, "s = s_init/s_scale * stored"): the parameter
    starts at `scale` and the value used is parameter * (init / scale), so it starts at `init` while Adam's steps,
    of size ~lr on the parameter, move the value by ~lr * init / scale. `forward(x)` multiplies x (last dim) by it.

    `column_indexed`: the vector is indexed like the output features of a column-parallel projection (heads,
    hidden units), so tensor parallelism shards it with them; otherwise it is replicated. `absolute`: the value is
    |parameter| * init / scale (the eigen learning rates in NVIDIA's reference code, which keeps them >= 0)."""

    def __init__(self, size: int, init: float, scale: float, column_indexed: bool = False, absolute: bool = False):
        super().__init__()
        self.init, self.scale, self.column_indexed, self.absolute = init, scale, column_indexed, absolute
        self.weight = nn.Parameter(torch.empty(size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.scale)

    def value(self) -> torch.Tensor:
        value = self.weight * (self.init / self.scale)
        return value.abs() if self.absolute else value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self.value()
        if isinstance(value, DTensor) and not isinstance(x, DTensor):  # x is this rank's slice (tensor parallel)
            value = value.to_local()
        return x * value.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, init={self.init}, scale={self.scale:.4g}"


def hypersphere_weights(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """(weight, dim) of every weight the model's modules declare on the hypersphere, each once (a tied head shares
    the embedding's tensor). Parts a pipeline stage dropped (None) are skipped."""
    found: dict[int, tuple[nn.Parameter, int]] = {}
    for module in model.modules():
        for child_name, dim in getattr(module, "hypersphere_dims", {}).items():
            child = getattr(module, child_name, None)
            if child is not None:
                found.setdefault(id(child.weight), (child.weight, dim))
    return list(found.values())


@torch.no_grad()
def normalize_hypersphere_(model: nn.Module) -> None:
    """Project every hypersphere weight back onto the unit sphere along its declared dim (nGPT Sec. 2.6: after each
    optimizer step). A no-op for models without such weights."""
    for weight, dim in hypersphere_weights(model):
        weight.copy_(l2_normalize(weight, dim))
