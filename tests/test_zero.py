"""ZeRO sharding (FSDP2 and DeepSpeed ZeRO-1/2/3) against the single-process run: same global batch and seed, so
every step's loss must match; checkpoints resume across world sizes; each rank holds only its shard."""

from __future__ import annotations


import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import (MICRO_MODEL, TINY, TrainedRuns, assert_same_losses, diagnostic_rows, resume_copy, run_cli,
                     state_counts, step_losses)

from normtron.models.transformer import Transformer
from normtron.models.hypersphere import hypersphere_weights
from normtron.trainer.config import load_config

STEPS = ("training.steps=8", "checkpoint.every=4", "eval.every=4", "checkpoint.keep_last=0")


@pytest.fixture(scope="module")
def runs(shakespeare_data, tmp_path_factory):
    """Run directories under one module-wide root, each trained once on first use: runs(name, nproc, *overrides)."""
    return TrainedRuns(shakespeare_data, tmp_path_factory.mktemp("zero"), *STEPS)


# (name, ranks, overrides, fraction of all parameters / optimizer state that one rank holds)
SHARDED = [
    ("fsdp_2", 2, ["parallel.backend=fsdp"], 1 / 2, 1 / 2),
    ("fsdp_4", 4, ["parallel.backend=fsdp"], 1 / 4, 1 / 4),
    ("fsdp_2_zero2like_accum", 2, ["parallel.backend=fsdp", "parallel.reshard_after_forward=false",
                                   "training.micro_batch_size=2"], 1 / 2, 1 / 2),
    ("hsdp_2x2", 4, ["parallel.backend=fsdp", "parallel.dp_replicate=2", "parallel.dp_shard=2"], 1 / 2, 1 / 2),
    ("zero0_2", 2, ["parallel.backend=deepspeed", "parallel.zero_stage=0"], 1, 1),  # DeepSpeed's plain DP, fp32
    ("zero1_2", 2, ["parallel.backend=deepspeed", "parallel.zero_stage=1"], 1, 1 / 2),
    ("zero2_2_accum", 2, ["parallel.backend=deepspeed", "parallel.zero_stage=2", "training.micro_batch_size=2"],
     1, 1 / 2),
    ("zero3_2", 2, ["parallel.backend=deepspeed", "parallel.zero_stage=3"], 1 / 2, 1 / 2),
    ("zero3_offload_2", 2, ["parallel.backend=deepspeed", "parallel.zero_stage=3", "parallel.offload_params=true",
                            "parallel.offload_optimizer=true"], 1 / 2, 1 / 2),
]


@pytest.mark.parametrize("name,nproc,overrides,param_share,optim_share", SHARDED, ids=[s[0] for s in SHARDED])
def test_sharded_training_matches_single_process(runs, name, nproc, overrides, param_share, optim_share):
    reference = runs("single", 1)
    run_dir = runs(name, nproc, *overrides)
    assert_same_losses(run_dir, reference)
    # Each rank holds only its share of the model states (Adam: two moments per parameter).
    (total_params,), (total_optim,) = state_counts(reference)
    assert total_optim == 2 * total_params
    params, optim = state_counts(run_dir)
    assert len(params) == len(optim) == nproc
    for held, share, total in ((params, param_share, total_params), (optim, optim_share, total_optim)):
        # FSDP2 splits each tensor along dim 0 (ranks differ by a row); ZeRO pads its flat partitions slightly.
        assert all(h == pytest.approx(total * share, rel=0.03) for h in held), (held, share, total)


@pytest.mark.parametrize("placement", [
    ["model.placement=post"],
    ["model.placement=peri", "model.norm=layernorm", "model.norm_bias=true", "model.qk_norm=true"],
    ["model.placement=mix", "model.n_layers=4", "model.mix_alpha=0.5"],
    ["model.placement=ngpt", "checkpoint.every=3"],  # o/down columns normalized across the Shard(0) split
], ids=["post", "peri_layernorm_qknorm", "mix", "ngpt"])
def test_every_placement_under_fsdp(runs, placement):
    label = placement[0].split("=")[1]
    steps = ("training.steps=6", "checkpoint.every=6", "eval.every=6")
    reference = runs(f"single_{label}", 1, *placement, common=steps)
    assert_same_losses(runs(f"fsdp_{label}", 2, "parallel.backend=fsdp", *placement, common=steps), reference)



