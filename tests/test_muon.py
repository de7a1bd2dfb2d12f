"""training.optimizer=muon: the update against a float64 Newton-Schulz written here and against torch.optim.Muon
(with torch.optim.AdamW for the rest) in one process; FSDP2, TP=2 and PP=2 equal to one process at every step, each
rank orthogonalizing only its share of the matrices; resume bitwise and across layouts."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import MICRO_MODEL, REPO, TINY, TrainedRuns, assert_same_losses, read_metrics, resume_copy, run_cli

from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer
from normtron.trainer.config import TrainingConfig, load_config, validate
from normtron.trainer.errors import UserError
from normtron.trainer.muon import MuonWithAdamW
from normtron.trainer.optim import build_optimizer

# Keller Jordan's quintic coefficients (github.com/KellerJordan/Muon, muon.py), written out independently.
A, B, C = 3.4445, -4.7750, 2.0315
HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def newton_schulz_float64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape,adjust,ns_dtype,tolerance", [((24, 40), "match_rms_adamw", "bf16", 0.03),
                                                              ((40, 24), "original", "bf16", 0.03),
                                                              ((40, 24), "match_rms_adamw", "fp32", 1e-4)])
def test_update_matches_float64_newton_schulz(shape, adjust, ns_dtype, tolerance):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    grads = [torch.randn(shape), torch.randn(shape)]
    lr, wd, mu = 0.02, 0.1, 0.95
    opt = MuonWithAdamW([{"params": [weight], "name": "muon", "muon": True, "lr": lr, "momentum": mu,
                          "nesterov": True, "ns_steps": 5, "ns_coefficients": (A, B, C), "eps": 1e-7,
                          "adjust_lr_fn": adjust, "weight_decay": wd, "ns_dtype": ns_dtype}])
    rows, cols = shape
    scale = 0.2 * math.sqrt(max(rows, cols)) if adjust == "match_rms_adamw" else math.sqrt(max(1, rows / cols))
    w, buf = weight.detach().double().clone(), torch.zeros(shape, dtype=torch.float64)
    for g in grads:
        weight.grad = g.clone()
        opt.step()
        buf = mu * buf + (1 - mu) * g.double()
        nesterov = g.double() + mu * (buf - g.double())
        w = w * (1 - lr * wd) - lr * scale * newton_schulz_float64(nesterov)
        # Entries of the orthogonalized update are ~1/sqrt(40): bf16 iterations may be off by a few roundings.
        assert (weight.detach().double() - w).abs().max() < lr * scale * tolerance
    assert opt.newton_schulz_calls == 1
    ortho = newton_schulz_float64(torch.randn(shape))  # the iteration itself: singular values in the known band
    assert torch.linalg.svdvals(ortho).min() > 0.5 and torch.linalg.svdvals(ortho).max() < 1.3


def test_one_process_equals_torch_optim_muon_with_adamw():
    """Bit-for-bit the pair a user would write: torch.optim.Muon on the blocks' projections, torch.optim.AdamW on
    embeddings, head (decay) and norms (no decay); the config's lr, momentum, weight decay and lr adjustment."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, vocab_size=96,
                      max_seq_len=32, tie_embeddings=False)
    model = Transformer(cfg)
    model.init_weights(seed=1)
    reference = copy.deepcopy(model)
    training = TrainingConfig(lr=3e-3, weight_decay=0.1, optimizer="muon", muon_lr=0.02, muon_momentum=0.9,
                              muon_adjust_lr_fn="original", muon_weight_decay=0.05)
    ours = build_optimizer(model, training)
    named = dict(reference.named_parameters())
    hidden = [p for n, p in named.items() if n.split(".")[-2] in HIDDEN]
    head, rest = [named["output.weight"]], [p for n, p in named.items() if n.split(".")[-2] not in HIDDEN
                                           and n != "output.weight"]
    assert len(hidden) == 14 and len(hidden) + len(head) + len(rest) == len(named)
    muon = torch.optim.Muon(hidden, lr=0.02, momentum=0.9, weight_decay=0.05, adjust_lr_fn="original")
    adamw = torch.optim.AdamW([{"params": head, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                              lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    torch.manual_seed(2)
    for _ in range(3):
        tokens = torch.randint(0, 96, (4, 17))
        for net in (model, reference):
            torch.nn.functional.cross_entropy(net(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        ours.step(), muon.step(), adamw.step()
        ours.zero_grad(), muon.zero_grad(), adamw.zero_grad()
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(got, want), name
    assert ours.newton_schulz_calls == 14


# --- Distributed: one torchrun launch per layout, 6 steps each ------------------------------------------------

STEPS = ("training.steps=6", "checkpoint.every=3", "eval.every=3", "checkpoint.keep_last=0",
         "training.optimizer=muon", "training.muon_lr=0.02", "training.weight_decay=0.1",
         # fp32 Newton-Schulz: bf16 would round the (reduction-order) differences of the layouts' gradients apart
         "training.muon_ns_dtype=fp32")
FSDP = ("parallel.backend=fsdp",)
LAYOUTS = {  # name: (ranks, overrides)
    "fsdp2": (2, (*FSDP,)),
    "fsdp4": (4, (*FSDP,)),
    "fsdp2_tp2": (4, (*FSDP, "parallel.tp=2")),
    "pp2_fsdp2": (4, (*FSDP, "parallel.pp=2")),
}


@pytest.fixture(scope="module")
def runs(shakespeare_data, tmp_path_factory):
    return TrainedRuns(shakespeare_data, tmp_path_factory.mktemp("muon"), *STEPS)


def newton_schulz_calls(run_dir) -> list[int]:
    """Matrices each rank orthogonalized in the first step, as the run recorded them."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["newton_schulz_calls"] for r in rows if "newton_schulz_calls" in r)


def resume_in_one_process(run_dir, data) -> None:
    run_cli("train", TINY, f"data.dir={data}", f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}",
            *MICRO_MODEL, *STEPS)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sharded_muon_equals_one_process_and_splits_the_newton_schulz_work(runs, name):
    nproc, overrides = LAYOUTS[name]
    reference = runs("single", 1)
    run = runs(name, nproc, *overrides)
    assert_same_losses(run, reference)  # every step's loss and every evaluation within 1e-5 (fp32)
    assert newton_schulz_calls(reference) == [14]
    calls = newton_schulz_calls(run)
    # Every matrix orthogonalized exactly once (each stage's 7 under the pipeline), spread over the ranks that
    # hold its shards: nobody does all of them.
    assert sum(calls) == 14 and len(calls) == nproc and max(calls) <= 7 and min(calls) >= 1, calls
    if name != "pp2_fsdp2":
        assert max(calls) <= -(-14 // nproc) + 1, calls  # the ranks share 14 matrices (largest first, balanced)


def test_resume_is_bitwise(runs, shakespeare_data):
    whole = runs("single", 1)
    copy_dir = resume_copy(whole, "single_resumed", drop_step=6)
    resume_in_one_process(copy_dir, shakespeare_data)
    strip = lambda rows: [{k: v for k, v in r.items() if k in ("step", "loss", "lr", "grad_norm")} for r in rows]
    assert strip(read_metrics(copy_dir)[0]) == strip(read_metrics(whole)[0])


def test_sharded_checkpoint_resumes_in_one_process(runs, shakespeare_data):
    """The momentum buffers are DTensors like their parameters: DCP reshards them (4 shards -> 1)."""
    nproc, overrides = LAYOUTS["fsdp4"]
    copy_dir = resume_copy(runs("fsdp4", nproc, *overrides), "fsdp4_then_single", drop_step=6)
    resume_in_one_process(copy_dir, shakespeare_data)
    assert_same_losses(copy_dir, runs("single", 1), steps=(4, 5, 6))


def test_deepspeed_is_refused_in_one_line():
    with pytest.raises(UserError, match="training.optimizer=muon is not available with parallel.backend=deepspeed"):
        validate(load_config(None, ["training.optimizer=muon", "parallel.backend=deepspeed"]), world_size=2)


def test_sharded_step_is_torch_optim_muon_bit_for_bit_with_bf16():
    """The default bf16 iteration on matrices sharded over a 2 x 2 gloo mesh as FSDP2 over TP (colwise: strided
    shards; rowwise) and HSDP shard them, including uneven splits: each rank's shard after two steps equals the
    same block of torch.optim.Muon's whole-matrix result exactly; 5 matrices, each orthogonalized once per
    replica (HSDP: 2 ranks per replica)."""
    script = REPO / "tests" / "muon_exchange_ranks.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                             str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": equal=" in line)
    assert set(lines) == {"fsdp2 over tp colwise", "fsdp2 over tp rowwise", "hsdp"}, result.stdout
    for name, line in lines.items():
        assert line.startswith("equal=True"), (name, line)
        calls = json.loads(line.split("calls=")[1])  # per rank, per step
        for step in range(2):
            per_rank = [c[step] for c in calls]
            if name == "hsdp":  # replicas: mesh rows {0, 1} and {2, 3}, each sharing the 5
                assert per_rank[0] + per_rank[1] == 5 and per_rank[2] + per_rank[3] == 5, (name, calls)
            else:
                assert sum(per_rank) == 5 and max(per_rank) <= 2, (name, calls)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no gradients here
def test_muon_lr_follows_the_schedule_and_the_config_wins_on_resume():
    """The Muon group's peak lr is training.muon_lr on training.lr's schedule; after a checkpoint load the config's
    values (lr, muon_lr, momentum) replace those stored in the optimizer state."""
    from normtron.trainer.optim import apply_hyperparameters, apply_lr_schedule, build_lr_scheduler, lr_factor

    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden_dim=64, vocab_size=64,
                                    max_seq_len=16))
    model.init_weights(seed=0)
    cfg = TrainingConfig(lr=1e-3, optimizer="muon", muon_lr=0.02, warmup_steps=2, steps=10)
    opt = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(opt, cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert opt.param_groups[0]["name"] == "decay" and set(by_name) == {"decay", "no_decay", "muon"}
    for step in range(4):
        assert by_name["muon"]["lr"] == pytest.approx(0.02 * lr_factor(step, cfg))
        assert by_name["decay"]["lr"] == pytest.approx(1e-3 * lr_factor(step, cfg))
        scheduler.step()
    state = opt.state_dict()
    resumed_cfg = TrainingConfig(lr=2e-3, optimizer="muon", muon_lr=0.05, muon_momentum=0.8, warmup_steps=2,
                                 steps=10)
    resumed = build_optimizer(model, cfg)
    resumed.load_state_dict(state)
    apply_hyperparameters(resumed, resumed_cfg)
    apply_lr_schedule(resumed, scheduler, resumed_cfg)
    by_name = {g["name"]: g for g in resumed.param_groups}
    assert by_name["muon"]["lr"] == pytest.approx(0.05 * lr_factor(4, resumed_cfg))
    assert by_name["muon"]["momentum"] == 0.8
    assert by_name["no_decay"]["lr"] == pytest.approx(2e-3 * lr_factor(4, resumed_cfg))
    linked = resumed.adamw.param_groups
    assert linked[0] is by_name["decay"] and linked[1] is by_name["no_decay"] and resumed.adamw.state is resumed.state
