"""DyT (Zhu et al. 2025, "Transformers without Normalization"): the fused Triton kernels (Triton's interpreter on CPU)
against float64 math and finite differences, the module against its formula, and the paper's LLaMA initialization.

Placement formulas with DyT are in test_placements.py; parallel parity in test_zero / test_tensor_parallel /
test_pipeline; Hugging Face export in test_convert.py.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel is defined, i.e. on the import below

import pytest
import torch
from helpers import rel_err

from normtron.kernels.triton_dyt import add_dyt, dyt
from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer
from normtron.models.norms import DyT


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative 2-norm error, as in test_kernels.py


def reference(x, residual, alpha, weight, bias):
    """(weight * tanh(alpha * h) + bias, h) with h = x + residual, in float64."""
    h = x.double() + (residual.double() if residual is not None else 0)
    y = torch.tanh(alpha.double() * h) * weight.double()
    return (y + bias.double() if bias is not None else y), h


def check_against_float64(shape, dtype, with_residual, bias=True, residual_dtype=None, weight_dtype=None,
                          max_block=None, alpha=0.7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]

    def rand(*size, dtype, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale + shift).to(dtype).requires_grad_()

    x = rand(*shape, dtype=dtype, scale=2.0, shift=0.3)
    residual = rand(*shape, dtype=residual_dtype or dtype) if with_residual else None
    a = torch.tensor([alpha], dtype=weight_dtype or dtype).requires_grad_()
    weight = rand(n, dtype=weight_dtype or dtype, scale=0.5, shift=1.0)
    b = rand(n, dtype=weight_dtype or dtype, scale=0.3) if bias else None
    leaves = [t for t in (x, residual, a, weight, b) if t is not None]
    if residual is None:
        outputs = [dyt(x, a, weight, b, max_block=max_block)]
    else:
        outputs = list(add_dyt(x, residual, a, weight, b, max_block=max_block))
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outputs]
    grads = torch.autograd.grad(outputs, leaves, upstream)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, rest = leaves64[0], leaves64[1:]
    r64 = rest.pop(0) if residual is not None else None
    y64, h64 = reference(x64, r64, rest[0], rest[1], rest[2] if bias else None)
    want_outputs = [y64] if residual is None else [y64, h64]
    want_grads = torch.autograd.grad(want_outputs, leaves64, [u.double() for u in upstream])

    assert all(g.dtype == leaf.dtype and g.shape == leaf.shape for g, leaf in zip(grads, leaves))
    names = ["y", "new_residual"][:len(outputs)] + ["dx", "dresidual", "dalpha", "dweight", "dbias"]
    names = [k for k in names if not (k == "dresidual" and residual is None) and not (k == "dbias" and not bias)]
    tol = TOLERANCE[dtype]
    for name, got, want in zip(names, [*outputs, *grads], [*want_outputs, *want_grads]):
        err = rel_err(got, want)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# (shape, max_block): one row; short rows several per tile with a partly filled last tile; an odd size; rows wider
# than one tile (max_block 128: three column tiles, the last partial).
SHAPES = [((1, 64), None), ((130, 48), None), ((5, 1000), None), ((2, 3, 300), 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["dyt", "add_dyt"])
@pytest.mark.parametrize("shape,max_block", SHAPES, ids=[f"{s}-{b}" for s, b in SHAPES])
def test_kernel_matches_float64(poisoned, shape, max_block, dtype, with_residual):
    check_against_float64(shape, dtype, with_residual, max_block=max_block, seed=hash((shape, with_residual)) % 2**31)


@pytest.mark.parametrize("case", ["no_bias", "autocast", "saturated"])
def test_kernel_variants(poisoned, case):
    """Without bias (the paper's LLaMA DyT); bf16 activations with fp32 weights and an fp32 residual stream (as under
    autocast); a large alpha that saturates most of the tanh."""
    if case == "no_bias":
        check_against_float64((6, 200), torch.float32, True, bias=False)
    elif case == "autocast":
        check_against_float64((4, 700), torch.bfloat16, True, residual_dtype=torch.float32,
                              weight_dtype=torch.float32)
    else:
        check_against_float64((4, 300), torch.float32, True, alpha=40.0)


def test_gradcheck_float64():
    """Finite differences in float64 (the kernel computes in float64 for float64 inputs), one and several tiles."""
    gen = torch.Generator().manual_seed(1)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, r, w, b = leaf(3, 5), leaf(3, 5), leaf(5), leaf(5)
    a = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r, a, w, b: add_dyt(x, r, a, w, b, max_block=2), (x, r, a, w, b))
    assert torch.autograd.gradcheck(lambda x, a, w: dyt(x, a, w, None), (x, a, w))


def test_gradients_are_deterministic():
    """dalpha/dweight/dbias come from per-program partial sums and one reduction, no atomics: the same bits."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(37, 96, generator=gen, dtype=torch.bfloat16)
    a = torch.tensor([0.5]).requires_grad_()
    w, b = torch.randn(96, generator=gen).requires_grad_(), torch.randn(96, generator=gen).requires_grad_()
    dy = torch.randn(37, 96, generator=gen, dtype=torch.bfloat16)
    runs = [torch.autograd.grad(dyt(x, a, w, b), (a, w, b), dy) for _ in range(3)]
    for run in runs[1:]:
        assert all(torch.equal(got, want) for got, want in zip(run, runs[0]))


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_module_matches_formula(kernels):
    """The DyT module (PyTorch ops or the kernels) and its fused residual add against Eq. 1 in float64."""
    gen = torch.Generator().manual_seed(3)
    norm = DyT(24, alpha_init=0.3, bias=True, kernels=kernels)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=gen))
        norm.bias.copy_(torch.randn(24, generator=gen))
    x, r = torch.randn(2, 5, 24, generator=gen), torch.randn(2, 5, 24, generator=gen)
    y, h = norm.add_forward(x, r)
    want, want_h = reference(x, r, torch.tensor([0.3]), norm.weight.detach(), norm.bias.detach())
    assert rel_err(y, want) <= 1e-6 and torch.equal(h, x + r)
    assert rel_err(norm(x), reference(x, None, torch.tensor([0.3]), norm.weight.detach(), norm.bias.detach())[0]) \
        <= 1e-6
    assert norm.alpha.shape == (1,) and norm.alpha.item() == pytest.approx(0.3)