def test_ngpt_resumes_bitwise_and_across_layouts(runs):
    """nGPT's renormalized weights and eigen learning rates come back from a checkpoint exactly: the single-process
    run resumed at step 3 repeats steps 4-6 bit for bit; the FSDP2 run's step-3 checkpoint resumes in one process."""
    steps = ("training.steps=6", "checkpoint.every=6", "eval.every=6")  # as test_every_placement_under_fsdp's
    reference = runs("single_ngpt", 1, "model.placement=ngpt", "checkpoint.every=3", common=steps)
    runs("fsdp_ngpt", 2, "parallel.backend=fsdp", "model.placement=ngpt", "checkpoint.every=3", common=steps)
    resume_copy(reference, "single_ngpt_resumed", drop_step=6)
    resume_copy(runs.root / "fsdp_ngpt", "fsdp_ngpt_then_single", drop_step=6)
    resumed = runs("single_ngpt_resumed", 1, "model.placement=ngpt", "checkpoint.every=3", common=steps)
    want = step_losses(reference)
    assert {s: step_losses(resumed)[s] for s in (4, 5, 6)} == {s: want[s] for s in (4, 5, 6)}
    moved = runs("fsdp_ngpt_then_single", 1, "model.placement=ngpt", "checkpoint.every=3", common=steps)
    assert_same_losses(moved, reference, steps=range(4, 7))
    assert want[6] < want[1]  # it learns (slowly at this lr: cosine logits start near uniform)
    # Diagnostics: the eigen learning rates start at 0.05 and move; FSDP2 reduces its shards to the same means
    single, sharded = diagnostic_rows(reference), diagnostic_rows(runs.root / "fsdp_ngpt")
    assert [r["step"] for r in single] == [r["step"] for r in sharded] == [1, 6]
    for key in ("attn_eigen_lr", "mlp_eigen_lr"):
        assert single[0][key] == pytest.approx([0.05, 0.05], abs=2e-3) and single[-1][key] != single[0][key]
        for got, want_row in zip(sharded, single):
            assert got[key] == pytest.approx(want_row[key], rel=1e-5)
        assert single[-1]["resid_rms"] == pytest.approx([64 ** -0.5] * 2, rel=1e-5)  # unit vectors in dim 64


# Sub-LN and NormFormer layers with DyT in every norm position (inner norms, QK-norm, embedding norm): the new
# parameters (inner norms, head gains, the learned residual gain, DyT's scalar alphas, the embedding scale) in one run.
ZOO = ["model.layer_placements=subln,normformer", "model.normformer_residual_scale=true", "model.norm=dyt",
       "model.qk_norm=true", "model.embed_norm=true"]


def test_norm_zoo_under_fsdp_and_zero3_and_bitwise_resume(runs):
    """Sub-LN's and NormFormer's new parameters and DyT's scalars shard under FSDP2 and partition under ZeRO-3 like
    any parameter: both on 2 ranks match one process, and an FSDP2 run resumed from its step-4 checkpoint repeats
    steps 5-8 bit for bit."""
    reference = runs("single_zoo", 1, *ZOO)
    fsdp = runs("fsdp_zoo", 2, "parallel.backend=fsdp", *ZOO)
    assert_same_losses(fsdp, reference)
    assert_same_losses(runs("zero3_zoo", 2, "parallel.backend=deepspeed", "parallel.zero_stage=3", *ZOO), reference)
    resume_copy(fsdp, "fsdp_zoo_resumed")
    resumed = runs("fsdp_zoo_resumed", 2, "parallel.backend=fsdp", *ZOO)
    assert "resumed from" in (resumed / "train.log").read_text()
    got, want = step_losses(resumed), step_losses(fsdp)
    assert [got[s] for s in range(5, 9)] == [want[s] for s in range(5, 9)]


def test_bf16_sharded_training_stays_close_to_fp32_with_fp32_master_weights(runs):
    """bf16 compute keeps 8 mantissa bits (relative rounding 2^-9) in every matmul input; over 8 steps of the
    2-layer model the loss stays within 2% of fp32, while a wrong cast, a bf16 gradient reduction that lost the
    update, or a broken master-weight path lands far off."""
    reference = runs("single", 1)
    for name, overrides in (("fsdp_bf16", ["parallel.backend=fsdp"]),
                            ("zero2_bf16", ["parallel.backend=deepspeed", "parallel.zero_stage=2"])):
        run_dir = runs(name, 2, "training.precision=bf16", *overrides)
        assert_same_losses(run_dir, reference, rel=0.02)
    from torch.distributed.checkpoint import FileSystemReader
    metadata = FileSystemReader(str(runs("fsdp_bf16", 2) / "checkpoints" / "step_00000008")).read_metadata()
    model_tensors = {k: v for k, v in metadata.state_dict_metadata.items() if k.startswith("model.")}
    assert model_tensors and all(v.properties.dtype == torch.float32 for v in model_tensors.values())


