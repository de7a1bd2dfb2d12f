"""Tensor and sequence parallelism (with FSDP2, activation checkpointing and compile) against the single-process
run: the same global batch and seed, so every step's fp32 loss must match within 1e-5, for every placement."""

from __future__ import annotations

import pytest
import torch
from helpers import TrainedRuns, assert_same_losses, diagnostic_rows, native_model, resume_copy, state_counts
from torch.utils._python_dispatch import TorchDispatchMode

from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer
from normtron.parallel.parallelize import apply_activation_checkpointing

STEPS = ("training.steps=8", "checkpoint.every=4", "eval.every=4", "checkpoint.keep_last=0")
TP = ("parallel.backend=fsdp", "parallel.tp=2")
PLACEMENTS = {
    "pre": [],
    "post": ["model.placement=post"],
    "peri": ["model.placement=peri", "model.norm=layernorm", "model.norm_bias=true", "model.qk_norm=true",
             "model.embed_norm=true", "model.parametrization=mup", "model.mup_base_dim=32"],  # µP's scales too
    "mix": ["model.placement=mix", "model.n_layers=4", "model.mix_alpha=0.5"],  # layers 0-1 post, 2-3 pre
    "ngpt": ["model.placement=ngpt", "training.weight_decay=0.1"],  # decay is ignored by nGPT's weights
    # Sub-LN's and NormFormer's inner norms over tp-sharded features, NormFormer's head gains sharded with the heads
    "zoo": ["model.layer_placements=subln,normformer", "model.normformer_residual_scale=true", "model.norm=layernorm"],
    "dyt": ["model.norm=dyt", "model.qk_norm=true", "model.embed_norm=true"],  # DyT everywhere + embedding scale
}


@pytest.fixture(scope="module")
def runs(shakespeare_data, tmp_path_factory):
    """runs(name, nproc, *overrides): a run directory, trained once per module on first use."""
    return TrainedRuns(shakespeare_data, tmp_path_factory.mktemp("tp"), *STEPS)


# (name, placement, ranks, overrides): each placement under TP=2, and the options composed with it
LAYOUTS = [
    ("tp2_sp_pre", "pre", 2, [*TP]),
    ("tp2_post_no_sp_compiled", "post", 2, [*TP, "parallel.sequence_parallel=false",
                                            "parallel.loss_parallel=false", "parallel.compile=true"]),
    ("tp2_sp_peri", "peri", 2, [*TP]),
    ("tp2_sp_subln_normformer", "zoo", 2, [*TP]),
    ("tp2_sp_dyt", "dyt", 2, [*TP]),
    ("tp2_sp_mix_selective_ac", "mix", 2, [*TP, "parallel.activation_checkpoint=selective"]),
    ("tp2_sp_ngpt", "ngpt", 2, [*TP]),  # sharded s_qk / s_u / s_v, renormalization of colwise and rowwise shards
    ("tp2_fsdp2_mix_full_ac_accum", "mix", 4, [*TP, "parallel.activation_checkpoint=full",
                                               "training.micro_batch_size=2"]),
]


