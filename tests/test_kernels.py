"""The fused Triton norm kernels (run on CPU in Triton's interpreter) against float64 math, and the model and
training run with `model.kernels=triton` against `model.kernels=torch`.

Every kernel output is allocated with torch.empty, which the `poisoned` fixture fills with NaN (PyTorch's
deterministic mode), so an element a kernel forgets to write fails the comparison. Inputs are fresh random values.
The interpreter is slow: shapes stay small, with one row, odd sizes and rows longer than one block among them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

# Triton reads this when a kernel is defined, i.e. when kernels.triton_norm is first imported (below, or by a norm).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from helpers import REPO, TINY, read_metrics, rel_err, run_cli

from normtron.kernels import dispatch
from normtron.kernels.triton_norm import BWD_MAX_BLOCK, FWD_MAX_BLOCK, add_norm, norm
from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer

# Relative error (2-norm) bounds; bf16 results are ~4e-3 off here, partly because the interpreter's casts to bf16
# truncate where a GPU rounds to nearest.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def reference(x, residual, weight, bias, eps, rms):
    """(Norm(x + residual), x + residual), written out in float64."""
    h = x.double() + (residual.double() if residual is not None else 0)
    if rms:
        y = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * weight.double()
    else:
        centred = h - h.mean(-1, keepdim=True)
        y = centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + eps) * weight.double()
        y = y + bias.double() if bias is not None else y
    return y, h


def check_against_float64(shape, dtype, rms, residual_dtype=None, weight_dtype=None, residual_in_fp32=False,
                          max_block=None, seed=0):
    """Forward outputs and every gradient of add_norm (or norm without a residual) within TOLERANCE[dtype]."""
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    weight_dtype = weight_dtype or dtype

    def rand(*size, dtype, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale + shift).to(dtype).requires_grad_()

    x = rand(*shape, dtype=dtype, scale=2.0, shift=0.5)
    residual = rand(*shape, dtype=residual_dtype) if residual_dtype else None
    weight = rand(n, dtype=weight_dtype, scale=0.5, shift=1.0)
    bias = None if rms else rand(n, dtype=weight_dtype, scale=0.3)
    leaves = [t for t in (x, residual, weight, bias) if t is not None]

    if residual is None and not residual_in_fp32:
        y, h = norm(x, weight, bias, 1e-5, rms=rms, max_block=max_block), None
    else:
        y, h = add_norm(x, residual, weight, bias, 1e-5, rms=rms, residual_in_fp32=residual_in_fp32,
                        max_block=max_block)
    outputs = [y] if h is None else [y, h]
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outputs]
    grads = torch.autograd.grad(outputs, leaves, upstream)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, rest = leaves64[0], leaves64[1:]
    r64 = rest.pop(0) if residual is not None else None
    w64, b64 = rest[0], (rest[1] if bias is not None else None)
    y64, h64 = reference(x64, r64, w64, b64, 1e-5, rms)
    want_outputs = [y64] if h is None else [y64, h64]
    want_grads = torch.autograd.grad(want_outputs, leaves64, [u.double() for u in upstream])

    tol = TOLERANCE[dtype]
    assert y.dtype == (torch.promote_types(dtype, residual_dtype) if residual_dtype else dtype)
    if h is not None:
        assert h.dtype == (torch.float32 if residual_in_fp32 else y.dtype)
    assert all(g.dtype == leaf.dtype for g, leaf in zip(grads, leaves))
    names = ["y", "new_residual"][:len(outputs)] + ["dx", "dresidual", "dweight", "dbias"]
    names = [k for k in names if not (k == "dresidual" and residual is None) and not (k == "dbias" and rms)]
    for name, got, want in zip(names, [*outputs, *grads], [*want_outputs, *want_grads]):
        err = rel_err(got, want)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# (rows, hidden, max_block): one row; short rows packed several per program (a partly filled tile); odd sizes;
# 4100 > BWD_MAX_BLOCK (backward in chunks); 9000 > FWD_MAX_BLOCK (both in chunks); a small max_block (chunks of 128).
SHAPES = [((1, 64), None), ((130, 48), None), ((5, 1000), None), ((3, 4100), None), ((2, 9000), None),
          ((2, 3, 300), 128)]


@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("shape,max_block", SHAPES, ids=[f"{s}-{b}" for s, b in SHAPES])
def test_kernel_matches_float64(poisoned, shape, max_block, dtype, rms, with_residual):
    assert 4100 > BWD_MAX_BLOCK and 9000 > FWD_MAX_BLOCK  # what the shapes above are for
    check_against_float64(shape, dtype, rms, residual_dtype=dtype if with_residual else None, max_block=max_block,
                          seed=hash((shape, rms, with_residual)) % 2**31)


@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
@pytest.mark.parametrize("case", ["fp16", "autocast", "residual_in_fp32", "fp32_residual_for_x"])
def test_kernel_dtype_mixes(poisoned, case, rms):
    """fp16; bf16 activations with fp32 weights and an fp32 residual stream (as under autocast); the new residual
    kept in fp32 for a bf16 stream, also without an incoming residual."""
    if case == "fp16":
        check_against_float64((4, 700), torch.float16, rms, residual_dtype=torch.float16)
    elif case == "autocast":
        check_against_float64((4, 700), torch.bfloat16, rms, residual_dtype=torch.float32,
                              weight_dtype=torch.float32)
    elif case == "residual_in_fp32":
        check_against_float64((4, 700), torch.bfloat16, rms, residual_dtype=torch.bfloat16, residual_in_fp32=True)
    else:
        check_against_float64((3, 700), torch.bfloat16, rms, residual_in_fp32=True)


def test_gradcheck_float64():
    """Finite differences in float64 (the kernels compute in float64 for float64 inputs), both layouts."""
    gen = torch.Generator().manual_seed(1)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, r, w, b = leaf(2, 5), leaf(2, 5), leaf(5), leaf(5)
    assert torch.autograd.gradcheck(lambda x, r, w, b: add_norm(x, r, w, b, 1e-5, rms=False, max_block=4),
                                    (x, r, w, b))
    assert torch.autograd.gradcheck(lambda x, r, w: add_norm(x, r, w, None, 1e-5, rms=True), (x, r, w))


def test_weight_gradients_are_deterministic():
    """dweight/dbias come from per-program partial sums and one reduction, no atomics: the same bits every time."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(37, 96, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(96, generator=gen).requires_grad_()
    b = torch.randn(96, generator=gen).requires_grad_()
    dy = torch.randn(37, 96, generator=gen, dtype=torch.bfloat16)
    runs = [torch.autograd.grad(norm(x, w, b, 1e-5, rms=False), (w, b), dy) for _ in range(3)]
    for dw, db in runs[1:]:
        assert torch.equal(dw, runs[0][0]) and torch.equal(db, runs[0][1])


