"""`normtron plan`: per-rank memory (trainer/plan/memory.py) and step time (trainer/plan/roofline.py) of a config
on a number of GPUs of a kind (trainer/plan/gpus.py), and a search over the layouts that fit."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

from normtron.parallel.mesh import ParallelDims
from normtron.trainer.config import Config, micro_batching, parallel_dims, pipeline_stages, validate_pipeline, \
    validate_tensor_parallel
from normtron.trainer.errors import UserError
from normtron.trainer.plan.gpus import GPU, GPUS, lookup_gpu
from normtron.trainer.plan.memory import RankMemory, count_params, plan_memory
from normtron.trainer.plan.roofline import ASSUMPTIONS, StepTime, step_time

HEADROOM = 0.9  # a layout "fits" below 90% of the GPU's memory: allocator fragmentation, NCCL and CUDA context


@dataclass
class Plan:
    cfg: Config
    dims: ParallelDims
    gpu: GPU
    ranks: list[RankMemory]
    time: StepTime

    @property
    def peak(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= HEADROOM * self.gpu.memory_bytes


def check_model(cfg: Config) -> None:
    try:
        cfg.model.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    if not cfg.model.vocab_size:
        raise UserError("model.vocab_size is not set; the plan needs it (e.g. model.vocab_size=32000)")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")


def check_layout(cfg: Config, world_size: int) -> ParallelDims:
    """The checks of trainer/config.py that concern the layout (not the data, the devices here or installed
    packages): UserError naming the key when the degrees do not divide."""
    check_model(cfg)
    p = cfg.parallel
    if (p.tp > 1 or p.pp > 1) and p.backend != "fsdp":
        raise UserError(f"parallel.tp={p.tp} / parallel.pp={p.pp} need parallel.backend=fsdp")
    if p.backend != "deepspeed" and p.zero_stage:
        raise UserError(f"parallel.zero_stage={p.zero_stage} applies to parallel.backend=deepspeed")
    dims = parallel_dims(cfg, world_size)
    if p.backend != "fsdp" and dims.dp_replicate != 1:
        raise UserError(f"parallel.dp_replicate={p.dp_replicate} (HSDP) needs parallel.backend=fsdp")
    validate_tensor_parallel(cfg)
    validate_pipeline(cfg, dims)
    return dims


def make_plan(cfg: Config, world_size: int, gpu: GPU | str) -> Plan:
    gpu = lookup_gpu(gpu) if isinstance(gpu, str) else gpu
    dims = check_layout(cfg, world_size)
    ranks = plan_memory(cfg, dims)
    busiest = max(ranks, key=lambda r: r.params)
    return Plan(cfg, dims, gpu, ranks, step_time(cfg, dims, gpu, busiest.params))


def device_in_use() -> GPU:
    """The GPU kind this process runs on (CUDA device 0 matched by name), or the host: CPU memory, for `normtron
    train --check` on a machine without a known GPU."""
    import os

    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower()
        for key in sorted(GPUS, key=len, reverse=True):
            if key.split("-")[0] in name:
                return GPUS[key]
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return GPU("this machine's CPU (host memory)", host, 0.0, 0.0, 0.0)


def check_memory_line(cfg: Config, world_size: int) -> str:
    """The plan's memory line for `normtron train --check`: a prediction for the device in use."""
    gpu = device_in_use()
    dims = check_layout(cfg, world_size)
    ranks = plan_memory(cfg, dims)
    return memory_line(Plan(cfg, dims, gpu, ranks, None)) + " [a prediction, not a measurement; " \
        "`normtron plan` for the breakdown and other GPUs]"


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def describe_layout(cfg: Config, dims: ParallelDims) -> str:
    p = cfg.parallel
    backend = f"deepspeed ZeRO-{p.zero_stage}" if p.backend == "deepspeed" else p.backend
    micro, n_micro = micro_batching(cfg.training, dims.dp_size, pipeline_stages(cfg))
    parts = [backend, f"dp_replicate={dims.dp_replicate} dp_shard={dims.dp_shard} tp={dims.tp} pp={dims.pp}"]
    if dims.pp > 1:
        parts.append(p.pp_schedule)
    parts += [f"activation_checkpoint={p.activation_checkpoint}", f"micro_batch={micro} x {n_micro}",
              f"seq {cfg.data.seq_len}", cfg.training.precision]
    if cfg.training.loss_chunk_size:
        parts.append(f"loss_chunk_size={cfg.training.loss_chunk_size}")
    return ", ".join(parts)


