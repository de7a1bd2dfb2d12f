"""`normtron plan`: parameter counts against the model's own tensors, model-state memory against the README's ZeRO
table (bench/zero_memory.py's measurements and the ZeRO paper's formulas), activation and loss memory against a
measured CPU training step (bench/plan_accuracy.py), the roofline's arithmetic, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from normtron.models.transformer import count_parameters
from normtron.parallel.mesh import ParallelDims
from tests.helpers import MICRO_MODEL, REPO, TINY, run_cli
from normtron.trainer.cli import main
from normtron.trainer.config import load_config
from normtron.trainer.plan import format_plan, make_plan, search
from normtron.trainer.plan.gpus import GPUS
from normtron.trainer.plan.memory import DEEPSPEED_BUCKET, DEEPSPEED_MAX_LIVE, count_params, rank_memory
from normtron.trainer.train import build_model_on_meta

SEVEN_B = str(REPO / "configs" / "7b.yaml")


@pytest.mark.parametrize("extra", [
    [],
    ["model.placement=peri", "model.norm=layernorm", "model.qk_norm=true", "model.tie_embeddings=true"],
    ["model.placement=mix", "model.norm=dyt", "model.n_kv_heads=1"],
])
def test_parameter_count_equals_the_model_numel(extra):
    cfg = load_config(None, ["model.dim=96", "model.n_layers=3", "model.n_heads=6", "model.n_kv_heads=2",
                             "model.vocab_size=1000", *extra])
    assert count_params(cfg).total == count_parameters(build_model_on_meta(cfg))


def test_seven_b_is_llama_2_7b():
    # Llama-2-7B's published parameter count (the Hugging Face model's num_parameters()): 6,738,415,616
    assert count_params(load_config(SEVEN_B, [])).total == 6_738_415_616


def _readme_zero_table() -> list[dict]:
    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| (ddp|zero1|zero2|zero3|fsdp) \| (\d) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \|", text,
                      re.M)
    assert len(rows) == 15, "the README's ZeRO memory table moved or changed shape"
    return [{"backend": b, "n": int(n), "measured": float(m), "analytic": float(a)} for b, n, m, a in rows]


def test_model_states_agree_with_the_readme_zero_table():
    """bench/zero_memory.py's model (46.9M parameters, bf16, fp32 Adam): the planner's parameters + gradients +
    optimizer state per rank equal the table's analytic MiB (the ZeRO paper's 16Ψ, 2Ψ+14Ψ/N, 16Ψ/N) for DDP,
    ZeRO-2/3 and FSDP2; ZeRO-1 is planned as DeepSpeed runs it (on its stage-2 optimizer) and matches the
    table's measurement within 3%, where the paper's 4Ψ+12Ψ/N is 9-19% above it."""
    sys.path.insert(0, str(REPO / "bench"))
    from zero_memory import MODEL
    for row in _readme_zero_table():
        backend = {"ddp": ["parallel.backend=ddp"], "fsdp": ["parallel.backend=fsdp"]}.get(
            row["backend"], ["parallel.backend=deepspeed", f"parallel.zero_stage={row['backend'][-1]}"])
        cfg = load_config(None, [*MODEL, *backend, f"training.batch_size={row['n']}"])
        mem = rank_memory(cfg, ParallelDims(1, 1, row["n"], 1), count_params(cfg))
        states = (mem.get("parameters") + mem.get("gradients") + mem.get("optimizer")) / 2**20
        if row["backend"] == "zero1" and row["n"] > 1:
            assert states == pytest.approx(row["measured"], rel=0.03), row
        else:
            assert states == pytest.approx(row["analytic"], abs=0.06), row


# One-process ZeRO run (gloo): DeepSpeed's own defaults, its reduce bucket as allocated (ZeRO-1/2 take theirs
# for each backward and release it after, so it is read just before), and under ZeRO-3 the bytes of the parameters
# it holds gathered at the end of the second step's forward (the first one gathers as it traces).
_ZERO3_PROBE = """
import json, os, socket, torch
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
from parallel.distributed import init_distributed
from trainer.config import load_config, parallel_dims
from trainer.engine import build_engine, init_model, parallelize_model
from trainer.train import build_model_on_meta
cfg = load_config(None, json.loads(os.environ["PROBE_OVERRIDES"]))
info = init_distributed(needs_process_group=True)
dims = parallel_dims(cfg, 1)
parallel = parallelize_model(cfg, build_model_on_meta(cfg), dims, None)
init_model(parallel, cfg, info.device, None)
engine = build_engine(cfg, parallel, dims, None, info)
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
module, optimizer = engine.engine.module, engine.engine.optimizer
gathered, buckets = [0], []
def read_and_release(release):
    def wrapped():
        buckets.append(sum(t.numel() * t.element_size() for b in optimizer.ipg_buckets.values() for t in b.buffer))
        release()
    return wrapped