@pytest.mark.parametrize("name,placement,nproc,overrides", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_tensor_parallel_matches_single_process(runs, name, placement, nproc, overrides):
    reference = runs(f"single_{placement}", 1, *PLACEMENTS[placement])
    assert_same_losses(runs(name, nproc, *PLACEMENTS[placement], *overrides), reference)


# Pipeline x tensor parallelism on 4 ranks (pp=2 stages of 2 layers, tp=2): (name, placement, overrides)
PP_TP = ("parallel.backend=fsdp", "parallel.pp=2", "parallel.tp=2")
PIPELINED = [
    ("pp2_tp2_mix_1f1b", "mix", [*PP_TP]),  # the stage boundary between layer 1 (post) and layer 2 (pre)
    ("pp2_tp2_peri_zbv", "peri4", [*PP_TP, "parallel.pp_schedule=ZBVZeroBubble"]),
    ("pp2_tp2_post_interleaved_no_sp", "post4", [*PP_TP, "parallel.pp_schedule=Interleaved1F1B",
                                                 "parallel.sequence_parallel=false", "training.micro_batch_size=2",
                                                 "parallel.activation_checkpoint=selective"]),
]
PLACEMENTS["peri4"] = [*PLACEMENTS["peri"], "model.n_layers=4"]
PLACEMENTS["post4"] = [*PLACEMENTS["post"], "model.n_layers=4"]


@pytest.mark.parametrize("name,placement,overrides", PIPELINED, ids=[p[0] for p in PIPELINED])
def test_pipeline_with_tensor_parallelism_matches_single_process(runs, name, placement, overrides):
    """Stages hand each other the (sequence-sharded) stream as plain tensors; each stage's blocks are split over
    tp as in the whole model."""
    reference = runs(f"single_{placement}", 1, *PLACEMENTS[placement])
    run_dir = runs(name, 4, *PLACEMENTS[placement], *overrides)
    assert "pp=2" in (run_dir / "train.log").read_text()
    assert_same_losses(run_dir, reference)


def test_pipeline_and_tensor_parallel_checkpoint_resumes_under_fsdp_and_in_one_process(runs):
    """Saved by PP2 x TP2 at step 4, resumed by FSDP2 on 2 ranks and by one process: steps 5-8 equal the
    uninterrupted single-process run (DCP keys and optimizer state do not depend on the layout)."""
    reference = runs("single_mix", 1, *PLACEMENTS["mix"])
    saved = runs("pp2_tp2_mix_1f1b", 4, *PLACEMENTS["mix"], *PP_TP)
    resume_copy(saved, "pp_tp_then_fsdp2")
    resume_copy(saved, "pp_tp_then_single")
    for run_dir in (runs("pp_tp_then_fsdp2", 2, *PLACEMENTS["mix"], "parallel.backend=fsdp"),
                    runs("pp_tp_then_single", 1, *PLACEMENTS["mix"])):
        assert "resumed from" in (run_dir / "train.log").read_text()
        assert_same_losses(run_dir, reference, steps=range(5, 9))


def test_fp8_composes_with_tensor_parallelism(runs):
    """FP8 (torchao Float8Linear, tensorwise) under TP=2: the column/row-parallel linears compute in float8 on their
    shards with scales taken over the whole tensor, so the losses follow the single-process FP8 run. Both compute in
    bf16 with matmul partial sums reduced in another order (bf16 keeps 8 bits: 2^-9 relative per rounding), hence
    1e-3 rather than fp32's 1e-5."""
    fp8 = ("training.precision=fp8",)
    reference = runs("single_fp8", 1, *fp8)
    run_dir = runs("tp2_sp_fp8", 2, *fp8, *TP)
    assert "precision fp8 tensorwise: 14 of 15 linears in fp8" in (run_dir / "train.log").read_text()
    assert_same_losses(run_dir, reference, rel=1e-3)


def test_each_rank_holds_its_tensor_parallel_share(runs):
    """Under TP2 x FSDP2 each of the 4 ranks holds about a quarter of the parameters and of Adam's state (norm
    weights are replicated over tp, so a little more)."""
    (total,), _ = state_counts(runs("single_mix", 1, *PLACEMENTS["mix"]))
    params, optim = state_counts(runs("tp2_fsdp2_mix_full_ac_accum", 4, *PLACEMENTS["mix"], *LAYOUTS[-1][3]))
    assert len(params) == 4
    for held in params:
        assert total / 4 <= held <= total / 4 * 1.05, (held, total)
    assert optim == [2 * p for p in params]


def test_diagnostics_under_tensor_parallelism_equal_single_process(runs):
    """Per-layer diagnostics gather the sequence-sharded stream and reduce tp-sharded and replicated gradients
    each once: every logged value equals the single-process run's."""
    single = diagnostic_rows(runs("single_peri", 1, *PLACEMENTS["peri"]))
    sharded = diagnostic_rows(runs("tp2_sp_peri", 2, *PLACEMENTS["peri"], *TP))
    assert single and [r["step"] for r in single] == [r["step"] for r in sharded]
    for want, got in zip(single, sharded):
        for key in ("layer_grad_norm", "attn_grad_norm", "mlp_grad_norm", "update_ratio", "resid_rms",
                    "resid_var", "max_act", "max_attn_logit"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (want["step"], key)


def test_dyt_alphas_in_diagnostics_equal_the_checkpoint_under_tensor_parallelism(runs):
    """The last diagnostics row's per-layer DyT alphas (2-norm per block side) are the saved model's, and the
    TP=2 run logs the single-process run's values."""
    single_dir = runs("single_dyt", 1, *PLACEMENTS["dyt"])
    single, sharded = diagnostic_rows(single_dir), diagnostic_rows(runs("tp2_sp_dyt", 2, *PLACEMENTS["dyt"], *TP))
    model = native_model(single_dir / "checkpoints" / "step_00000008")
    for i, block in enumerate(model.layers.values()):
        for key, norms in (("attn_dyt_alpha", (block.attention_norms.input, block.attention.q_norm,
                                               block.attention.k_norm)), ("mlp_dyt_alpha", (block.ffn_norms.input,))):
            want = sum(n.alpha.item() ** 2 for n in norms) ** 0.5
            assert single[-1][key][i] == pytest.approx(want, rel=1e-6)
    for want, got in zip(single, sharded, strict=True):
        for key in ("attn_dyt_alpha", "mlp_dyt_alpha"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (want["step"], key)


def test_tensor_parallel_checkpoint_resumes_in_other_layouts(runs):
    """DCP keys do not depend on the layout: TP2 x FSDP2 steps 1-4, then one process for steps 5-8."""
    overrides = (*PLACEMENTS["mix"], *LAYOUTS[-1][3])
    reference, saved = runs("single_mix", 1, *PLACEMENTS["mix"]), runs("tp2_fsdp2_mix_full_ac_accum", 4, *overrides)
    resume_copy(saved, "tp_then_single")
    for run_dir in (runs("tp_then_single", 1, *PLACEMENTS["mix"]),):
        assert "resumed from" in (run_dir / "train.log").read_text()
        assert_same_losses(run_dir, reference, steps=range(5, 9))


MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


class CountOps(TorchDispatchMode):
    """Counts the matmuls and the other ops that run (a real dispatch mode: every aten op passes through it)."""

    def __init__(self):
        super().__init__()
        self.matmuls = self.others = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.matmuls += 1
        else:
            self.others += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_activation_checkpointing_recomputes_what_its_mode_says(mode):
    """Same gradients and state-dict names as without checkpointing; `full` re-runs every block's matmuls in
    backward, `selective` keeps their outputs and re-runs only cheaper ops."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_hidden_dim=128, vocab_size=97, max_seq_len=16)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))

    def backward_ops(model):
        loss = model(tokens).float().logsumexp(-1).mean()
        with CountOps() as counter:
            loss.backward()
        plain = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}
        return counter, plain

    baseline = Transformer(cfg)
    baseline.init_weights(seed=1)
    model = Transformer(cfg)
    apply_activation_checkpointing(model, mode)
    model.init_weights(seed=1)  # wrapper names are not part of the seeds: the same weights as the baseline
    assert list(model.state_dict()) == list(baseline.state_dict())
    base, base_grads = backward_ops(baseline)
    ops, grads = backward_ops(model)
    assert set(grads) == set(base_grads)
    for name, grad in base_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    recomputed_matmuls, recomputed_others = ops.matmuls - base.matmuls, ops.others - base.others
    # q, k, v, o, gate, up of each block (attention runs in SDPA); not down, whose output backward does not need:
    # the recomputation stops once it has every tensor backward uses
    blocks_matmuls = 6 * cfg.n_layers
    assert recomputed_matmuls == {"none": 0, "full": blocks_matmuls, "selective": 0}[mode], (mode, ops.matmuls)
    assert (recomputed_others > 0) == (mode != "none"), (mode, ops.others, base.others)
