"""Placement ngpt against nGPT's formulas (Loshchilov et al., 2024), written here independently in float64: the
forward and its gradients, the eigen learning rates' scaled parametrization, and the post-step renormalization the
trainer applies after every optimizer step (with its weights kept out of weight decay). Parallel parity, resume and
Hugging Face export are folded into the parametrized tests of test_tensor_parallel, test_pipeline, test_zero and
test_convert."""

from __future__ import annotations

import math

import pytest
import torch

from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer
from normtron.trainer.config import TrainingConfig
from normtron.trainer.engine import renormalize_then
from normtron.trainer.optim import build_optimizer


# the reference formulas are float64: so is every tensor the tests create (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("float64")


def make_cfg(**kw) -> ModelConfig:
    base = dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_hidden_dim=48, max_seq_len=16,
                placement="ngpt")
    return ModelConfig(**{**base, **kw})


def unit(x, dim=-1):
    return x / x.norm(dim=dim, keepdim=True)


def rope_angles(seq, d, theta):
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    return torch.arange(seq, dtype=torch.float64)[:, None] * freqs[None]


def rotate(x, theta):
    """RoPE, rotate-half layout: x (batch, seq, heads, d)."""
    d = x.shape[-1]
    angles = rope_angles(x.shape[1], d, theta)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[None, :, None], torch.cat([angles.sin()] * 2, -1)[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """nGPT from the paper's equations, on the model's parameter tensors (not its code)."""
    cfg, P = model.cfg, dict(model.named_parameters())
    d, dk, H, KV = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.kv_heads
    batch, seq = tokens.shape
    h = P["tok_embeddings.weight"][tokens]  # embeddings are unit rows: h starts on the sphere
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in range(cfg.n_layers):
        p = lambda name: P[f"layers.{i}.{name}"]  # noqa: E731
        # Sec. 2.3.2: q, k normalized per head and scaled by s_qk (stored at 1/sqrt(d), value = stored * sqrt(d));
        # softmax(q.k * sqrt(dk))
        q = rotate((h @ p("attention.q_proj.weight").T).view(batch, seq, H, dk), cfg.rope_theta)
        k = rotate((h @ p("attention.k_proj.weight").T).view(batch, seq, KV, dk), cfg.rope_theta)
        v = (h @ p("attention.v_proj.weight").T).view(batch, seq, KV, dk)
        k, v = k.repeat_interleave(H // KV, 2), v.repeat_interleave(H // KV, 2)
        s_qk = (p("attention.qk_scale.weight") * math.sqrt(d)).view(H, dk)
        q, k = unit(q) * s_qk, unit(k) * s_qk
        scores = torch.einsum("bshd,bthd->bhst", q, k) * math.sqrt(dk)
        attn = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        h_a = torch.einsum("bhst,bthd->bshd", attn, v).reshape(batch, seq, H * dk) @ p("attention.o_proj.weight").T
        # Sec. 2.2.2: h <- Norm(h + alpha_A (Norm(h_A) - h)), alpha = |stored| * 0.05 / (1/sqrt(d))
        alpha_a = p("attention_norms.eigen_lr.weight").abs() * 0.05 * math.sqrt(d)
        h = unit(h + alpha_a * (unit(h_a) - h))
        # Sec. 2.4.2: u = h W_u s_u, nu = h W_nu s_nu sqrt(d) (s_u, s_nu stored at scale 1, init 1); SwiGLU
        u = (h @ p("feed_forward.up_proj.weight").T) * p("feed_forward.up_scale.weight")
        nu = (h @ p("feed_forward.gate_proj.weight").T) * p("feed_forward.gate_scale.weight") * math.sqrt(d)
        h_m = (u * nu * torch.sigmoid(nu)) @ p("feed_forward.down_proj.weight").T
        alpha_m = p("ffn_norms.eigen_lr.weight").abs() * 0.05 * math.sqrt(d)
        h = unit(h + alpha_m * (unit(h_m) - h))
    # Sec. 2.1: no final norm; z = E_output h * s_z, s_z stored at 1/sqrt(d) with init 1
    head = model.output.weight  # the embedding itself when tied
    return (h @ head.T) * (P["logit_scale.weight"] * math.sqrt(d))


def random_ngpt(cfg: ModelConfig) -> Transformer:
    """An initialized nGPT with every scaling vector moved off its init value (signs of alpha included)."""
    model = Transformer(cfg)
    model.init_weights(seed=1)
    angles = rope_angles(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)  # the model keeps its table in fp32
    model.rope = torch.cat([angles.cos(), angles.sin()], dim=-1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.mul_(1 + 0.5 * torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("n_kv_heads,tied", [(2, False), (4, True)])
def test_forward_and_gradients_match_the_paper(n_kv_heads, tied):
    model = random_ngpt(make_cfg(n_kv_heads=n_kv_heads, tie_embeddings=tied))
    tokens = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(3))
    ours, want = model(tokens), reference_logits(model, tokens)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(4))
    params = [p for p in model.parameters()]
    got_grads = torch.autograd.grad((ours * weights).sum(), params)
    want_grads = torch.autograd.grad((want * weights).sum(), params)
    for (name, _), got, expected in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=name)
        assert expected.abs().max() > 0, name  # every parameter takes part


def test_no_norm_layers_and_every_hidden_state_on_the_sphere():
    model = random_ngpt(make_cfg())
    assert not [name for name, _ in model.named_parameters() if "norm" in name and "eigen_lr" not in name]
    outputs = []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for block in model.layers.values()]
    model(torch.randint(0, 50, (2, 9)))
    for hook in hooks:
        hook.remove()
    assert len(outputs) == 3
    for h in outputs:
        torch.testing.assert_close(h.norm(dim=-1), torch.ones(h.shape[:-1]), rtol=0, atol=1e-12)


