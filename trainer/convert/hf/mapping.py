"""Parameter names and configs between normtron and Hugging Face: the one place that knows both.

A model with `pre` placement, RMSNorm, no QK-norm and no embedding norm is exactly `LlamaForCausalLM` (SwiGLU, RoPE
in the rotate-half layout, GQA); the same model under µP is `GraniteForCausalLM` (Llama plus µP's multipliers: its
attention_multiplier is our softmax scale, its logits_scaling our width multiplier); every other model becomes
`NormtronForCausalLM` (remote_model.py), whose parameter names are the training checkpoint's own under `model.`.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from normtron.models import mup
from normtron.models.config import ModelConfig
from normtron.models.placement import PRE, layer_wiring
from normtron.models.transformer import Transformer
from normtron.trainer.errors import UserError

LLAMA, GRANITE, NORMTRON = "LlamaForCausalLM", "GraniteForCausalLM", "NormtronForCausalLM"

# (our name, Llama name) patterns; our names are the plain module's, as in a DCP checkpoint without "model.".
_LLAMA_NAMES = [
    (r"tok_embeddings\.weight", r"model.embed_tokens.weight"),
    (r"norm\.weight", r"model.norm.weight"),
    (r"output\.weight", r"lm_head.weight"),
    (r"layers\.(\d+)\.attention\.(q|k|v|o)_proj\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.(gate|up|down)_proj\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
    (r"layers\.(\d+)\.attention_norms\.input\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norms\.input\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
]


def is_llama(cfg: ModelConfig) -> bool:
    """Whether the model is exactly LlamaForCausalLM (GraniteForCausalLM under µP)."""
    return (cfg.norm == "rmsnorm" and not cfg.qk_norm and not cfg.embed_norm
            and all(layer_wiring(cfg, i) == PRE for i in range(cfg.n_layers)))


def architecture(cfg: ModelConfig) -> str:
    if not is_llama(cfg):
        return NORMTRON
    return GRANITE if cfg.parametrization == "mup" else LLAMA


def expected_tensors(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Our parameter names and shapes (tied head excluded: it is the embedding), from a meta-device model."""
    with torch.device("meta"):
        model = Transformer(cfg)
    names = {name: p.shape for name, p in model.named_parameters()}  # named_parameters lists a tied tensor once
    return names


def hf_name(ours: str, arch: str) -> str:
    """The Hugging Face name of our parameter `ours` (e.g. 'layers.0.attention.q_proj.weight')."""
    if arch == NORMTRON:
        return f"model.{ours}"
    for pattern, replacement in _LLAMA_NAMES:
        if re.fullmatch(pattern, ours):
            return re.sub(pattern, replacement, ours)
    raise KeyError(f"{ours} has no LlamaForCausalLM counterpart")


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """Hugging Face name -> our name, for every parameter of the model."""
    arch = architecture(cfg)
    return {hf_name(ours, arch): ours for ours in expected_tensors(cfg)}


def hf_config(cfg: ModelConfig, dtype: torch.dtype, bos_id: int | None = 1, eos_id: int | None = 2) -> dict:
    """config.json for the model (without auto_map); bos/eos ids are the tokenizer's."""
    from transformers import LlamaConfig

    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_id,
              "eos_token_id": eos_id, "dtype": str(dtype).removeprefix("torch.")}
    if is_llama(cfg):
        llama_config, extra = LlamaConfig, {"head_dim": cfg.head_dim}
        if cfg.parametrization == "mup":
            from transformers import GraniteConfig
            llama_config = GraniteConfig
            extra = dict(attention_multiplier=mup.attention_scale(cfg), logits_scaling=mup.width_mult(cfg),
                         embedding_multiplier=1.0, residual_multiplier=1.0)
        config = llama_config(hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
                              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
                              hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
                              rms_norm_eps=cfg.norm_eps, attention_bias=False, mlp_bias=False,
                              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                              architectures=[architecture(cfg)], **extra, **common)
        return config.to_dict()
    fields = dataclasses.asdict(cfg)
    fields["ffn_hidden_dim"] = cfg.hidden_dim  # resolved, so the folder never depends on our rounding rule
    return {"architectures": [NORMTRON], "model_type": "normtron", **fields, **common, "use_cache": True}


