"""Each norm placement's block output equals the placement's formula, written here independently in float64."""

from __future__ import annotations

import math

import pytest
import torch

from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer
from normtron.models.placement import layer_wiring
from normtron.models.placement import num_mix_post_layers
from normtron.models.transformer import rope_table


# the reference formulas are float64: so is every tensor the tests create (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("float64")


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def layer_norm(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * weight
    return y + bias if bias is not None else y


def dyt(x, alpha, weight, bias):  # Zhu et al. 2025, Eq. 1
    y = torch.tanh(alpha * x) * weight
    return y + bias if bias is not None else y


def reference_norm(module, x, cfg):
    if cfg.norm == "dyt":
        return dyt(x, module.alpha, module.weight, module.bias)
    if cfg.norm == "rmsnorm":
        return rms_norm(x, module.weight, cfg.norm_eps)
    return layer_norm(x, module.weight, getattr(module, "bias", None), cfg.norm_eps)


def reference_block(block, x, rope, cfg, placement, layer=0):
    """The placement's formula with the block's own attention/MLP as F (F itself is checked against HF Llama);
    `layer` is the 0-based index of the block (LNS depends on it)."""
    def N(which, h):
        return reference_norm(which, h, cfg)

    def attn(h):
        return block.attention(h, rope)

    mlp = block.feed_forward
    a, f = block.attention_norms, block.ffn_norms
    if placement == "pre":      # x + F(N(x))
        x = x + attn(N(a.input, x))
        return x + mlp(N(f.input, x))
    if placement == "deepnorm":  # LN(alpha*x + F(x)), alpha = (2N)^(1/4)
        alpha = (2 * cfg.n_layers) ** 0.25
        x = N(a.post, alpha * x + attn(x))
        return N(f.post, alpha * x + mlp(x))
    if placement == "lns":      # x + F(N(x) / sqrt(l)), l = layer + 1
        s = 1 / math.sqrt(layer + 1)
        x = x + attn(s * N(a.input, x))
        return x + mlp(s * N(f.input, x))
    if placement == "reordered":  # x + N(F(x))
        x = x + N(a.output, attn(x))
        return x + N(f.output, mlp(x))
    if placement == "post":     # N(x + F(x))
        x = N(a.post, x + attn(x))
        return N(f.post, x + mlp(x))
    if placement == "peri":     # x + N_out(F(N_in(x)))
        x = x + N(a.output, attn(N(a.input, x)))
        return x + N(f.output, mlp(N(f.input, x)))
    raise AssertionError(placement)


def random_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial norm weights and biases, so their application is tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    return model


def make_cfg(**kw) -> ModelConfig:
    base = dict(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_hidden_dim=48, max_seq_len=16)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "dyt"])
@pytest.mark.parametrize("placement", ["pre", "post", "peri", "deepnorm", "lns", "reordered"])
def test_block_matches_formula(placement, norm):
    cfg = make_cfg(placement=placement, norm=norm)
    model = random_model(cfg)
    x = torch.randn(2, 7, cfg.dim) * 3.0
    rope = rope_table(cfg.head_dim, 7, cfg.rope_theta).double()
    for i, block in enumerate(model.layers.values()):
        got = block(x, rope)
        want = reference_block(block, x, rope, cfg, placement, layer=i)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


CUSTOM = ["post", "peri", "pre", "post"]


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "dyt"])
@pytest.mark.parametrize("placement,alpha", [("pre", 0), ("post", 0), ("peri", 0), ("mix", 0.25), ("mix", 0.5),
                                             ("custom", 0), ("deepnorm", 0), ("lns", 0), ("reordered", 0)])
def test_whole_model_matches_formula(placement, alpha, norm):
    """Embedding (x sqrt(dim) for DyT) (+ optional embed norm) -> per-layer formula -> final norm -> head, all from the formulas."""
    cfg = make_cfg(placement="pre" if placement == "custom" else placement, norm=norm, mix_alpha=alpha or 0.25,
                   n_layers=4, embed_norm=placement == "peri", qk_norm=True,
                   layer_placements=CUSTOM if placement == "custom" else None)
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    rope = rope_table(cfg.head_dim, 9, cfg.rope_theta).double()
    h = model.tok_embeddings.weight[tokens]
    if cfg.norm == "dyt":  # DyT's LLaMA recipe: a learnable scalar after the embedding, initialized to sqrt(dim)
        h = h * math.sqrt(cfg.dim)
    if cfg.embed_norm:
        h = reference_norm(model.embed_norm, h, cfg)
    n_post = num_mix_post_layers(cfg.n_layers, cfg.mix_alpha) if placement == "mix" else 0
    for i, block in enumerate(model.layers.values()):
        layer_placement = {"mix": "post" if i < n_post else "pre", "custom": CUSTOM[i]}.get(placement, placement)
        h = reference_block(block, h, rope, cfg, layer_placement, layer=i)
    logits = reference_norm(model.norm, h, cfg) @ model.output.weight.T
    torch.testing.assert_close(model(tokens), logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_layers,alpha", [(4, 0.25), (12, 0.25), (32, 0.25), (10, 0.3), (100, 0.29), (7, 0.5),
                                            (5, 0.0), (5, 1.0)])