def memory_line(plan: Plan) -> str:
    """One line: the busiest rank's predicted peak against the GPU's memory."""
    peak = plan.peak
    return (f"plan: predicted peak {gib(peak.total)} per rank on {plan.gpu.name} ({plan.gpu.memory_gib:.1f} GiB, "
            f"{'fits' if plan.fits else 'does NOT fit'} under {HEADROOM:.0%}): model states "
            f"{gib(peak.get('parameters') + peak.get('gradients') + peak.get('optimizer'))}, buffers "
            f"{gib(peak.get('buffers') + peak.get('FP8'))}, activations {gib(peak.get('activations'))}, logits/loss "
            f"{gib(peak.get('logits'))}")


def format_plan(plan: Plan) -> str:
    cfg, dims, t = plan.cfg, plan.dims, plan.time
    total = count_params(cfg).total
    lines = [f"plan for {dims.world_size} x {plan.gpu.name}: {total / 1e9:.3f}B parameters; "
             f"{describe_layout(cfg, dims)}"]
    for rank in plan.ranks:
        where = f"pipeline rank {rank.pp_rank}" if dims.pp > 1 else "each rank"
        lines.append(f"memory, {where} ({rank.params / 1e9:.3f}B parameters held):")
        for term in rank.terms:
            lines.append(f"  {term.name:<38} {gib(term.bytes):>12}   {term.note}")
        lines.append(f"  {'total':<38} {gib(rank.total):>12}   of {plan.gpu.memory_gib:.1f} GiB")
    lines.append(memory_line(plan))
    lines.append(f"step: {t.step_s:.3f} s predicted (compute {t.compute_s:.3f} s, overlapped data-parallel "
                 f"communication {t.overlapped_comm_s:.3f} s, exposed tp/pp communication {t.exposed_comm_s:.3f} s, "
                 f"pipeline bubble {t.bubble_s:.3f} s): {t.tokens_per_s:,.0f} tokens/s, MFU {t.mfu:.1%}")
    lines.append(f"assumptions: {ASSUMPTIONS}; fits = under {HEADROOM:.0%} of the GPU's memory")
    return "\n".join(lines)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(cfg: Config, world_size: int, gpu: GPU | str, top: int = 15) -> list[Plan]:
    """Every FSDP2 layout (dp_replicate x dp_shard x tp x pp over the ranks; tp within a node), activation
    checkpointing mode and micro-batch size that passes the config checks and fits, fastest first."""
    gpu = lookup_gpu(gpu) if isinstance(gpu, str) else gpu
    check_model(cfg)
    plans = []
    for tp, pp in itertools.product(_divisors(world_size), repeat=2):
        if tp > gpu.gpus_per_node or world_size % (tp * pp):
            continue
        dp = world_size // (tp * pp)
        replicas = sorted({1, *(r for r in _divisors(dp) if dp // r == gpu.gpus_per_node // tp)})
        for replicate, ac in itertools.product(replicas, ("none", "selective", "full")):
            local = cfg.training.batch_size // dp if cfg.training.batch_size % dp == 0 else 0
            for micro in (m for m in _divisors(local) if m <= 16):
                trial = copy.deepcopy(cfg)
                trial.parallel.backend, trial.parallel.zero_stage = "fsdp", 0
                trial.parallel.tp, trial.parallel.pp = tp, pp
                trial.parallel.dp_replicate, trial.parallel.dp_shard = replicate, dp // replicate
                trial.parallel.activation_checkpoint, trial.training.micro_batch_size = ac, micro
                trial.parallel.pp_layers = None
                try:
                    plan = make_plan(trial, world_size, gpu)
                except UserError:
                    continue
                if plan.fits:
                    plans.append(plan)
    return sorted(plans, key=lambda plan: (-plan.time.tokens_per_s, plan.peak.total))[:top]  # ties: less memory


def format_search(plans: list[Plan], world_size: int, gpu: GPU | str) -> str:
    gpu = lookup_gpu(gpu) if isinstance(gpu, str) else gpu
    if not plans:
        return f"no layout fits on {world_size} x {gpu.name} (under {HEADROOM:.0%} of its memory)"
    lines = [f"{'tokens/s':>12} {'MFU':>6} {'step s':>7} {'peak':>10}  layout"]
    for plan in plans:
        lines.append(f"{plan.time.tokens_per_s:>12,.0f} {plan.time.mfu:>6.1%} {plan.time.step_s:>7.2f} "
                     f"{gib(plan.peak.total):>10}  {describe_layout(plan.cfg, plan.dims)}")
    lines.append(f"assumptions: {ASSUMPTIONS}")
    return "\n".join(lines)
