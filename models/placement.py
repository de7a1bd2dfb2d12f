"""Normalization placement as data.

Every transformer block has two residual branches, x -> x + F(x), with F the attention or the MLP. A placement says
where norms sit around F, as a `NormWiring`:

    input_norm:  x + F(N(x))            (Pre-LN)
    output_norm: x + N(F(x))            (Peri-LN's second norm, on the sublayer output before the add)
    post_norm:   N(x + F(x))            (Post-LN: the norm comes after the residual add)
    residual_scale a:  a*x + F(x)       (the skip path scaled before the add)
    input_scale s:     x + F(s*N(x))    (the input norm's output scaled: LayerNorm Scaling)
    init_gain b:       the value, output and MLP weights of the layer start at b times their usual init (DeepNorm)
    hypersphere:       x <- L2(x + alpha*(L2(F(x)) - x)) with learnable alpha (nGPT); the other fields are unused
    inner_norm:        x + F(...) with a norm inside F, on the input of its last projection: the attention heads
                       before o_proj, the MLP activation before down_proj (Sub-LN; NormFormer's MLP)
    head_scale:        a learnable gain per attention head on the attention output before o_proj (NormFormer)
    learned_residual:  g*x + F(x) with a learnable per-feature gain g on the skip path (NormFormer's option)
    mlp:               the MLP branch's own wiring, where it differs from the attention branch's (NormFormer)

A placement maps (layer index, number of layers, model config) to the wiring of that layer, so per-layer schemes
such as Mix-LN are one function. Adding a placement means adding one entry to `PLACEMENTS`. This module sits below
models/config.py (whose `placement` choices are the names here): it reads the config only through the fields that
`PlacementConfig` declares, and never imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol


class PlacementConfig(Protocol):
    """The fields of `models.config.ModelConfig` that placements read."""

    n_layers: int
    placement: str
    layer_placements: Optional[list[str]]
    mix_alpha: float
    normformer_residual_scale: bool


@dataclass(frozen=True)
class NormWiring:
    input_norm: bool = False
    output_norm: bool = False
    post_norm: bool = False
    residual_scale: float = 1.0  # the skip path is multiplied by this before the add (DeepNorm's alpha)
    input_scale: float = 1.0     # the input norm's output is multiplied by this (LayerNorm Scaling's 1/sqrt(l))
    init_gain: float = 1.0       # v/o/MLP init std multiplier, replacing depth-scaled init (DeepNorm's beta)
    # nGPT: the whole model lives on the unit hypersphere (models/hypersphere.py); a model-wide choice, never mixed.
    hypersphere: bool = False
    inner_norm: bool = False     # a norm on the input of the sublayer's last projection (o_proj / down_proj)
    head_scale: bool = False     # learnable per-head gain on the attention output (attention branch only)
    learned_residual: bool = False  # learnable per-feature gain on the skip path
    mlp: Optional[NormWiring] = None  # the MLP branch's wiring when it differs; None: the same as the attention's

    def branch(self, name: str) -> NormWiring:
        """The wiring of branch 'attention' or 'mlp'."""
        return self.mlp if name == "mlp" and self.mlp is not None else self


PRE = NormWiring(input_norm=True)
POST = NormWiring(post_norm=True)
PERI = NormWiring(input_norm=True, output_norm=True)
REORDERED = NormWiring(output_norm=True)
NGPT = NormWiring(hypersphere=True)


def num_mix_post_layers(n_layers: int, alpha: float) -> int:
    """Mix-LN (Li et al., 2025) puts floor(alpha * L) Post-LN layers first; the rounding guards 0.29 * 100 = 28.99..."""
    return math.floor(round(alpha * n_layers, 9))


def _mix(layer: int, n_layers: int, cfg: PlacementConfig) -> NormWiring:
    return POST if layer < num_mix_post_layers(n_layers, cfg.mix_alpha) else PRE


def _deepnorm(layer: int, n_layers: int, cfg: PlacementConfig) -> NormWiring:
    """DeepNet (Wang et al., 2022), decoder-only constants for N layers: x_{l+1} = LN(alpha*x + F(x)) with
    alpha = (2N)^(1/4), and v/o/MLP weights initialized scaled by beta = (8N)^(-1/4). (Mix-LN's code hard-codes
    beta = 1/sqrt(8), which is (8N)^(-1/4) only at N = 32.)"""
    return NormWiring(post_norm=True, residual_scale=(2 * n_layers) ** 0.25, init_gain=(8 * n_layers) ** -0.25)


def _lns(layer: int, n_layers: int, cfg: PlacementConfig) -> NormWiring:
    """LayerNorm Scaling (Sun et al., 2025): Pre-LN with each norm output scaled by 1/sqrt(l), l = layer + 1."""
    return NormWiring(input_norm=True, input_scale=1.0 / math.sqrt(layer + 1))


def _subln(layer: int, n_layers: int, cfg: PlacementConfig) -> NormWiring:
    """Sub-LN (Magneto, "Foundation Transformers", Wang et al., 2022, Sec. 2.1 Sub-LayerNorm): Pre-LN plus a norm
    inside each sublayer, before the attention output projection and before the FFN's second projection. Init
    (Sec. 2.2, and torchscale's decoder-only `subln` init): v/o/FFN weights scaled by gamma = sqrt(log 2N) for N
    layers; Q/K keep theirs, and the scaled weights carry no GPT-2 depth scaling (they replace it, as DeepNorm's)."""
    return NormWiring(input_norm=True, inner_norm=True, init_gain=math.sqrt(math.log(2 * n_layers)))


def _normformer(layer: int, n_layers: int, cfg: PlacementConfig) -> NormWiring:
    """NormFormer (Shleifer et al., 2021, Sec. 2 and Fig. 1): Pre-LN plus, on the attention branch, a learnable
    per-head scale of the attention output (HeadScale) and a norm after attention (Post-Attn LN, an output
    norm); on the MLP branch a norm after the activation (FFN LN, an inner norm). The optional residual scaling
    (Sec. 2, lambda_resid: fairseq's `scale_resids`) multiplies the MLP branch's skip by a learnable per-feature gain
    initialized to one."""
    mlp = NormWiring(input_norm=True, inner_norm=True, learned_residual=cfg.normformer_residual_scale)
    return NormWiring(input_norm=True, output_norm=True, head_scale=True, mlp=mlp)


PLACEMENTS: dict[str, Callable[[int, int, PlacementConfig], NormWiring]] = {
    "pre": lambda layer, n_layers, cfg: PRE,
    "post": lambda layer, n_layers, cfg: POST,
    "peri": lambda layer, n_layers, cfg: PERI,
    "mix": _mix,
    "deepnorm": _deepnorm,
    "lns": _lns,
    "reordered": lambda layer, n_layers, cfg: REORDERED,  # OLMo 2: x + N(F(x)), no input norm
    "ngpt": lambda layer, n_layers, cfg: NGPT,  # Loshchilov et al. (2024), models/hypersphere.py
    "subln": _subln,
    "normformer": _normformer,
}


def layer_wiring(cfg: PlacementConfig, layer: int) -> NormWiring:
    """The norm wiring of block `layer` (0-based): from `cfg.layer_placements` when given, else `cfg.placement`."""
    name = cfg.layer_placements[layer] if cfg.layer_placements else cfg.placement
    try:
        placement = PLACEMENTS[name]
    except KeyError:
        raise ValueError(f"unknown placement {name!r}; choose one of {', '.join(PLACEMENTS)}") from None
    return placement(layer, cfg.n_layers, cfg)


def uses_hypersphere(cfg: PlacementConfig) -> bool:
    """Whether the model is an nGPT; raises ValueError when `layer_placements` mixes ngpt with other placements
    (nGPT's normalized residual stream and renormalized weights hold for the whole model or not at all)."""
    names = cfg.layer_placements or [cfg.placement]
    if "ngpt" in names and set(names) != {"ngpt"}:
        raise ValueError(f"model.layer_placements={','.join(names)} mixes ngpt with other placements; nGPT keeps "
                         f"every hidden state and weight on the hypersphere, so use ngpt for all layers or none")
    return names[0] == "ngpt"