def micro_model(kernels_choice: str) -> Transformer:
    # Every wiring (post, peri, pre), LayerNorm with bias, per-head QK-norm and the embedding norm.
    cfg = ModelConfig(dim=48, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=80, max_seq_len=16,
                      norm="layernorm", layer_placements=["post", "peri", "pre"], qk_norm=True, embed_norm=True,
                      kernels=kernels_choice)
    model = Transformer(cfg)
    model.init_weights(seed=3)
    with torch.no_grad():  # non-trivial norm parameters
        gen = torch.Generator().manual_seed(4)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def autograd_ops(t: torch.Tensor) -> Counter:
    """How many nodes of each kind the autograd graph behind t has."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return Counter(type(node).__name__ for node in seen)


def test_model_with_triton_kernels_matches_torch():
    """Logits and every parameter gradient of a model wired with every placement agree across the two paths, and
    with Triton every norm is one fused kernel that also does the residual add before it."""
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    results = []
    for choice in ("torch", "triton"):
        model = micro_model(choice)
        logits = model(tokens)
        logits.float().pow(2).mean().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    ops_torch, ops_triton = (autograd_ops(logits) for logits, _ in results)
    # 16 norms: embedding, post 2 + QK 2, peri 4 + QK 2, pre 2 + QK 2, final; 6 residual adds, one per branch.
    assert ops_torch["NativeLayerNormBackward0"] == ops_triton["_FusedNormBackward"] == 16
    assert ops_triton["NativeLayerNormBackward0"] == 0
    assert ops_torch["AddBackward0"] - ops_triton["AddBackward0"] == 6
    (logits_torch, grads_torch), (logits_triton, grads_triton) = results
    assert rel_err(logits_triton, logits_torch) < 1e-5
    for name, grad in grads_torch.items():
        assert rel_err(grads_triton[name], grad) < 1e-4, name


def test_training_with_triton_matches_torch(micro_args, tmp_path):
    """A few optimizer steps through the CLI: the training curve with the Triton kernels is the PyTorch one."""
    model = ["model.norm=layernorm", "model.layer_placements=post,peri", "model.qk_norm=true", "training.steps=3"]
    runs = {}
    for choice in ("triton", "auto"):
        result = run_cli("train", TINY, *micro_args(choice, f"model.kernels={choice}", *model),
                         env={"TRITON_INTERPRET": "1"})
        runs[choice] = result.stdout + result.stderr
    assert "norm kernels triton (Triton interpreter)" in runs["triton"]
    assert "norm kernels torch (auto on cpu)" in runs["auto"]  # auto is Triton on CUDA only
    (train_triton, eval_triton), (train_torch, eval_torch) = (read_metrics(tmp_path / "runs" / name)
                                                              for name in ("triton", "auto"))
    assert len(train_triton) == len(train_torch) == 3
    for a, b in zip(train_triton + eval_triton, train_torch + eval_torch):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in b:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, a, b)
    # The kernels are not part of the model: the run resumes (here: is accepted for resuming) with another choice.
    check = run_cli("train", "--check", TINY, *micro_args("triton", "model.kernels=torch", *model))
    assert "the run will resume" in check.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="about machines without a CUDA GPU")
def test_forced_triton_without_gpu_or_interpreter_is_a_user_error(micro_args, tmp_path):
    result = run_cli("train", TINY, *micro_args("forced", "model.kernels=triton"),
                     env={"TRITON_INTERPRET": "0"}, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        ("normtron: error: model.kernels=triton cannot run here: Triton kernels need a CUDA GPU and this run is on "
         "cpu (TRITON_INTERPRET=1 runs them in Triton's slow CPU interpreter, meant for tests); use "
         "model.kernels=auto or torch")]
    assert not (tmp_path / "runs").exists()


def test_forced_triton_without_triton_installed_is_a_user_error(monkeypatch):
    from normtron.trainer.errors import UserError
    from normtron.trainer.train import check_kernels

    monkeypatch.setitem(sys.modules, "triton", None)  # what importlib reports for a package that is not there
    dispatch.triton_problem.cache_clear()
    try:
        with pytest.raises(UserError, match=r"Triton is not installed \(pip install 'normtron\[kernels\]'\)"):
            check_kernels("triton", torch.device("cuda"))
        assert not dispatch.use_triton("auto", torch.device("cuda"))  # auto falls back to PyTorch
        check_kernels("torch", torch.device("cuda"))
    finally:
        dispatch.triton_problem.cache_clear()


def test_bench_says_when_there_is_no_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/norm_kernels.py measures instead")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "norm_kernels.py")], check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "no CUDA GPU" in result.stdout


def test_bench_smoke_in_the_interpreter():
    """bench/norm_kernels.py --smoke runs every measurement on tiny shapes (interpreter on CPU), so the script works."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / "norm_kernels.py"), "--smoke"], check=False,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GB/s" in result.stdout and "copy" in result.stdout


