"""Pipeline parallelism against the single-process run: the same global batch and seed, so every step's loss and
every evaluation must match at 1e-5 relative, for each schedule and each norm placement (spread over the schedules),
with FSDP2 over the data-parallel ranks too; a pipeline checkpoint resumes under FSDP2 and in one process."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import TrainedRuns, assert_same_losses, diagnostic_rows, read_metrics, state_counts

from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer

STEPS = ("model.n_layers=4", "training.steps=6", "checkpoint.every=3", "eval.every=3", "checkpoint.keep_last=0")
PLACEMENTS = {
    "pre": [],
    "post": ["model.placement=post"],
    "peri": ["model.placement=peri", "model.norm=layernorm", "model.qk_norm=true", "stability.z_loss=1e-3",
             "model.parametrization=mup", "model.mup_base_dim=32"],  # µP's logit and attention scales too
    "mix": ["model.placement=mix", "model.mix_alpha=0.5"],  # layers 0-1 Post-LN, 2-3 Pre-LN
    "ngpt": ["model.placement=ngpt"],
    # a Sub-LN and a NormFormer stage, with DyT in every norm (its embedding scale on stage 0 only)
    "zoo": ["model.layer_placements=subln,subln,normformer,normformer", "model.normformer_residual_scale=true",
            "model.norm=dyt", "model.qk_norm=true"],
}
PP = ["parallel.backend=fsdp", "parallel.pp=2"]

# (name, ranks, placement, overrides): every schedule at pp=2, every placement under one of them.
PIPELINED = [
    ("gpipe_mix_straddle", 2, "mix", [*PP, "parallel.pp_schedule=GPipe", "parallel.pp_layers=1,3"]),
    ("1f1b_pre", 2, "pre", [*PP, "parallel.pp_schedule=1F1B"]),
    ("interleaved_peri", 2, "peri", [*PP, "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_stages_per_rank=2"]),
    ("zbv_post", 2, "post", [*PP, "parallel.pp_schedule=ZBVZeroBubble"]),
    ("interleaved_zb_mix", 2, "mix", [*PP, "parallel.pp_schedule=InterleavedZeroBubble"]),
    ("1f1b_ngpt", 2, "ngpt", [*PP, "parallel.pp_schedule=1F1B"]),  # s_z and the head's renormalization on stage 1
    ("1f1b_subln_normformer_dyt", 2, "zoo", [*PP, "parallel.pp_schedule=1F1B"]),
    ("pp2_fsdp2_1f1b_post", 4, "post", [*PP, "parallel.pp_schedule=1F1B", "training.micro_batch_size=2"]),
]


@pytest.fixture(scope="module")
def runs(shakespeare_data, tmp_path_factory):
    """Run directories under one module-wide root, each trained once on first use: runs(name, nproc, *overrides)."""
    return TrainedRuns(shakespeare_data, tmp_path_factory.mktemp("pipeline"), *STEPS)


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


def test_chunked_loss_on_the_last_stage_equals_unchunked(runs):
    """training.loss_chunk_size under a pipeline: the last stage hands on its hidden states and head weight and the
    schedule's loss computes the head 16 tokens at a time. GPipe (a straddling Post-/Pre-LN split) equals the
    unchunked pipeline within 1e-6 and the single process; 1F1B with z-loss and µP's logit multiplier equals the
    single process, every step's loss and both evaluations."""
    chunked = "training.loss_chunk_size=16"
    name, _, placement, overrides = PIPELINED[0]
    gpipe = runs(f"{name}_chunked", 2, *PLACEMENTS[placement], *overrides, chunked)
    assert_same_losses(gpipe, runs(name, 2, *PLACEMENTS[placement], *overrides), rel=1e-6)
    assert_same_losses(gpipe, runs(f"single_{placement}", 1, *PLACEMENTS[placement]))
    one_f_one_b = runs("1f1b_peri_chunked", 2, *PLACEMENTS["peri"], *PP, "parallel.pp_schedule=1F1B", chunked)
    assert_same_losses(one_f_one_b, runs("single_peri", 1, *PLACEMENTS["peri"]))


