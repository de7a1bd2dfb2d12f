"""Independent references from Hugging Face transformers, loaded with our weights:
`pre` + RMSNorm + SwiGLU + RoPE + GQA is LlamaForCausalLM (untied and tied), and adding per-head QK-norm before RoPE
is Qwen3ForCausalLM."""

from __future__ import annotations

import pytest
import torch
import transformers  # a dev extra: bash launch/test.sh installs it

from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer


def hf_state_from(model: Transformer) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face Llama/Qwen3 names."""
    ours, cfg = model.state_dict(), model.cfg
    mapping = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
               "lm_head.weight": "output.weight"}
    for i in range(cfg.n_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mapping[f"model.layers.{i}.self_attn.{proj}.weight"] = f"layers.{i}.attention.{proj}.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            mapping[f"model.layers.{i}.mlp.{proj}.weight"] = f"layers.{i}.feed_forward.{proj}.weight"
        mapping[f"model.layers.{i}.input_layernorm.weight"] = f"layers.{i}.attention_norms.input.weight"
        mapping[f"model.layers.{i}.post_attention_layernorm.weight"] = f"layers.{i}.ffn_norms.input.weight"
        if cfg.qk_norm:
            mapping[f"model.layers.{i}.self_attn.q_norm.weight"] = f"layers.{i}.attention.q_norm.weight"
            mapping[f"model.layers.{i}.self_attn.k_norm.weight"] = f"layers.{i}.attention.k_norm.weight"
    return {hf_name: ours[name] for hf_name, name in mapping.items()}


def hf_model_like(model: Transformer) -> torch.nn.Module:
    cfg = model.cfg
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
                  rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
                  tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, hidden_act="silu")
    if cfg.qk_norm:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=cfg.head_dim, **common))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(mlp_bias=False, **common))
    state = hf_state_from(model)
    expected = {k for k in hf.state_dict() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
        expected.discard("lm_head.weight")
    assert set(state) == expected
    hf.load_state_dict(state, strict=False)
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf.eval()


@pytest.mark.parametrize("n_kv_heads,qk_norm,tied", [(4, False, False), (2, False, False), (1, False, False),
                                                      (2, False, True), (2, True, False)])
def test_logits_match_hugging_face(n_kv_heads, qk_norm, tied):
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=101, ffn_hidden_dim=96,
                      max_seq_len=64, placement="pre", norm="rmsnorm", rope_theta=500000.0, qk_norm=qk_norm,
                      tie_embeddings=tied, init_std=0.1)  # larger weights than the default so logits are O(1)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():  # non-unit norm weights so each norm's placement matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf = hf_model_like(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert theirs.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() < 1e-5
