"""Sub-LN and NormFormer (norms inside the sublayers, head gains, learned residual gain): the whole model's logits and
every parameter's gradient against the formulas written here from scratch in float64 (attention and SwiGLU
included, since the placements change their insides), and Sub-LN's init against sqrt(log 2N)."""

from __future__ import annotations

import math

import pytest
import torch

from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer
from normtron.models.transformer import rope_table


# the reference formulas are float64: so is every tensor the tests create (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("float64")


def norm(x, module, cfg):
    """RMSNorm or LayerNorm over the last dim with the module's weight (and bias)."""
    if cfg.norm == "rmsnorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * module.weight
    mu = x.mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + cfg.norm_eps) * module.weight
    return y + module.bias if getattr(module, "bias", None) is not None else y


def rotate(x, table):
    """RoPE in the rotate-half layout: x (batch, seq, heads, d), table (seq, d) = [cos | sin] of half width."""
    half = x.shape[-1] // 2
    cos, sin = table[:, :half].repeat(1, 2)[None, :, None], table[:, half:].repeat(1, 2)[None, :, None]
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def attention(att, h, table, cfg, head_gain: bool, inner: bool):
    """Causal GQA softmax attention; NormFormer's g_i * head_i; Sub-LN's norm on the concatenated heads; W_o."""
    b, s, _ = h.shape
    d, n = cfg.head_dim, cfg.n_heads
    q = (h @ att.q_proj.weight.T).view(b, s, n, d)
    k = (h @ att.k_proj.weight.T).view(b, s, cfg.kv_heads, d)
    v = (h @ att.v_proj.weight.T).view(b, s, cfg.kv_heads, d)
    if cfg.qk_norm:
        q, k = norm(q, att.q_norm, cfg), norm(k, att.k_norm, cfg)
    q, k = rotate(q, table), rotate(k, table)
    group = n // cfg.kv_heads
    k, v = k[:, :, [i // group for i in range(n)]], v[:, :, [i // group for i in range(n)]]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    heads = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    if head_gain:
        heads = heads * att.head_scale.weight[:, None]
    out = heads.reshape(b, s, n * d)
    if inner:
        out = norm(out, att.inner_norm, cfg)
    return out @ att.o_proj.weight.T


def mlp(ff, h, cfg, inner: bool):
    a = h @ ff.gate_proj.weight.T
    act = a * torch.sigmoid(a) * (h @ ff.up_proj.weight.T)
    if inner:
        act = norm(act, ff.inner_norm, cfg)
    return act @ ff.down_proj.weight.T


def block(blk, x, table, cfg, placement):
    a, f = blk.attention_norms, blk.ffn_norms
    if placement == "subln":  # x + W_o LN(Attn(LN(x))),  x + W_2 LN(act(W_1 LN(x)))   (Magneto, Sec. 2.1)
        x = x + attention(blk.attention, norm(x, a.input, cfg), table, cfg, head_gain=False, inner=True)
        return x + mlp(blk.feed_forward, norm(x, f.input, cfg), cfg, inner=True)
    if placement == "normformer":  # x + LN(W_o [g_i head_i](LN(x))),  l*x + W_2 LN(act(W_1 LN(x)))   (NormFormer)
        x = x + norm(attention(blk.attention, norm(x, a.input, cfg), table, cfg, head_gain=True, inner=False),
                     a.output, cfg)
        skip = x * f.residual_gain.weight if cfg.normformer_residual_scale else x
        return skip + mlp(blk.feed_forward, norm(x, f.input, cfg), cfg, inner=True)
    if placement == "pre":
        x = x + attention(blk.attention, norm(x, a.input, cfg), table, cfg, head_gain=False, inner=False)
        return x + mlp(blk.feed_forward, norm(x, f.input, cfg), cfg, inner=False)
    if placement == "post":
        x = norm(x + attention(blk.attention, x, table, cfg, head_gain=False, inner=False), a.post, cfg)
        return norm(x + mlp(blk.feed_forward, x, cfg, inner=False), f.post, cfg)
    raise AssertionError(placement)


def reference_logits(model, tokens, placements):
    cfg = model.cfg
    table = rope_table(cfg.head_dim, tokens.shape[1], cfg.rope_theta).double()
    h = model.tok_embeddings.weight[tokens]
    for blk, placement in zip(model.layers.values(), placements):
        h = block(blk, h, table, cfg, placement)
    return norm(h, model.norm, cfg) @ model.output.weight.T


def random_model(**overrides) -> Transformer:
    cfg = ModelConfig(**{**dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_hidden_dim=48,
                                max_seq_len=16, init_std=0.2), **overrides})
    model = Transformer(cfg)
    model.init_weights(seed=1)
    with torch.no_grad():  # non-trivial norm weights/biases, head gains and residual gains
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(0.3 * torch.randn_like(p) + (0.0 if name.endswith("bias") else 1.0))
    return model


CASES = {
    "subln-rmsnorm": (dict(placement="subln"), ["subln"] * 3),
    "subln-layernorm-qknorm": (dict(placement="subln", norm="layernorm", qk_norm=True), ["subln"] * 3),
    "normformer-rmsnorm": (dict(placement="normformer"), ["normformer"] * 3),
    "normformer-layernorm-residual": (dict(placement="normformer", norm="layernorm", normformer_residual_scale=True),
                                      ["normformer"] * 3),
    "layers-subln-normformer-post": (dict(layer_placements=["subln", "normformer", "post"]),
                                     ["subln", "normformer", "post"]),
    "layers-pre-subln-normformer": (dict(layer_placements=["pre", "subln", "normformer"], norm="layernorm",
                                         normformer_residual_scale=True), ["pre", "subln", "normformer"]),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_and_gradients_match_the_formulas(case):
    overrides, placements = CASES[case]
    model = random_model(**overrides)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    got = model(tokens)
    want = reference_logits(model, tokens, placements)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert want.abs().max() > 0.5  # the logits are not vanishingly small
    probe = torch.randn_like(want)  # a random linear functional of the logits, so every gradient is exercised
    got_grads = torch.autograd.grad((got * probe).sum(), list(params.values()))
    want_grads = torch.autograd.grad((want * probe).sum(), list(params.values()))
    for name, g, w in zip(params, got_grads, want_grads):
        assert w.abs().max() > 0, name  # every parameter (inner norms, gains included) takes part
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=name)


def test_wiring_adds_exactly_the_papers_parameters():
    cfg = dict(dim=32, n_layers=2, n_heads=4, vocab_size=50, ffn_hidden_dim=48)
    names = {p: {n for n, _ in Transformer(ModelConfig(placement=p, **cfg)).named_parameters() if ".0." in n}
             for p in ("pre", "subln", "normformer")}
    assert names["subln"] - names["pre"] == {"layers.0.attention.inner_norm.weight",
                                             "layers.0.feed_forward.inner_norm.weight"}
    assert names["normformer"] - names["pre"] == {"layers.0.attention.head_scale.weight",
                                                  "layers.0.attention_norms.output.weight",
                                                  "layers.0.feed_forward.inner_norm.weight"}
    model = Transformer(ModelConfig(placement="normformer", normformer_residual_scale=True, **cfg))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["layers.1.attention.head_scale.weight"] == (4,)
    assert shapes["layers.1.feed_forward.inner_norm.weight"] == (48,)
    assert shapes["layers.1.ffn_norms.residual_gain.weight"] == (32,)
    assert "layers.1.attention_norms.residual_gain.weight" not in shapes  # the MLP branch only (fairseq w_resid)
    model.init_weights(seed=0)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "scale" in n or "gain" in n)