def test_fsdp_checkpoint_resumes_at_other_world_sizes(runs):
    """DCP reshards: a 2-rank FSDP2 checkpoint resumes in one process (no sharding) and on 4 FSDP2 ranks, and
    the steps after the resume equal the uninterrupted run's."""
    reference, saved = runs("single", 1), runs("fsdp_2", 2, "parallel.backend=fsdp")
    resume_copy(saved, "fsdp_2_then_1")
    resume_copy(saved, "fsdp_2_then_4")
    one = runs("fsdp_2_then_1", 1)
    four = runs("fsdp_2_then_4", 4, "parallel.backend=fsdp")
    for run_dir in (one, four):
        assert "resumed from" in (run_dir / "train.log").read_text()
        assert_same_losses(run_dir, reference, steps=range(5, 9))


def load_model(checkpoint):
    """The model a DCP checkpoint holds, built from the config saved next to it."""
    cfg = load_config(checkpoint / "config.yaml")
    model = Transformer(cfg.model)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    model.load_state_dict(state["model"])
    return model


def test_deepspeed_checkpoint_resumes_and_consolidates(runs, tmp_path):
    reference = runs("single", 1)
    saved = runs("zero3_2", 2, "parallel.backend=deepspeed", "parallel.zero_stage=3")
    resume_copy(saved, "zero3_2_resumed")
    resumed = runs("zero3_2_resumed", 2, "parallel.backend=deepspeed", "parallel.zero_stage=3")
    assert "resumed from" in (resumed / "train.log").read_text()
    assert_same_losses(resumed, reference, steps=range(5, 9))

    # The ZeRO-3 partitions gather into the same weights the single process trained (fp32, 8 Adam steps).
    out = tmp_path / "consolidated"
    run_cli("convert", "consolidate", str(saved / "checkpoints" / "step_00000008"), str(out))
    assert {"config.yaml", "tokenizer.model", ".metadata"} <= {p.name for p in out.iterdir()}
    gathered = dict(load_model(out).named_parameters())
    single = dict(load_model(reference / "checkpoints" / "step_00000008").named_parameters())
    assert gathered.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(gathered[key], single[key], rtol=1e-4, atol=1e-5, msg=key)


def test_checkpoint_of_one_backend_is_refused_by_the_other(runs, shakespeare_data):
    saved = runs("zero1_2", 2, "parallel.backend=deepspeed", "parallel.zero_stage=1")
    copy = resume_copy(saved, "zero1_then_fsdp")
    result = run_cli("train", TINY, f"run.output_dir={copy.parent}", "run.name=zero1_then_fsdp",
                     f"data.dir={shakespeare_data}", *MICRO_MODEL, *STEPS, "parallel.backend=fsdp", check=False)
    assert result.returncode == 2
    assert "was written by parallel.backend=deepspeed" in result.stderr


def test_ngpt_under_deepspeed_zero2_and_zero3(runs, tmp_path):
    """nGPT's post-step renormalization reaches DeepSpeed's fp32 master partitions and the working weights: ZeRO-2
    and ZeRO-3 on 2 ranks match one process step for step, and the consolidated checkpoint holds the single
    process's weights, each hypersphere weight a unit vector along its dim (norms taken here in float64)."""
    steps = ("training.steps=6", "checkpoint.every=6", "eval.every=6")  # as test_ngpt_resumes_bitwise_...'s
    reference = runs("single_ngpt", 1, "model.placement=ngpt", "checkpoint.every=3", common=steps)
    single = load_model(reference / "checkpoints" / "step_00000006")
    for stage in (2, 3):
        run_dir = runs(f"zero{stage}_ngpt", 2, "parallel.backend=deepspeed", f"parallel.zero_stage={stage}",
                       "model.placement=ngpt", "checkpoint.every=3", common=steps)
        assert_same_losses(run_dir, reference)
        out = tmp_path / f"zero{stage}"
        run_cli("convert", "consolidate", str(run_dir / "checkpoints" / "step_00000006"), str(out))
        gathered = load_model(out)
        for (name, got), want in zip(gathered.named_parameters(), single.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
        spheres = hypersphere_weights(gathered)
        assert len(spheres) >= 1 + 4 * 2  # the embedding (tied head) and each layer's q/k/v/o... at least
        for weight, dim in spheres:
            norms = weight.double().norm(dim=dim)
            torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