def step_rows(run_dir):
    return read_metrics(run_dir)[0]


def test_diagnostics_under_pipeline_parallelism_equal_single_process(runs):
    """Each stage records its own layers (the first micro-batch's activations); the pipeline group completes the
    per-layer rows. Against one process running the same micro-batches (2 of 4 sequences), every value of every
    layer matches, at step 1 (where the stages first infer their shapes) and at the last step."""
    single = diagnostic_rows(runs("single_pre_micro4", 1, "training.micro_batch_size=4"))
    pipelined = diagnostic_rows(runs("1f1b_pre", 2, *PP, "parallel.pp_schedule=1F1B"))
    assert [r["step"] for r in single] == [r["step"] for r in pipelined] == [1, 6]
    for want, got in zip(single, pipelined):
        for key in ("layer_grad_norm", "attn_grad_norm", "mlp_grad_norm", "update_ratio", "resid_rms",
                    "resid_var", "max_act", "max_act_ratio", "max_attn_logit"):
            assert len(got[key]) == 4
            assert got[key] == pytest.approx(want[key], rel=1e-4), (want["step"], key)


def test_pipeline_checkpoint_resumes_under_fsdp_and_in_one_process(runs):
    """DCP keys are the whole model's names on every stage: a pp=2 checkpoint of step 3 resumes under FSDP2 on 2 ranks
    and in one process, a single-process one under pp=2, and steps 4-6 equal the uninterrupted run's."""
    reference = runs("single_pre", 1)
    saved = runs("1f1b_pre", 2, *PP, "parallel.pp_schedule=1F1B")
    for source, name in ((saved, "pp_then_fsdp"), (saved, "pp_then_single"), (reference, "single_then_pp")):
        copy = source.with_name(name)
        shutil.copytree(source, copy)
        shutil.rmtree(copy / "checkpoints" / "step_00000006")
    resumed = [runs("pp_then_fsdp", 2, "parallel.backend=fsdp"), runs("pp_then_single", 1),
               runs("single_then_pp", 2, *PP, "parallel.pp_schedule=GPipe")]
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


def test_checkpoints_with_the_earlier_optimizer_layout_still_load(tmp_path):
    """Checkpoints now key the optimizer state by parameter name; those written before (by param-group index, as
    get_state_dict returns it by default) load into a fresh model and optimizer with the same values."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from normtron.trainer.checkpoint import flat_optimizer_state, load_dcp, save_dcp, single_process_ok
    from normtron.trainer.config import TrainingConfig
    from normtron.trainer.optim import build_optimizer

    class Step:  # the smallest Stateful: a step counter
        def __init__(self, step):
            self.step = step

        def state_dict(self):
            return {"step": self.step}

        def load_state_dict(self, state):
            self.step = state["step"]

    def trained(seed):
        model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_hidden_dim=64, vocab_size=64,
                                        max_seq_len=16))
        model.init_weights(seed)
        optimizer = build_optimizer(model, TrainingConfig())
        model(torch.randint(0, 64, (2, 8))).square().mean().backward()
        optimizer.step()
        return model, optimizer

    model, optimizer = trained(0)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with single_process_ok():
        dcp.save({"model": model_sd, "optimizer": optim_sd, "train": Step(7)}, checkpoint_id=tmp_path / "old",
                 no_dist=True)
    save_dcp(tmp_path / "new", model, optimizer, Step(7))
    assert not flat_optimizer_state(tmp_path / "old") and flat_optimizer_state(tmp_path / "new")
    for path in (tmp_path / "old", tmp_path / "new"):
        fresh, fresh_optimizer = trained(1)
        state = Step(0)
        load_dcp(path, fresh, fresh_optimizer, state)
        assert state.step == 7
        for (name, want), got in zip(model.named_parameters(), fresh.parameters()):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(fresh_optimizer.state[got][key], optimizer.state[want][key], rtol=0,
                                           atol=0, msg=f"{name} {key}")