def model_config_from_hf(config: dict, where: str) -> ModelConfig:
    """Our ModelConfig from a Hugging Face config.json (Llama, or a folder we wrote for another placement)."""
    archs = config.get("architectures") or []
    if archs == [NORMTRON] or config.get("model_type") == "normtron":
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return _checked(ModelConfig(**{k: v for k, v in config.items() if k in names}), where)
    if archs == [GRANITE]:
        return _granite_as_mup(config, where)
    if archs != [LLAMA] and not (not archs and config.get("model_type") == "llama"):
        raise UserError(f"{where} holds a {', '.join(archs) or config.get('model_type') or 'unknown'} model; "
                        f"supported architectures: {LLAMA} (and {NORMTRON} folders written by normtron)")
    from transformers import LlamaConfig

    llama = LlamaConfig(**config)
    rope = dict(llama.rope_parameters or {})
    unsupported = [f"{key}={value!r}" for key, value, ok in (
        ("hidden_act", llama.hidden_act, "silu"), ("attention_bias", llama.attention_bias, False),
        ("mlp_bias", llama.mlp_bias, False), ("rope_type", rope.get("rope_type", "default"), "default"),
        ("head_dim", llama.head_dim, llama.hidden_size // llama.num_attention_heads)) if value != ok]
    if unsupported:
        raise UserError(f"{where}: this Llama variant is not supported ({', '.join(unsupported)}); normtron's model "
                        f"is SwiGLU with bias-free projections and plain RoPE")
    cfg = ModelConfig(dim=llama.hidden_size, n_layers=llama.num_hidden_layers, n_heads=llama.num_attention_heads,
                      n_kv_heads=llama.num_key_value_heads, vocab_size=llama.vocab_size,
                      ffn_hidden_dim=llama.intermediate_size, norm="rmsnorm", norm_eps=llama.rms_norm_eps,
                      placement="pre", rope_theta=float(rope.get("rope_theta", 10000.0)),
                      max_seq_len=llama.max_position_embeddings, tie_embeddings=bool(llama.tie_word_embeddings))
    return _checked(cfg, where)


def _granite_as_mup(config: dict, where: str) -> ModelConfig:
    """A GraniteForCausalLM folder as our µP model: Llama plus logits_scaling = m (so mup_base_dim = dim / m) and
    attention_multiplier = µP's softmax scale; only the multipliers µP has (embedding and residual ones at 1)."""
    llama = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "embedding_multiplier",
                                                          "residual_multiplier", "logits_scaling",
                                                          "attention_multiplier")}
    cfg = model_config_from_hf({**llama, "architectures": [LLAMA]}, where)
    base = cfg.dim / float(config.get("logits_scaling", 1.0))
    mup_cfg = dataclasses.replace(cfg, parametrization="mup", mup_base_dim=round(base))
    expected = mup.attention_scale(mup_cfg) if base == round(base) else None
    if (config.get("embedding_multiplier", 1.0) != 1.0 or config.get("residual_multiplier", 1.0) != 1.0
            or expected is None or abs(config.get("attention_multiplier", 0.0) - expected) > 1e-6 * expected):
        raise UserError(f"{where}: this Granite model's multipliers are not normtron's µP (embedding_multiplier 1, "
                        f"residual_multiplier 1, logits_scaling = dim / base width, attention_multiplier = "
                        f"sqrt(base head dim) / head_dim)")
    return _checked(mup_cfg, where)


def _checked(cfg: ModelConfig, where: str) -> ModelConfig:
    try:
        cfg.validate()
    except (ValueError, TypeError) as err:
        raise UserError(f"{where}: the model cannot be expressed in normtron ({err})") from None
    return cfg
