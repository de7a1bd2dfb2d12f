"""A Llama-style decoder-only transformer with swappable norm placement, in plain PyTorch.

Reads top to bottom: RoPE, attention, SwiGLU MLP, the norms around a residual branch, the block, the model.
The model knows nothing about devices, meshes or precision: parallel/ wraps it from outside. It is built on the
meta device and materialized with `init_weights()`, and its layers live in a ModuleDict keyed by layer index so
that pipeline stages can delete layers (or the embedding / final norm / head) and keep stable parameter names.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from normtron.models.config import ModelConfig
from normtron.models.hypersphere import L2Norm, ScaledVector, l2_normalize, normalize_hypersphere_
from normtron.models.mup import attention_scale, init_std_scale, logit_scale
from normtron.models.norms import NoNorm, at_least_fp32, build_norm
from normtron.models.placement import NormWiring, layer_wiring, uses_hypersphere

# --- Rotary position embedding (the "rotate half" layout used by Hugging Face Llama checkpoints) ---------------

def rope_table(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """(max_seq_len, head_dim) table holding cos in the first half of the last dim and sin in the second half.

    Computed in float64 and stored in fp32 (bf16 angles lose whole radians at long positions)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float64), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (batch, seq, heads, head_dim) by position; computed in fp32."""
    cos, sin = table.chunk(2, dim=-1)
    cos = torch.cat([cos, cos], dim=-1)[None, :, None, :]
    sin = torch.cat([sin, sin], dim=-1)[None, :, None, :]
    x32 = at_least_fp32(x)
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class KVCache(Protocol):
    """What attention needs from a generation cache: transformers' Cache classes (DynamicCache ...) offer it, and so
    does models.generation.KVCache. Tensors are (batch, kv_heads, seq, head_dim)."""

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values of layer `layer_idx`; return all of that layer's keys/values so far."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions cached so far."""


def causal_mask(queries: int, keys: int, device=None) -> torch.Tensor:
    """(queries, keys) boolean mask: the queries are the last positions of the keys, each sees itself and before."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=keys - queries)


def norm_layer(cfg: ModelConfig, dim: int, present: bool = True, attention_input: bool = False) -> nn.Module:
    """Every norm in the model comes from here, computed by `cfg.kernels`; NoNorm (identity) where there is none.
    A DyT on the attention sublayer's input starts at `cfg.dyt_alpha_init_attn`, every other at `cfg.dyt_alpha_init`."""
    if not present:
        return NoNorm()
    alpha = cfg.dyt_alpha_init_attn if attention_input else cfg.dyt_alpha_init
    return build_norm(cfg.norm, dim, cfg.norm_eps, cfg.norm_bias, cfg.kernels, dyt_alpha_init=alpha)


class LearnableScale(nn.Module):
    """x * s with one learnable scalar s: DyT's LLaMA recipe puts one after the embedding, s0 = sqrt(dim)."""

    def __init__(self, init: float):
        super().__init__()
        self.init = init
        self.weight = nn.Parameter(torch.empty(1))  # (1,) like DyT's alpha, for FSDP2 and DCP
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (at_least_fp32(x) * self.weight).to(x.dtype)

    def extra_repr(self) -> str:
        return f"init={self.init:g}"


class Gain(nn.Module):
    """A learnable gain per slice along dimension `dim` of the input (init 1): NormFormer's head scales (dim -2 of
    (batch, seq, heads, head_dim)) and its residual scaling (the feature dim)."""

    def __init__(self, size: int, dim: int = -1):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(-1, *[1] * (-self.dim - 1))