@pytest.mark.parametrize("n_layers", [2, 12, 48])
def test_subln_init_scales_value_output_and_mlp_weights_by_sqrt_log_2n(n_layers):
    """Weights are seeded by name: a Sub-LN weight is the Pre-LN draw times gamma = sqrt(ln 2N) (Magneto Sec. 2.2),
    for o/down divided by Pre-LN's depth scale 1/sqrt(2N), which Sub-LN's gamma replaces; Q/K/embeddings as is."""
    cfg = dict(dim=32, n_layers=n_layers, n_heads=4, vocab_size=50, ffn_hidden_dim=48)
    pre, sub = Transformer(ModelConfig(placement="pre", **cfg)), Transformer(ModelConfig(placement="subln", **cfg))
    pre.init_weights(seed=5)
    sub.init_weights(seed=5)
    gamma, depth_scale = math.sqrt(math.log(2 * n_layers)), 1 / math.sqrt(2 * n_layers)
    sub_params = dict(sub.named_parameters())
    for name, w_pre in pre.named_parameters():
        leaf = name.split(".")[-2]
        factor = {"v_proj": gamma, "gate_proj": gamma, "up_proj": gamma, "o_proj": gamma / depth_scale,
                  "down_proj": gamma / depth_scale}.get(leaf, 1.0)
        torch.testing.assert_close(sub_params[name], w_pre * factor, rtol=1e-12, atol=0, msg=name)