def test_kernels_compile_for_an_h100_without_register_spills(tmp_path):
    """No GPU needed: Triton compiles every kernel as launched for hidden 64..16384 to sm_90a and its bundled ptxas
    reports the registers; none spills (the point of the chunked paths for 8K-16K rows)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "norm_kernels.py"), "--ptxas"], check=False,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 * 2 * 8  # (rmsnorm, layernorm, dyt) x (forward, backward) x hidden sizes
    kernel_names = {"_norm_fwd_rows", "_norm_fwd_chunked", "_norm_bwd_rows", "_norm_bwd_chunked", "_dyt_fwd",
                    "_dyt_bwd"}
    assert kernel_names <= set(result.stdout.replace("|", " ").split())
    for line in lines:
        assert "registers, 0 bytes spill stores, 0 bytes spill loads" in line, line


def test_inner_norms_and_head_gains_with_triton_match_torch():
    """Sub-LN's and NormFormer's norms inside the sublayers (over all heads, over the MLP width) run the fused kernels
    too: logits and every gradient agree with the PyTorch path."""
    cfg = dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=80, max_seq_len=16,
               norm="layernorm", layer_placements=["subln", "normformer"], normformer_residual_scale=True)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(6))
    results = []
    for choice in ("torch", "triton"):
        model = Transformer(ModelConfig(**cfg, kernels=choice))
        model.init_weights(seed=3)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(4)
            for p in (p for p in model.parameters() if p.ndim == 1):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        logits = model(tokens)
        logits.float().pow(2).mean().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}, autograd_ops(logits)))
    (logits_torch, grads_torch, ops_torch), (logits_triton, grads_triton, ops_triton) = results
    # 9 norms: Sub-LN 2 input + 2 inner, NormFormer 2 input + 1 output + 1 MLP inner, the final norm
    assert ops_torch["NativeLayerNormBackward0"] == ops_triton["_FusedNormBackward"] == 9
    assert rel_err(logits_triton, logits_torch) < 1e-5
    for name, grad in grads_torch.items():
        assert rel_err(grads_triton[name], grad) < 1e-4, name