def test_llama_recipe_initialization():
    """Sec. 7 of the paper: alpha0 on the attention input differs from every other DyT's; a learnable scalar after
    the embedding starts at sqrt(dim). Every norm position (input, QK, embedding, final) is a DyT."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=50, norm="dyt", qk_norm=True, embed_norm=True,
                      dyt_alpha_init=0.15, dyt_alpha_init_attn=0.6)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    alphas = {name: p.item() for name, p in model.named_parameters() if name.endswith(".alpha")}
    attn_inputs = {f"layers.{i}.attention_norms.input.alpha" for i in range(2)}
    assert attn_inputs <= set(alphas) and {"embed_norm.alpha", "norm.alpha", "layers.0.attention.q_norm.alpha",
                                          "layers.1.ffn_norms.input.alpha"} <= set(alphas)
    assert all(v == pytest.approx(0.6 if name in attn_inputs else 0.15) for name, v in alphas.items())
    assert model.embed_scale.weight.item() == pytest.approx(math.sqrt(64))
    # every norm this Pre-LN model has (Sub-LN's inner norms are absent: identities)
    assert all(isinstance(m, DyT) for name, m in model.named_modules()
               if name.endswith(("norm", ".input")) and not name.endswith("inner_norm"))
    tokens = torch.randint(0, 50, (1, 4))
    without = Transformer(ModelConfig(**{**cfg.__dict__, "dyt_embed_scale": False}))
    assert without.embed_scale is None and model(tokens).shape == (1, 4, 50)


def test_model_with_triton_kernels_matches_torch():
    """A model with DyT in every position and every wiring (post, peri, pre): logits and every parameter gradient
    (alphas and the embedding scale included) agree between the PyTorch ops and the fused kernels."""
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    results = []
    for choice in ("torch", "triton"):
        cfg = ModelConfig(dim=48, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=80,
                          max_seq_len=16, norm="dyt", layer_placements=["post", "peri", "pre"], qk_norm=True,
                          embed_norm=True, kernels=choice)
        model = Transformer(cfg)
        model.init_weights(seed=3)
        logits = model(tokens)
        logits.float().pow(2).mean().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (logits_torch, grads_torch), (logits_triton, grads_triton) = results
    assert grads_torch["layers.1.attention_norms.input.alpha"].abs() > 0
    assert rel_err(logits_triton, logits_torch) < 1e-5
    for name, grad in grads_torch.items():
        assert rel_err(grads_triton[name], grad) < 1e-4, name