# The paper's normalization axis (d_model) of every matrix, as nn.Linear (out, in) / nn.Embedding (vocab, d) dims.
PAPER_DIMS = {"tok_embeddings": 1, "output": 1, "q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 0,
              "gate_proj": 1, "up_proj": 1, "down_proj": 0}


def test_initial_weights_are_unit_along_d_model():
    model = Transformer(make_cfg(dim=48, n_heads=4))  # q_proj and o_proj square: the axis matters
    model.init_weights(seed=0)
    checked = 0
    for name, param in model.named_parameters():
        if param.ndim == 2:
            dim = PAPER_DIMS[name.split(".")[-2]]
            torch.testing.assert_close(param.norm(dim=dim), torch.ones(param.shape[1 - dim]), msg=name)
            checked += 1
    assert checked == 2 + 3 * 7


def test_optimizer_step_then_renormalization_puts_weights_back_on_the_sphere():
    """What the trainer does after each step: AdamW (no weight decay on nGPT's matrices, even with
    training.weight_decay set), then every matrix w <- w / ||w|| along d_model; the scaling vectors are left as
    the optimizer made them."""
    model = random_ngpt(make_cfg())
    optimizer = build_optimizer(model, TrainingConfig(lr=0.05, weight_decay=0.1))
    decayed = [p for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]]
    assert decayed == []
    model(torch.randint(0, 50, (2, 9))).logsumexp(-1).sum().backward()
    optimizer.step()
    stepped = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert any((stepped[n].norm(dim=PAPER_DIMS[n.split(".")[-2]]) - 1).abs().max() > 1e-3
               for n in stepped if stepped[n].ndim == 2)  # the step left the sphere
    renormalize_then(None, model)
    for name, param in model.named_parameters():
        w = stepped[name]
        want = w / w.norm(dim=PAPER_DIMS[name.split(".")[-2]], keepdim=True) if w.ndim == 2 else w
        torch.testing.assert_close(param, want, rtol=1e-12, atol=1e-14, msg=name)


def test_eigen_learning_rates_are_scaled_parameters():
    """alpha = |stored| * alpha_init / alpha_scale, stored initialized to alpha_scale = 1/sqrt(d): alpha starts at
    0.05, and one Adam step of lr eta (a step of ~eta per element on the stored value) moves alpha by
    eta * 0.05 * sqrt(d): the scale sets alpha's effective learning rate (Sec. 2.5)."""
    cfg = make_cfg(dim=64)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    eigen = {name: p for name, p in model.named_parameters() if name.endswith("eigen_lr.weight")}
    assert len(eigen) == 2 * cfg.n_layers
    for module_name in ("layers.0.attention_norms.eigen_lr", "layers.2.ffn_norms.eigen_lr"):
        module = model.get_submodule(module_name)
        torch.testing.assert_close(module.weight, torch.full((64,), 1 / 8))
        torch.testing.assert_close(module.value(), torch.full((64,), 0.05))
    torch.testing.assert_close(model.layers["1"].attention.qk_scale.value(), torch.ones(64))  # s_qk init 1
    torch.testing.assert_close(model.logit_scale.weight, torch.full((50,), 1 / 8))  # s_z scale 1/sqrt(d)
    before = {name: model.get_submodule(name.removesuffix(".weight")).value().clone() for name in eigen}
    optimizer = torch.optim.Adam(eigen.values(), lr=1e-3, eps=1e-30)
    model(torch.randint(0, 50, (2, 9))).logsumexp(-1).sum().backward()
    optimizer.step()
    for name in eigen:
        moved = (model.get_submodule(name.removesuffix(".weight")).value() - before[name]).abs()
        torch.testing.assert_close(moved, torch.full((64,), 1e-3 * 0.05 * 8), rtol=1e-9, atol=0)
