"""Pipeline parallelism against the single-process run: the same global batch and seed, so every step's loss and
every evaluation must match at 1e-5 relative, for each schedule and each norm placement (spread over the schedules),
with FSDP2 over the data-parallel ranks too; a pipeline checkpoint resumes under FSDP2 and in one process."""

from __future__ import annotations

import shutil

import pytest
from helpers import MICRO_MODEL, TINY, read_metrics, run_cli, run_torchrun
from test_zero import assert_same_losses, state_counts

STEPS = ("model.n_layers=4", "training.steps=6", "checkpoint.every=3", "eval.every=3", "checkpoint.keep_last=0")
PLACEMENTS = {
    "pre": [],
    "post": ["model.placement=post"],
    "peri": ["model.placement=peri", "model.norm=layernorm", "model.qk_norm=true", "stability.z_loss=1e-3"],
    "mix": ["model.placement=mix", "model.mix_alpha=0.5"],  # layers 0-1 Post-LN, 2-3 Pre-LN
}
PP = ["parallel.backend=fsdp", "parallel.pp=2"]

# (name, ranks, placement, overrides): every schedule at pp=2, every placement under one of them.
PIPELINED = [
    ("gpipe_mix_straddle", 2, "mix", [*PP, "parallel.pp_schedule=GPipe", "parallel.pp_layers=1,3"]),
    ("1f1b_pre", 2, "pre", [*PP, "parallel.pp_schedule=1F1B"]),
    ("interleaved_peri", 2, "peri", [*PP, "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_stages_per_rank=2"]),
    ("zbv_post", 2, "post", [*PP, "parallel.pp_schedule=ZBVZeroBubble"]),
    ("interleaved_zb_mix", 2, "mix", [*PP, "parallel.pp_schedule=InterleavedZeroBubble"]),
    ("pp2_fsdp2_1f1b_post", 4, "post", [*PP, "parallel.pp_schedule=1F1B", "training.micro_batch_size=2"]),
]


@pytest.fixture(scope="module")
def runs(shakespeare_data, tmp_path_factory):
    """Run directories under one module-wide root, each trained once on first use: runs(name, nproc, *overrides)."""
    root = tmp_path_factory.mktemp("pipeline")
    done: dict[str, object] = {}

    def run(name: str, nproc: int, *overrides: str):
        if name not in done:
            args = ("train", TINY, f"data.dir={shakespeare_data}", f"run.output_dir={root}", f"run.name={name}",
                    *MICRO_MODEL, *STEPS, *overrides)
            done[name] = run_cli(*args) if nproc == 1 else run_torchrun(nproc, *args)
        return root / name
    return run


@pytest.mark.parametrize("name,nproc,placement,overrides", PIPELINED, ids=[p[0] for p in PIPELINED])
def test_pipelined_training_matches_single_process(runs, name, nproc, placement, overrides):
    reference = runs(f"single_{placement}", 1, *PLACEMENTS[placement])
    run_dir = runs(name, nproc, *PLACEMENTS[placement], *overrides)
    assert_same_losses(run_dir, reference)  # every step's loss and both evaluations
    assert len(step_rows(run_dir)) == 6
    # The stages partition the model: every parameter on exactly one pipeline rank (and sharded over the
    # data-parallel ranks under FSDP2); Adam's two moments follow.
    (total_params,), _ = state_counts(reference)
    params, optim = state_counts(run_dir)
    assert len(params) == nproc and sum(params) == total_params and max(params) < total_params
    assert optim == [2 * p for p in params]


def step_rows(run_dir):
    return read_metrics(run_dir)[0]


def test_pipeline_checkpoint_resumes_under_fsdp_and_in_one_process(runs):
    """DCP keys are the whole model's names on every stage: a pp=2 checkpoint of step 3 resumes under FSDP2 on 2 ranks
    and in one process, and steps 4-6 equal the uninterrupted run's."""
    reference = runs("single_pre", 1)
    saved = runs("1f1b_pre", 2, *PP, "parallel.pp_schedule=1F1B")
    for name in ("pp_then_fsdp", "pp_then_single"):
        copy = saved.with_name(name)
        shutil.copytree(saved, copy)
        shutil.rmtree(copy / "checkpoints" / "step_00000006")
    resumed = [runs("pp_then_fsdp", 2, "parallel.backend=fsdp"), runs("pp_then_single", 1)]
    for run_dir in resumed:
        assert "resumed from" in (run_dir / "train.log").read_text()
        assert_same_losses(run_dir, reference, steps=range(4, 7))


def test_pipeline_starts_from_init_from_weights(runs):
    """checkpoint.init_from loads every stage's share: a pipelined run started from the single process's step-3
    weights computes the loss the single process computes from them."""
    source = runs("single_pre", 1) / "checkpoints" / "step_00000003"
    one = runs("init_single", 1, f"checkpoint.init_from={source}", "training.steps=1")
    piped = runs("init_pp", 2, f"checkpoint.init_from={source}", "training.steps=1", *PP)
    assert "initialized the model from" in (piped / "train.log").read_text()
    first, want = step_rows(piped)[0]["loss"], step_rows(one)[0]["loss"]
    assert first == pytest.approx(want, rel=1e-5)
    assert abs(first - step_rows(runs("single_pre", 1))[0]["loss"]) > 0.05  # trained weights, not a fresh init
