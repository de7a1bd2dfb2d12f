"""`pre` + RMSNorm + SwiGLU + RoPE + GQA is Llama: same logits as transformers.LlamaForCausalLM with our weights."""

from __future__ import annotations

import pytest
import torch
import transformers  # a dev extra: bash launch/test.sh installs it

from models import ModelConfig, Transformer


def hf_llama_with_weights_of(model: Transformer) -> "transformers.LlamaForCausalLM":
    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = model.state_dict()
    mapping = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
               "lm_head.weight": "output.weight"}
    for i in range(cfg.n_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mapping[f"model.layers.{i}.self_attn.{proj}.weight"] = f"layers.{i}.attention.{proj}.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            mapping[f"model.layers.{i}.mlp.{proj}.weight"] = f"layers.{i}.feed_forward.{proj}.weight"
        mapping[f"model.layers.{i}.input_layernorm.weight"] = f"layers.{i}.attention_norms.input.weight"
        mapping[f"model.layers.{i}.post_attention_layernorm.weight"] = f"layers.{i}.ffn_norms.input.weight"
    hf_state = hf.state_dict()
    assert set(mapping) == {k for k in hf_state if not k.endswith("rotary_emb.inv_freq")}
    hf.load_state_dict({k: ours[v] for k, v in mapping.items()}, strict=False)
    return hf


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_pre_rmsnorm_matches_hf_llama(n_kv_heads):
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=101, ffn_hidden_dim=96,
                      max_seq_len=64, placement="pre", norm="rmsnorm", rope_theta=500000.0,
                      init_std=0.1)  # larger weights than the default so logits are O(1), not O(0.01)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    with torch.no_grad():  # non-unit norm weights so their placement matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf = hf_llama_with_weights_of(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-5