if cfg.parallel.zero_stage == 3:
    buckets.append(sum(b.buffer.numel() * b.buffer.element_size() for b in optimizer.ipg_buckets.values()))
    module.output.register_forward_hook(lambda *_: gathered.append(sum(
        p.ds_numel * p.element_size() for p in module.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE)))
else:
    optimizer._release_ipg_buffers = read_and_release(optimizer._release_ipg_buffers)
tokens = torch.randint(0, cfg.model.vocab_size, (cfg.training.batch_size, cfg.data.seq_len + 1))
for _ in range(2):
    engine.forward_backward(tokens[:, :-1], tokens[:, 1:])
    engine.step(1.0)
defaults = DeepSpeedZeroConfig()
print(json.dumps({"reduce_bucket_size": defaults.reduce_bucket_size, "max_live": defaults.max_live_parameters,
                  "bucket": max(buckets), "gathered": gathered[-1]}))
os._exit(0)
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_buffers_are_the_ones_deepspeed_allocates(stage):
    """The planner's DeepSpeed buffers against a real engine: the reduce bucket, allocated whole (ZeRO-2: in bf16,
    the weights' dtype; ZeRO-3: in normtron's fp32 communication dtype), and under ZeRO-3 the parameters kept
    gathered from the forward for the backward (all of a model under stage3_max_live_parameters); DeepSpeed's
    config defaults. The bucket (30000 elements) is smaller than the model (~107k parameters)."""
    overrides = [*MICRO_MODEL, "model.vocab_size=256", "parallel.backend=deepspeed", f"parallel.zero_stage={stage}",
                 "training.precision=bf16", "deepspeed.zero_optimization.reduce_bucket_size=30000"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PROBE_OVERRIDES": json.dumps(overrides)}
    out = subprocess.run([sys.executable, "-c", _ZERO3_PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    deepspeed = json.loads(out.strip().splitlines()[-1])
    assert (DEEPSPEED_BUCKET, DEEPSPEED_MAX_LIVE) == (deepspeed["reduce_bucket_size"], deepspeed["max_live"])
    cfg = load_config(None, overrides)
    mem = rank_memory(cfg, ParallelDims(1, 1, 1, 1), count_params(cfg))
    assert mem.get("buffers: DeepSpeed reduce bucket") == deepspeed["bucket"] == 30000 * (4 if stage == 3 else 2)
    assert mem.get("buffers: DeepSpeed gathered parameters") == deepspeed["gathered"]  # 0 below ZeRO-3


def test_activation_and_loss_memory_match_a_measured_cpu_step():
    """Single-process rows of bench/plan_accuracy.py, measured in a fresh process each (resident-set high-water
    mark of a training step): no checkpointing, full checkpointing, and the chunked loss; within 10%."""
    rows = ["fp32-none-256", "fp32-full-512", "fp32-none-512-chunked"]
    out = subprocess.run([sys.executable, str(REPO / "bench" / "plan_accuracy.py"), "--rows", *rows],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    deviations = dict(re.findall(r"^\| (\S+) \| 1 \| 0 \| [\d.]+ \| [\d.]+ \| ([+-][\d.]+)% \|", out, re.M))
    assert sorted(deviations) == sorted(rows), out
    for row, deviation in deviations.items():
        assert abs(float(deviation)) <= 10, (row, out)


def test_memory_terms_follow_the_layout():
    cfg = load_config(SEVEN_B, ["parallel.backend=fsdp", "training.micro_batch_size=1"])
    plain = make_plan(cfg, 64, "h100").peak
    full = make_plan(load_config(SEVEN_B, ["parallel.backend=fsdp", "training.micro_batch_size=1",
                                           "parallel.activation_checkpoint=full"]), 64, "h100").peak
    # full checkpointing keeps each block's two inputs: 2 x dim x 2 bytes (bf16) per token and layer
    assert full.get("activations") < plain.get("activations") / 10
    # unchunked peak of the loss: 14 bytes per token and vocabulary entry in bf16 (bf16 logits, fp32 log-softmax,
    # two fp32 gradients); chunked: one chunk's logits plus the hidden-state and head-weight gradient buffers
    four = ["parallel.backend=fsdp", "training.micro_batch_size=4"]
    unchunked = make_plan(load_config(SEVEN_B, four), 64, "h100").peak
    chunked = make_plan(load_config(SEVEN_B, [*four, "training.loss_chunk_size=1024"]), 64, "h100").peak
    assert unchunked.get("logits") == 4 * 2048 * 32000 * 14
    assert chunked.get("logits") == 1024 * 32000 * (4 + 2 + 4) + 4 * 2048 * 4096 * 2 + 32000 * 4096 * 4
    # 1F1B: the first pipeline rank holds pp micro-batches, the last one
    pp = make_plan(load_config(SEVEN_B, ["parallel.backend=fsdp", "parallel.pp=4", "training.micro_batch_size=1"]),
                   64, "h100")
    first, last = pp.ranks[0], pp.ranks[-1]
    assert first.get("activations") == pytest.approx(4 * last.get("activations"), rel=0.05)
    assert sum(rank.params for rank in pp.ranks) == count_params(cfg).total  # the stages partition the model


def test_roofline_arithmetic_and_search():
    cfg = load_config(SEVEN_B, ["parallel.backend=fsdp", "parallel.activation_checkpoint=full",
                                "training.micro_batch_size=2"])
    plan = make_plan(cfg, 64, "h100")
    # compute: 6N + attention FLOPs per token over the rank's tokens, x4/3 for the recomputed forward, at 55% of
    # 989 TFLOP/s
    tokens = 1024 * 2048 / 64
    flops = (6 * (32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000) + 12 * 32 * 4096 * 2048) * tokens
    assert plan.time.compute_s == pytest.approx(flops * 4 / 3 / (989e12 * 0.55), rel=1e-9)
    assert 0 < plan.time.mfu < 0.55
    text = format_plan(plan)
    assert "assumptions:" in text and "MFU" in text
    found = search(load_config(TINY, ["model.vocab_size=512", "training.batch_size=16"]), 8, "h100", top=5)
    assert found and all(p.fits for p in found)
    speeds = [p.time.tokens_per_s for p in found]
    assert speeds == sorted(speeds, reverse=True)


@pytest.mark.parametrize("args, message", [
    (["plan", SEVEN_B, "--gpus", "64", "--gpu", "tpu"], "unknown GPU 'tpu'"),
    (["plan", SEVEN_B, "parallel.backend=fsdp", "parallel.tp=2", "--gpus", "3"], "must equal the 3"),
    (["plan", SEVEN_B, "parallel.backend=fsdp", "parallel.tp=3", "parallel.dp_shard=1", "--gpus", "3"],
     "does not divide by parallel.tp=3"),
    (["plan", SEVEN_B, "--gpus", "0"], "--gpus must be at least 1"),
])
def test_bad_requests_fail_with_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("normtron: error: ") and message in err, err


def test_cli_prints_the_plan_and_check_prints_the_memory_line(micro_args):
    out = run_cli("plan", SEVEN_B, "parallel.backend=fsdp", "--gpus", "64", "--gpu", "h200").stdout
    assert "H200" in out and "optimizer state" in out and "tokens/s" in out
    check = run_cli("train", "--check", TINY, *micro_args("check")).stdout
    assert "plan: predicted peak" in check and "a prediction" in check
    assert set(GPUS) >= {"h100", "h200", "a100"}


def test_exit_code_says_whether_the_plan_fits(capsys):
    """0 when the predicted peak is under 90% of the GPU's memory, 3 when not (scripts test it); --search: 0 when
    some layout fits."""
    assert main(["plan", SEVEN_B, "parallel.backend=fsdp", "--gpus", "64", "--gpu", "h200"]) == 0
    assert "fits under 90%" in capsys.readouterr().out
    assert main(["plan", SEVEN_B, "--gpus", "64"]) == 3  # DDP: every rank holds the 7B model states
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", SEVEN_B, "--gpus", "64", "--search"]) == 0


def test_overrides_may_follow_the_options(capsys):
    """`plan CFG --gpus 64 parallel.backend=fsdp --gpu h200` applies the override: FSDP2 fits where DDP does not."""
    assert main(["plan", SEVEN_B, "--gpus", "64", "parallel.backend=fsdp", "--gpu", "h200"]) == 0
    assert "fits under 90%" in capsys.readouterr().out
