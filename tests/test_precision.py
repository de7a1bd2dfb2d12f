"""Mixed precision: bf16 and torchao FP8 against fp32/bf16 references on real text (200 steps of Shakespeare), the
FP8 matmuls themselves (Float8Linear calling torch._scaled_mm, checked with the profiler and against float64 math),
FSDP2's FP8 all-gather at 2 ranks, and fp32 master weights in every checkpoint, which lets a run switch precision
when it resumes."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from helpers import TINY, TrainedRuns, loss_curve, run_cli
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer
from normtron.parallel.float8 import FP8_RECIPES, apply_float8, import_torchao_float8
from normtron.trainer.engine import materialize

STEPS = 200
COMMON = (f"training.steps={STEPS}", "training.warmup_steps=20", f"checkpoint.every={STEPS}", f"eval.every={STEPS}",
          "diagnostics.every=0")


@pytest.fixture(scope="module")
def runs(shakespeare_data, tmp_path_factory):
    """Run directories under one module-wide root, each trained once on first use: runs(name, nproc, *overrides).
    The micro model's linear dimensions (64, 128, 16-wide heads) are multiples of 16, so all but the head run in FP8."""
    trained = TrainedRuns(shakespeare_data, tmp_path_factory.mktemp("precision"), *COMMON)
    return lambda name, nproc, *overrides: (trained(name, nproc, *overrides), trained.output(name))


def smoothed(values: list[float], window: int = 25) -> float:
    """The mean of the last `window` per-step losses (each step is only 256 tokens, so single steps are noisy)."""
    return sum(values[-window:]) / window


def assert_trains_like(run_dir, reference_dir, rel=0.02, better=None):
    """Same data, seed and schedule as the reference: no divergence, final smoothed loss within `rel` (or, with
    `better`, at most `rel` above and at most `better` below the reference)."""
    got, want = loss_curve(run_dir), loss_curve(reference_dir)
    assert len(got) == len(want) == STEPS
    assert all(math.isfinite(v) for v in got)
    # Learned (the untrained loss is ~ln(512) = 6.2) and never blew up after warmup.
    assert smoothed(got) < got[0] - 1.5 and max(got[STEPS // 2:]) < got[0] - 1.0
    low = smoothed(want) * (1 - (rel if better is None else better))
    assert low <= smoothed(got) <= smoothed(want) * (1 + rel), (smoothed(got), smoothed(want))


def checkpoint_dtypes(run_dir) -> set[torch.dtype]:
    """dtypes of every model tensor and per-parameter optimizer state tensor in the run's last checkpoint."""
    metadata = FileSystemReader(str(run_dir / "checkpoints" / f"step_{STEPS:08d}")).read_metadata()
    moments = ("exp_avg", "exp_avg_sq")
    tensors = {k: v for k, v in metadata.state_dict_metadata.items()
               if k.startswith("model.") or (k.startswith("optimizer.state.") and k.endswith(moments))}
    assert any(k.startswith("model.layers.0.attention.q_proj") for k in tensors)
    return {v.properties.dtype for v in tensors.values()}


# --- FP8 matmuls --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_float8_linears_run_scaled_mm(recipe):
    """The eligible linears become Float8Linear (the head and the 72-wide MLP stay nn.Linear), and a training step
    calls aten::_scaled_mm for each FP8 matmul: 3 per linear (output, input grad, weight grad), 2 when the recipe
    keeps the weight gradient in high precision."""
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_dim=72, max_seq_len=32, vocab_size=512)
    with torch.device("meta"):
        model = Transformer(cfg)
    converted = apply_float8(model, recipe, emulate=False, fsdp_float8_all_gather=False)
    materialize(model, torch.device("cpu"), seed=0)
    float8_linear = import_torchao_float8().float8_linear.Float8Linear
    fp8 = {name for name, m in model.named_modules() if isinstance(m, float8_linear)}
    plain = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    assert fp8 == set(converted) == {f"layers.0.attention.{p}_proj" for p in "qkvo"}
    assert plain == {"output", *(f"layers.0.feed_forward.{p}_proj" for p in ("gate", "up", "down"))}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights

    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens)
        logits.float().sum().backward()
    calls = sum(e.name == "aten::_scaled_mm" for e in profile.events())
    assert calls == len(converted) * (2 if recipe == "rowwise_with_gw_hp" else 3)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())

    # One FP8 linear against float64 math: e4m3 keeps 3 mantissa bits (relative rounding 2^-4 per element), which
    # averages out over a 64-long dot product to a few percent; bf16 alone would be ~100x closer.
    q_proj = model.layers["0"].attention.q_proj
    x = torch.randn(64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q_proj(x)
    exact = x.double() @ q_proj.weight.double().t()
    error = ((y.double() - exact).norm() / exact.norm()).item()
    assert 5e-3 < error < 0.08, error


def test_float8_emulation_matches_scaled_mm():
    """training.fp8_emulate (for GPUs without FP8 matmuls) casts exactly as the real path but multiplies in high
    precision: no _scaled_mm call, and the same result as the real FP8 matmul up to bf16 output rounding."""
    outputs = {}
    for emulate in (False, True):
        cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, ffn_hidden_dim=128, max_seq_len=32, vocab_size=512)
        with torch.device("meta"):
            model = Transformer(cfg)
        apply_float8(model, "tensorwise", emulate=emulate, fsdp_float8_all_gather=False)
        materialize(model, torch.device("cpu"), seed=0)
        x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
        with (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile,
              torch.autocast("cpu", dtype=torch.bfloat16)):
            outputs[emulate] = model.layers["0"].feed_forward.up_proj(x).float()
        assert sum(e.name == "aten::_scaled_mm" for e in profile.events()) == (0 if emulate else 1)
    error = ((outputs[True] - outputs[False]).norm() / outputs[False].norm()).item()
    assert error < 4e-3, error