# --- Sublayers -------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Causal grouped-query self-attention with optional per-head QK-norm, and where the wiring asks, per-head
    gains and an inner norm on the attention output before o_proj."""

    def __init__(self, cfg: ModelConfig, wiring: NormWiring = NormWiring(), layer_id: int = 0):
        super().__init__()
        self.head_dim, self.layer_id = cfg.head_dim, layer_id
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = norm_layer(cfg, cfg.head_dim, present=cfg.qk_norm)
        self.k_norm = norm_layer(cfg, cfg.head_dim, present=cfg.qk_norm)
        self.head_scale = Gain(cfg.n_heads, dim=-2) if wiring.head_scale else nn.Identity()
        # Over all heads: under tensor parallelism parallel/ gives it the full-width statistics.
        self.inner_norm = norm_layer(cfg, cfg.n_heads * cfg.head_dim, present=wiring.inner_norm)
        self.hypersphere_dims: dict[str, int] = {}
        self.qk_scale = None
        self.softmax_scale = attention_scale(cfg)  # None: SDPA's 1/sqrt(head_dim); µP's 1/d-style scale
        if uses_hypersphere(cfg):
            # nGPT Sec. 2.3.2: q, k normalized per head (after RoPE, as the reference code) and scaled by s_qk
            # (init 1, scale 1/sqrt(d_model)); the softmax scale becomes sqrt(d_k), since q.k is a cosine.
            # Weights are unit vectors along d_model: the rows of q/k/v (inputs), the columns of o (outputs).
            self.hypersphere_dims = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 0}
            self.qk_scale = ScaledVector(cfg.n_heads * cfg.head_dim, 1.0, cfg.dim ** -0.5, column_indexed=True)
            self.softmax_scale = math.sqrt(cfg.head_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.q_norm(self.q_proj(x).view(batch, seq, -1, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(batch, seq, -1, self.head_dim))
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        mask = None
        if cache is not None:  # generation: this layer's keys/values of earlier positions, then these
            k, v = (t.transpose(1, 2) for t in cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_id))
            mask = causal_mask(seq, k.shape[1], x.device)
        # Each key/value head serves n_heads/n_kv_heads consecutive query heads. Expanding them here (rather than
        # SDPA's enable_gqa) keeps every fused attention backend available, fp32 included.
        repeats = q.shape[2] // k.shape[2]
        if repeats > 1:
            k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
        if self.qk_scale is not None:  # per query head (a shared key head is scaled by each query head's s_qk)
            q, k = (self.qk_scale(l2_normalize(t).flatten(2)).view_as(t) for t in (q, k))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                             is_causal=mask is None, scale=self.softmax_scale)
        out = self.head_scale(out.transpose(1, 2))
        return self.o_proj(self.inner_norm(out.reshape(batch, seq, -1)))


class FeedForward(nn.Module):
    """SwiGLU: down(N(silu(gate(x)) * up(x))), with the inner norm N only where the wiring asks (else identity)."""

    def __init__(self, cfg: ModelConfig, wiring: NormWiring = NormWiring()):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.inner_norm = norm_layer(cfg, cfg.hidden_dim, present=wiring.inner_norm)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.hypersphere_dims: dict[str, int] = {}
        self.up_scale = self.gate_scale = None
        if uses_hypersphere(cfg):
            # nGPT Sec. 2.4.2: u <- u s_u, v <- v s_v sqrt(d_model) (v is SiLU's input: gate here), both init 1 and
            # scale 1; weights unit along d_model (rows of gate/up, columns of down).
            self.hypersphere_dims = {"gate_proj": 1, "up_proj": 1, "down_proj": 0}
            self.up_scale = ScaledVector(cfg.hidden_dim, 1.0, 1.0, column_indexed=True)
            self.gate_scale = ScaledVector(cfg.hidden_dim, 1.0, 1.0, column_indexed=True)
            self.gate_gain = math.sqrt(cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up_scale is not None:
            gate = self.gate_scale(self.gate_proj(x)) * self.gate_gain
            return self.down_proj(F.silu(gate) * self.up_scale(self.up_proj(x)))
        return self.down_proj(self.inner_norm(F.silu(self.gate_proj(x)) * self.up_proj(x)))


# --- Norm placement around one residual branch -------------------------------------------------------------------

# A branch's residual add may be left pending, as (out, skip) with the stream's value out + skip, for whichever norm
# reads the stream next to do it: norm.add_forward(out, skip) -> (norm(out + skip), out + skip), one fused kernel
# with Triton. So Pre-LN's add meets the next sublayer's (or block's, or the final) input norm, and Post-LN's add its
# own post norm, with no per-placement code: the NormWiring alone says where the norms are.

class SublayerNorms(nn.Module):
    """x -> post(residual_scale * x + output(F(input_scale * input(x)))), with the norms the layer's NormWiring
    asks for.

    `residual` is an add an earlier branch left pending (the input is then x + residual); with `defer_add` this
    branch returns (out, skip) with its own add pending instead of the sum (unless its post norm needs it now)."""

    def __init__(self, wiring: NormWiring, cfg: ModelConfig, attention: bool = False):
        super().__init__()
        self.residual_scale, self.input_scale = wiring.residual_scale, wiring.input_scale
        self.norm_after_add = wiring.post_norm
        self.input = norm_layer(cfg, cfg.dim, present=wiring.input_norm, attention_input=attention)
        self.output = norm_layer(cfg, cfg.dim, present=wiring.output_norm)
        self.post = norm_layer(cfg, cfg.dim, present=wiring.post_norm)
        self.residual_gain = Gain(cfg.dim) if wiring.learned_residual else None
        self.eigen_lr = None
        if wiring.hypersphere:
            # nGPT Sec. 2.2.2: h <- Norm(h + alpha (Norm(F(h)) - h)), the "eigen learning rate" alpha per feature,
            # init 0.05, scale 1/sqrt(d_model) (Sec. 2.5); |alpha| as in NVIDIA's reference code.
            self.output, self.post = L2Norm(), L2Norm()
            self.eigen_lr = ScaledVector(cfg.dim, 0.05, cfg.dim ** -0.5, absolute=True)

    def forward(self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor],
                residual: torch.Tensor | None = None, defer_add: bool = False):
        if self.eigen_lr is not None:  # the hypersphere update: the add cannot wait
            x = x if residual is None else x + residual
            y = self.post(x + self.eigen_lr(self.output(sublayer(x)) - x))
            return (y, None) if defer_add else y
        normed, x = self.input.add_forward(x, residual)
        normed = normed if self.input_scale == 1.0 else self.input_scale * normed
        out = self.output(sublayer(normed))
        skip = x if self.residual_scale == 1.0 else self.residual_scale * x
        skip = skip if self.residual_gain is None else self.residual_gain(skip)
        if self.norm_after_add:  # Post-LN: the add cannot wait
            y = self.post.add_forward(out, skip)[0]
            return (y, None) if defer_add else y
        return (out, skip) if defer_add else out + skip


class TransformerBlock(nn.Module):
    """x -> x' through the attention and MLP branches; `residual` and `defer_add` as in SublayerNorms."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        wiring = layer_wiring(cfg, layer_id)
        self.attention = Attention(cfg, wiring.branch("attention"), layer_id)
        self.attention_norms = SublayerNorms(wiring.branch("attention"), cfg, attention=True)
        self.feed_forward = FeedForward(cfg, wiring.branch("mlp"))
        self.ffn_norms = SublayerNorms(wiring.branch("mlp"), cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, residual: torch.Tensor | None = None,
                defer_add: bool = False, cache: KVCache | None = None):
        x, residual = self.attention_norms(x, lambda h: self.attention(h, rope, cache=cache), residual, defer_add=True)
        return self.ffn_norms(x, self.feed_forward, residual, defer_add)


