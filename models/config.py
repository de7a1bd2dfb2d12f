"""Model hyper-parameters: the `model:` section of a training config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from normtron.kernels.dispatch import KERNEL_CHOICES
from normtron.models.mup import PARAMETRIZATIONS
from normtron.models.norms import NORM_TYPES
from normtron.models.placement import PLACEMENTS, uses_hypersphere


def config_field(default: Any, help: str, choices: Optional[tuple] = None, ge: float | None = None,
                 gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with the help text, allowed values and numeric bounds that `normtron train --help` shows
    and `bounds_error` checks."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None,
                "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}}
    return dataclasses.field(default=default, metadata=metadata)


_BOUND_TESTS = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
                "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}


def bounds_error(key: str, value: Any, field: dataclasses.Field) -> str | None:
    """What is wrong with a numeric `value` given the field's bounds, or None."""
    if value is None or isinstance(value, (bool, str, list)):
        return None
    failed = [f"{symbol} {bound}" for name, bound in field.metadata.get("bounds", {}).items()
              for test, symbol in [_BOUND_TESTS[name]] if not test(value, bound)]
    return f"{key}={value} must be {' and '.join(failed)}" if failed else None


@dataclass
class ModelConfig:
    # Keys that choose how the model is computed, not what it is: a run may resume with them changed.
    COMPUTE_ONLY_KEYS: ClassVar[frozenset[str]] = frozenset({"kernels"})

    dim: int = config_field(256, "hidden size", ge=1)
    n_layers: int = config_field(4, "number of transformer blocks", ge=1)
    n_heads: int = config_field(4, "attention heads (must divide dim)", ge=1)
    n_kv_heads: Optional[int] = config_field(
        None, "key/value heads for grouped-query attention (must divide n_heads; null = n_heads)", ge=1)
    vocab_size: Optional[int] = config_field(
        None, "embedding rows (null = the tokenizer's vocab size from data.dir/meta.json)", ge=1, lt=2**31)
    ffn_hidden_dim: Optional[int] = config_field(
        None, "SwiGLU hidden size (null = 8/3*dim rounded up to ffn_multiple_of)", ge=1)
    ffn_multiple_of: int = config_field(256, "rounding for the automatic SwiGLU hidden size", ge=1)
    norm: str = config_field("rmsnorm", "normalization type", NORM_TYPES)
    norm_eps: float = config_field(1e-5, "epsilon inside every norm", gt=0)
    norm_bias: bool = config_field(True, "LayerNorm and DyT have a bias (ignored for rmsnorm)")
    # DyT's LLaMA recipe (Zhu et al. 2025, Sec. 7 "Initialization of alpha", its table of alpha0 per LLaMA size; the
    # reference code jiachenzhu/DyT other_tasks/LLaMA): alpha0 differs between the DyT before attention and all the
    # others; the defaults are the paper's smallest LLaMA (7B: 0.8 attention, 0.2 other).
    dyt_alpha_init: float = config_field(0.2, "initial DyT alpha of every DyT except the attention input's "
                                         "(norm=dyt)", gt=0)
    dyt_alpha_init_attn: float = config_field(0.8, "initial DyT alpha of the norm on the attention sublayer's input "
                                              "(norm=dyt)", gt=0)
    dyt_embed_scale: bool = config_field(True, "with norm=dyt, multiply the embedding output by a learnable scalar "
                                         "initialized to sqrt(dim) (the DyT paper's LLaMA recipe, its LLM experiments)")
    kernels: str = config_field("auto", "how norms are computed: triton (fused Triton kernels, residual add included), "
                                "torch (PyTorch ops) or auto (Triton on CUDA GPUs, PyTorch elsewhere); same weights "
                                "either way, so a run may resume with another choice", KERNEL_CHOICES)
    placement: str = config_field("pre", "where norms sit in each block: pre x+F(N(x)), post N(x+F(x)), "
                                  "peri x+N(F(N(x))), mix (first floor(mix_alpha*L) layers post, rest pre), "
                                  "deepnorm LN(a*x+F(x)) a=(2L)^(1/4) with v/o/MLP init x(8L)^(-1/4), "
                                  "lns x+F(N(x)/sqrt(l)), reordered x+N(F(x)) (OLMo 2), subln Pre-LN plus a norm "
                                  "before o_proj and down_proj with v/o/MLP init x sqrt(log 2L) (Magneto), "
                                  "normformer Pre-LN plus head scales, a norm after attention and one before "
                                  "down_proj (NormFormer), "
                                  "ngpt x<-L2(x+a(L2(F(x))-x)) on the hypersphere (nGPT; no norm layers)",
                                  tuple(PLACEMENTS))
    mix_alpha: float = config_field(0.25, "fraction of Post-LN layers at the bottom for placement=mix (Mix-LN)",
                                    ge=0, le=1)
    normformer_residual_scale: bool = config_field(
        False, "placement=normformer: a learnable per-feature gain (init 1) on the MLP branch's skip path")
    layer_placements: Optional[list[str]] = config_field(
        None, "one placement per layer, overriding placement (e.g. [post, pre, pre, pre] or post,pre,pre,pre)",
        tuple(p for p in PLACEMENTS if p != "mix"))
    qk_norm: bool = config_field(False, "normalize queries and keys per head before RoPE")
    embed_norm: bool = config_field(False, "normalize the embedding output (Peri-LN uses this)")
    rope_theta: float = config_field(10000.0, "RoPE base frequency", gt=0)
    max_seq_len: int = config_field(2048, "longest sequence the RoPE table covers", ge=1, le=2**20)
    tie_embeddings: bool = config_field(False, "share the input embedding with the output head")
    init_std: float = config_field(0.02, "std of the normal init of every linear and embedding weight", gt=0)
    depth_scaled_init: bool = config_field(True, "scale output projections' init std by 1/sqrt(2*n_layers)")
    parametrization: str = config_field(
        "standard", "standard, or mup (maximal update parametrization, Tensor Programs V): init std, AdamW lr of "
        "hidden matrices, logits and attention scores scaled by the width relative to model.mup_base_dim",
        PARAMETRIZATIONS)
    mup_base_dim: Optional[int] = config_field(
        None, "the base width of parametrization=mup: the dim at which it equals standard (where lr and init "
        "were tuned)", ge=1)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim:
            return self.ffn_hidden_dim
        m = self.ffn_multiple_of
        return m * ((int(8 * self.dim / 3) + m - 1) // m)

    def validate(self) -> None:
        """Raise ValueError naming the offending `model.*` key."""
        for field in dataclasses.fields(self):
            if (problem := bounds_error(f"model.{field.name}", getattr(self, field.name), field)) is not None:
                raise ValueError(problem)
        if self.dim % self.n_heads:
            raise ValueError(f"model.n_heads={self.n_heads} does not divide model.dim={self.dim}; "
                             f"pick a head count that divides the hidden size")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_kv_heads={self.kv_heads} does not divide model.n_heads={self.n_heads}; "
                             f"each key/value head must serve a whole number of query heads")
        if self.head_dim % 2:
            raise ValueError(f"model.dim/model.n_heads = {self.head_dim} is odd; RoPE needs an even head size")
        if self.normformer_residual_scale and "normformer" not in (self.layer_placements or [self.placement]):
            raise ValueError("model.normformer_residual_scale=true needs a normformer layer; set "
                             "model.placement=normformer (or list normformer in model.layer_placements)")
        if self.parametrization == "mup" and (self.mup_base_dim is None or self.mup_base_dim % self.n_heads):
            raise ValueError(f"model.parametrization=mup needs model.mup_base_dim, the width the hyper-parameters "
                             f"were tuned at, divisible by model.n_heads={self.n_heads} (got {self.mup_base_dim})")
        if self.parametrization == "mup" and uses_hypersphere(self):
            raise ValueError("model.parametrization=mup does not apply to placement ngpt, which sets its own "
                             "attention and logit scales; use model.parametrization=standard")
        if self.layer_placements is not None and len(self.layer_placements) != self.n_layers:
            raise ValueError(f"model.layer_placements lists {len(self.layer_placements)} placements for "
                             f"model.n_layers={self.n_layers} layers; give exactly one per layer")
        if uses_hypersphere(self):  # raises for ngpt mixed with other placements
            for key in ("qk_norm", "embed_norm"):
                if getattr(self, key):
                    raise ValueError(f"model.{key}=true does not apply to placement ngpt, which normalizes queries, "
                                     f"keys and embeddings itself; set model.{key}=false")