def test_mix_puts_floor_alpha_L_post_layers_first(n_layers, alpha):
    cfg = make_cfg(placement="mix", n_layers=n_layers, mix_alpha=alpha)
    expected_post = math.floor(round(alpha * n_layers, 6))  # 0.29 * 100 is 28.999999999999996 in binary
    wirings = [layer_wiring(cfg, i) for i in range(n_layers)]
    assert [w.post_norm for w in wirings] == [True] * expected_post + [False] * (n_layers - expected_post)
    assert [w.input_norm for w in wirings] == [False] * expected_post + [True] * (n_layers - expected_post)
    model = Transformer(cfg) if n_layers <= 12 else None
    if model is not None:  # the built blocks carry exactly those norms
        for i, block in enumerate(model.layers.values()):
            has_post = not isinstance(block.attention_norms.post, torch.nn.Identity)
            assert has_post == (i < expected_post)


def test_qk_norm_normalizes_each_head():
    cfg = make_cfg(qk_norm=True, norm="rmsnorm")
    model = random_model(cfg)
    attention = model.layers["0"].attention
    x = torch.randn(1, 5, cfg.dim)
    q = attention.q_proj(x).view(1, 5, cfg.n_heads, cfg.head_dim)
    want = rms_norm(q, attention.q_norm.weight, cfg.norm_eps)
    torch.testing.assert_close(attention.q_norm(q), want)
    assert attention.q_norm.weight.shape == (cfg.head_dim,)


def test_layernorm_without_bias_has_no_bias_parameter():
    model = Transformer(make_cfg(norm="layernorm", norm_bias=False))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_residual_scale_multiplies_the_skip_path():
    """A wiring's residual_scale a gives N(a*x + F(x)) (the hook DeepNorm-style placements use)."""
    from normtron.models.placement import NormWiring
    from normtron.models.transformer import SublayerNorms

    cfg = make_cfg(norm="layernorm")
    norms = SublayerNorms(NormWiring(post_norm=True, residual_scale=2.5), cfg)
    with torch.no_grad():
        norms.post.weight.uniform_(0.5, 1.5)
        norms.post.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, cfg.dim)
    f = torch.nn.Linear(cfg.dim, cfg.dim)
    want = layer_norm(2.5 * x + f(x), norms.post.weight, norms.post.bias, cfg.norm_eps)
    torch.testing.assert_close(norms(x, f), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_layers", [2, 6, 32])
def test_deepnorm_init_scales_value_output_and_mlp_weights_by_beta(n_layers):
    """Weights are seeded by name, so a DeepNorm weight is the Pre-LN model's draw times beta = (8N)^(-1/4)
    (divided by the depth scale 1/sqrt(2N) that Pre-LN's output projections carry); Q/K and embeddings are as is."""
    pre, deep = (Transformer(make_cfg(placement=p, n_layers=n_layers)) for p in ("pre", "deepnorm"))
    pre.init_weights(seed=3)
    deep.init_weights(seed=3)
    beta, depth_scale = (8 * n_layers) ** -0.25, 1 / math.sqrt(2 * n_layers)
    for (name, w_pre), (_, w_deep) in zip(pre.named_parameters(), deep.named_parameters()):
        leaf = name.split(".")[-2]
        factor = {"v_proj": beta, "gate_proj": beta, "up_proj": beta, "o_proj": beta / depth_scale,
                  "down_proj": beta / depth_scale}.get(leaf, 1.0)
        torch.testing.assert_close(w_deep, w_pre * factor, rtol=1e-12, atol=0, msg=name)


def test_deepnorm_and_lns_constants():
    cfg = make_cfg(placement="deepnorm", n_layers=12)
    wiring = layer_wiring(cfg, 5)
    assert wiring.post_norm and not wiring.input_norm
    assert wiring.residual_scale == pytest.approx(24 ** 0.25) and wiring.init_gain == pytest.approx(96 ** -0.25)
    lns = [layer_wiring(make_cfg(placement="lns", n_layers=12), i) for i in range(12)]
    assert [w.input_scale for w in lns] == pytest.approx([1 / math.sqrt(i) for i in range(1, 13)])
    reordered = layer_wiring(make_cfg(placement="reordered"), 0)
    assert reordered.output_norm and not (reordered.input_norm or reordered.post_norm)