# --- The model ---------------------------------------------------------------------------------------------------

class Transformer(nn.Module):
    """tokens (batch, seq) -> logits (batch, seq, vocab).

    A pipeline stage may set `tok_embeddings` (with `embed_scale` and `embed_norm`), `norm` or `output` (with
    `logit_scale`) to None and delete entries of `layers`; the forward then takes / returns hidden states instead of
    tokens / logits.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.vocab_size:
            raise ValueError("model.vocab_size must be set before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # Only where used, so other models' parameter names are unchanged.
        self.embed_scale = LearnableScale(math.sqrt(cfg.dim)) if cfg.norm == "dyt" and cfg.dyt_embed_scale else None
        self.embed_norm = norm_layer(cfg, cfg.dim, present=cfg.embed_norm)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        hypersphere = uses_hypersphere(cfg)
        self.norm = norm_layer(cfg, cfg.dim, present=not hypersphere)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # nGPT Sec. 2.1: embeddings unit along d_model, logits z = E_output h scaled by s_z (init 1, scale
        # 1/sqrt(d_model)); a pipeline stage without the head drops it with the head. Otherwise µP's output
        # multiplier, a number (1 under the standard parametrization).
        self.hypersphere_dims = {"tok_embeddings": 1, "output": 1} if hypersphere else {}
        self.logit_scale = ScaledVector(cfg.vocab_size, 1.0, cfg.dim ** -0.5) if hypersphere else logit_scale(cfg)
        # Derived from the config, so not saved in checkpoints; recomputed by init_weights() after meta init.
        self.register_buffer("rope", rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta), persistent=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the head; must be redone after `to_empty()`, which unties parameters."""
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, head: Callable | None = None, cache: KVCache | None = None):
        """`head(hidden, head_weight, logit_scale)`, if given, replaces the output projection and its result is
        returned (the trainer's chunked loss computes the logits chunk by chunk from the weight); called here, inside
        the forward, where FSDP2 has the weight gathered. `cache` (generation only): the keys/values of the
        positions before `tokens`, extended in place."""
        h = tokens
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)
            h = self.embed_scale(h) if self.embed_scale is not None else h
            h = self.embed_norm(h) if self.embed_norm is not None else h
        start = 0 if cache is None else cache.get_seq_length()
        seq = start + h.shape[1]
        if seq > self.rope.shape[0]:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len={self.rope.shape[0]}")
        rope = self.rope[start:seq]
        residual = None  # the last block's pending residual add, done by the final norm
        for layer in self.layers.values():
            h, residual = layer(h, rope, residual, defer_add=True, cache=cache)
        if self.norm is not None:
            h = self.norm.add_forward(h, residual)[0]
        elif residual is not None:  # a pipeline stage without the final norm hands on the plain sum
            h = h + residual
        if self.output is None:
            return h
        if head is not None:
            return head(h, self.output.weight, self.logit_scale)
        logits = self.output(h)
        if isinstance(self.logit_scale, nn.Module):
            return self.logit_scale(logits)
        return logits if self.logit_scale in (None, 1.0) else logits * self.logit_scale

    @torch.no_grad()
    def init_weights(self, seed: int = 0, buffer_device: torch.device | None = None) -> None:
        """Fill every parameter (after `to_empty()`) and rebuild the RoPE table.

        Each weight draws from its own generator seeded by (seed, parameter name), so the values do not depend on
        which other modules exist or in what order they are visited: a pipeline stage holding layers 8-15
        initializes them exactly as the whole model does.
        """
        cfg = self.cfg
        device = buffer_device or self.rope.device
        self.rope = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device)
        self.tie_weights()
        # Output projections write into the residual stream; GPT-2 style depth scaling keeps its variance O(1).
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.depth_scaled_init else cfg.init_std
        done: set[int] = set()  # a tied head shares the embedding's tensor: initialize it once
        for name, module in self.named_modules():
            name = plain_name(name)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if id(module.weight) in done:  # never reset_parameters() here: that would redraw the tied weight
                    continue
                done.add(id(module.weight))
                std = self._init_std(name, out_std) * init_std_scale(cfg, f"{name}.weight", module.weight.ndim)
                generator = torch.Generator(device=module.weight.device)
                generator.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
                # Drawn as a whole tensor, then copied in: a sharded parameter keeps its slice of the same values.
                values = torch.empty(module.weight.shape, dtype=module.weight.dtype, device=module.weight.device)
                module.weight.copy_(values.normal_(mean=0.0, std=std, generator=generator))
            elif hasattr(module, "reset_parameters") and module is not self:
                module.reset_parameters()
        normalize_hypersphere_(self)  # nGPT starts on the hypersphere (a no-op for other placements)

    def _init_std(self, name: str, out_std: float) -> float:
        """The init std of weight `name`: GPT-2 depth scaling for output projections, or DeepNorm's beta (Sub-LN's
        gamma) for value/output/MLP weights of a layer whose wiring has an init gain."""
        parts = name.split(".")
        if parts[0] == "layers":
            branch = "mlp" if parts[2] == "feed_forward" else "attention"
            gain = layer_wiring(self.cfg, int(parts[1])).branch(branch).init_gain
            if gain != 1.0 and parts[-1] in ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                return self.cfg.init_std * gain
        return out_std if name.endswith(("o_proj", "down_proj")) else self.cfg.init_std


def plain_name(name: str) -> str:
    """A module or parameter name without the wrappers parallel/ inserts (activation checkpointing's
    `_checkpoint_wrapped_module`, ...): the name in checkpoints, init seeds and diagnostics."""
    return ".".join(part for part in name.split(".") if not part.startswith("_"))


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Unique parameters (tied weights counted once); optionally without the input embedding table."""
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                params.pop(id(module.weight), None)
    return sum(p.numel() for p in params.values())


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (matmul parameters) + 12 * layers * dim * seq for attention scores (PaLM)."""
    attn = cfg.dim * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim
    mlp = 3 * cfg.dim * cfg.hidden_dim
    head = cfg.dim * cfg.vocab_size
    return 6 * (cfg.n_layers * (attn + mlp) + head) + 12 * cfg.n_layers * cfg.dim * seq_len