# --- Loss parity on real text -------------------------------------------------------------------------------------

def test_bf16_tracks_fp32_with_fp32_master_weights(runs):
    """bf16 rounds every matmul input to 8 mantissa bits (2^-9 relative): unbiased noise that, over 200 steps on the
    same data, moves the smoothed loss by well under 1% (measured ~0.1%); 2% still catches a wrong cast or lost
    updates. Checkpoints (model and Adam moments) are fp32."""
    bf16_dir, _ = runs("bf16", 1, "training.precision=bf16")
    assert_trains_like(bf16_dir, runs("fp32", 1)[0])
    assert checkpoint_dtypes(bf16_dir) == {torch.float32}


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_tracks_bf16(runs, recipe):
    """Each recipe trains like bf16 (smoothed loss after 200 steps at most 2% above it), with different numerics (it
    is not silently bf16), says what it converted, and saves fp32 master weights."""
    run_dir, stdout = runs(f"fp8_{recipe}", 1, "training.precision=fp8", f"training.fp8_recipe={recipe}")
    bf16_dir, _ = runs("bf16", 1, "training.precision=bf16")
    assert f"precision fp8 {recipe}: 14 of 15 linears in fp8, high precision: output" in stdout
    # A wrong cast or a lost update shows as a higher loss: at most 2% above bf16. Below it, the rowwise recipes
    # measured 4.3% (rowwise) and 2.7% (rowwise_with_gw_hp) lower than bf16 on this data (tensorwise 0.3%): faster
    # learning we observe and have not explained, so the lower bound is looser.
    assert_trains_like(run_dir, bf16_dir, better=0.06)
    assert loss_curve(run_dir)[STEPS // 2:] != loss_curve(bf16_dir)[STEPS // 2:]
    assert checkpoint_dtypes(run_dir) == {torch.float32}


def test_fsdp_fp8_all_gather_tracks_bf16(runs):
    """FSDP2 at 2 ranks gathers the tensorwise FP8 weights as float8 (scales precomputed after each step) and trains
    like the single-process bf16 run on the same global batch; its checkpoint holds plain fp32 tensors."""
    run_dir, stdout = runs("fsdp_fp8", 2, "training.precision=fp8", "parallel.backend=fsdp")
    assert "dp_shard=2" in stdout and "fp8 all-gather" in stdout
    assert_trains_like(run_dir, runs("bf16", 1, "training.precision=bf16")[0])
    assert checkpoint_dtypes(run_dir) == {torch.float32}


def test_resume_switches_precision(runs):
    """Checkpoints hold fp32 master weights under the same names in every precision: a bf16 run resumes in fp8,
    an FSDP2 FP8 run (all-gather weights) in a single fp32 process, and both go on from the trained model (a fresh
    model would start at ~6.2)."""
    for source, overrides in (("bf16", ["training.precision=fp8"]), ("fsdp_fp8", [])):
        source_dir, _ = runs(source, 1)
        run_dir = source_dir.with_name(f"{source}_resumed")
        shutil.copytree(source_dir, run_dir)
        _, stdout = runs(run_dir.name, 1, f"training.steps={STEPS + 10}", *overrides)
        assert f"resumed from {run_dir / 'checkpoints' / f'step_{STEPS:08d}'} at step {STEPS}" in stdout
        assert f"precision {'fp8' if overrides else 'fp32'}" in stdout
        after = loss_curve(run_dir)[STEPS:]
        assert len(after) == 10 and all(math.isfinite(v) for v in after)
        assert smoothed(after, 10) == pytest.approx(smoothed(loss_curve(source_dir)), rel=0.05)


@pytest.mark.parametrize("overrides, fragment", [
    (["training.precision=fp8", "parallel.backend=deepspeed"], "fp8 is not available with parallel.backend=deepspeed"),
    (["training.precision=fp8", "training.fp8_recipe=blockwise"], "one of tensorwise, rowwise, rowwise_with_gw_hp"),
    (["training.precision=fp16"], "choose one of fp32, bf16, fp8"),
])
def test_precision_config_errors(shakespeare_data, tmp_path, overrides, fragment):
    result = run_cli("train", "--check", TINY, f"data.dir={shakespeare_data}", f"run.output_dir={tmp_path}",
                     *overrides, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and fragment in result.stderr, result.stderr