def test_diagnostics_count_inner_norms_and_head_gains_in_their_sublayer():
    """attn_grad_norm covers the attention's inner norm and head gains, mlp_grad_norm the MLP's inner norm (each
    recomputed here from the gradients), and those gradients are not zero."""
    import torch.nn.functional as F

    from normtron.trainer.diagnostics import Diagnostics

    model = random_model(layer_placements=["subln", "normformer", "pre"])
    diagnostics = Diagnostics(model, every=1, total_steps=1, device=torch.device("cpu"), gradients=True)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with diagnostics.probe():
        logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    diagnostics.before_step()
    row = diagnostics.after_step()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    for name in ("layers.0.attention.inner_norm.weight", "layers.0.feed_forward.inner_norm.weight",
                 "layers.1.attention.head_scale.weight", "layers.1.feed_forward.inner_norm.weight"):
        assert grads[name].abs().max() > 0, name
    for i in range(3):
        for key, prefix in (("attn_grad_norm", "attention."), ("mlp_grad_norm", "feed_forward.")):
            group = [g for n, g in grads.items() if n.startswith(f"layers.{i}.{prefix}")]
            want = math.sqrt(sum(float(g.pow(2).sum()) for g in group))
            assert row[key][i] == pytest.approx(want, rel=1e-5), (key, i)


def test_fp8_linears_around_the_inner_norms():
    """Under FP8 every projection around the inner norms (v/o, gate/up/down) computes with torch._scaled_mm while the
    norms and head gains stay in high precision with fp32 gradients; the logits stay within FP8's few percent of the
    fp32 model's (e4m3: 3 mantissa bits)."""
    from normtron.parallel.float8 import apply_float8
    from normtron.trainer.engine import materialize

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_hidden_dim=128, max_seq_len=32, vocab_size=256,
                      layer_placements=["subln", "normformer"], normformer_residual_scale=True, init_std=0.05)
    torch.set_default_dtype(torch.float32)
    with torch.device("meta"):
        exact, fp8 = Transformer(cfg), Transformer(cfg)
    converted = apply_float8(fp8, "tensorwise", emulate=False, fsdp_float8_all_gather=False)
    for model in (exact, fp8):
        materialize(model, torch.device("cpu"), seed=0)
    assert len(converted) == 2 * 7  # q/k/v/o and gate/up/down of both layers
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = fp8(tokens)
        logits.float().pow(2).mean().backward()
    assert sum(e.name == "aten::_scaled_mm" for e in profile.events()) == 3 * len(converted)
    for name, p in fp8.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and bool(p.grad.isfinite().all()), name
        if "inner_norm" in name or "head_scale" in name or "residual_gain" in name:
            assert p.grad.abs().max() > 0, name
    with torch.no_grad():
        want = exact(tokens)
    error = ((logits.float() - want).norm() / want.norm()).item()
    assert 1e-3 < error < 0.1, error  # FP8 rounding shows, but stays small


def test_residual_scale_without_a_normformer_layer_is_a_one_line_error(tmp_path, capsys):
    from helpers import TINY

    from normtron.trainer.cli import main

    args = ["train", TINY, f"run.output_dir={tmp_path}", "model.normformer_residual_scale=true"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("normtron: error: ") and err.count("\n") == 1 and "needs a normformer layer" in err, err
    assert not list(tmp_path.iterdir())  # nothing written
