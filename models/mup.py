"""The maximal-update parametrization (µP, Yang et al. 2022, "Tensor Programs V", Tables 3 and 8): the one place
that knows its rules. `model.parametrization: mup` makes the model of width `dim` behave, in init, forward and
per-parameter learning rates, like the base model of width `mup_base_dim` scaled up, so hyper-parameters tuned at
the base width transfer; at dim == mup_base_dim it is exactly the standard parametrization.

The base model is this model with dim = mup_base_dim and the same head count and depth: every hidden width (dim,
head_dim, the SwiGLU hidden size) is taken to grow by the same width multiplier m = dim / mup_base_dim. In the
"multiplier" form of Table 8 (as microsoft/mup's MuReadout/MuAdam and OLMo-core's µP implement it):

    parameter                                init std            AdamW lr     forward
    input embedding, vectors (norms, ...)    unchanged           lr           -
    hidden matrices (q k v o gate up down)   init_std / sqrt(m)  lr / m       -
    output head (readout)                    unchanged           lr           logits * 1/m
    attention scores                         -                   -            q.k / d  (1/d, not 1/sqrt(d))

Under Muon the hidden matrices' update is orthogonalized (spectral norm 1) and scaled by sqrt(fan_out/fan_in) by
the optimizer itself, which is the spectral condition for feature learning (Yang, Simon and Bernstein 2023,
"A Spectral Condition for Feature Learning", Sec. 3): no extra width factor, so their lr multiplier is 1.

Parameters are classified by name, as checkpoints and diagnostics name them (`plain_name`): 2-D weights under
`layers.` are hidden matrices, `tok_embeddings.weight` the input, `output.weight` the readout (a tied head is the
embedding's tensor: vector-like, lr unchanged, and the 1/m multiplier still applies to the logits).
"""

from __future__ import annotations

import math
from typing import Optional, Protocol

PARAMETRIZATIONS = ("standard", "mup")


class MupConfig(Protocol):
    """What µP reads of the model config (ModelConfig; a protocol, since models/config.py imports this module)."""
    dim: int
    head_dim: int
    parametrization: str
    mup_base_dim: Optional[int]


def width_mult(cfg: MupConfig) -> float:
    """m = dim / mup_base_dim under µP; 1 under the standard parametrization."""
    return cfg.dim / cfg.mup_base_dim if cfg.parametrization == "mup" else 1.0


def is_hidden_matrix(name: str, ndim: int) -> bool:
    """Both dimensions grow with width ("matrix-like" in Tensor Programs V): the blocks' 2-D weights."""
    return ndim == 2 and name.startswith("layers.")


def init_std_scale(cfg: MupConfig, name: str, ndim: int = 2) -> float:
    """Multiplier of the standard init std of weight `name`: 1/sqrt(m) for hidden matrices (Table 8: hidden init
    variance 1/fan_in, relative to the base model's)."""
    return 1.0 / math.sqrt(width_mult(cfg)) if is_hidden_matrix(name, ndim) else 1.0


def lr_scale(cfg: MupConfig, name: str, ndim: int, optimizer: str = "adamw") -> float:
    """Multiplier of training.lr for parameter `name`: 1/m for hidden matrices under Adam(W) (Table 3/8: hidden
    weights' Adam lr eta/fan_in); 1 for everything else, and for Muon's matrices (see the module docstring)."""
    if optimizer == "adamw" and is_hidden_matrix(name, ndim):
        return 1.0 / width_mult(cfg)
    return 1.0


def attention_scale(cfg: MupConfig) -> float | None:
    """The softmax scale of the attention scores: None (SDPA's 1/sqrt(head_dim)) under the standard
    parametrization; under µP 1/head_dim (Tensor Programs V Sec. 4 / Table 3 footnote: 1/d attention), times
    sqrt(base_head_dim) so that it is 1/sqrt(head_dim) at the base width."""
    if cfg.parametrization != "mup":
        return None
    base_head_dim = cfg.head_dim / width_mult(cfg)
    return math.sqrt(base_head_dim) / cfg.head_dim


def logit_scale(cfg: MupConfig) -> float:
    """The output multiplier 1/m on the logits (Table 8's readout multiplier 1/fan_in, relative to the base)."""
    return 1.0 / width_mult(cfg)
