"""Predicted step time and MFU from a roofline: matmul FLOPs at a stated fraction of the GPU's peak, collective
volumes over stated bandwidths, and the pipeline bubble of the schedule. Every assumption is a named constant here
and printed by `normtron plan`.

Overlap: FSDP2's and DeepSpeed's all-gathers and reduce-scatters and DDP's all-reduce run on their own stream
next to compute (prefetch, bucketing), so the step takes the longer of the two; tensor-parallel collectives and
pipeline sends sit on the critical path and add to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from normtron.models.transformer import flops_per_token
from normtron.parallel.mesh import ParallelDims
from normtron.parallel.pipeline import ZERO_BUBBLE_SCHEDULES, stages_per_rank
from normtron.trainer.config import Config, micro_batching, pipeline_stages
from normtron.trainer.plan.gpus import GPU
from normtron.trainer.plan.memory import checkpointed_layer_bytes_per_token, layer_activation_bytes_per_token

MATMUL_EFFICIENCY = 0.55     # achieved / peak dense bf16 on large transformer matmuls (torchtitan Llama-3 8B on
                             # H100 reports 38-45% MFU end to end; the matmuls alone run higher)
FP32_SLOWDOWN = 2.0          # fp32 runs as TF32 on tensor cores: half the bf16 rate
FP8_SPEEDUP = 1.28           # torchtitan's measured tokens/s gain of FP8 over bf16 (Llama-3.1-8B, H100)
BANDWIDTH_EFFICIENCY = 0.7   # achieved / datasheet bandwidth of NCCL ring collectives
HBM_EFFICIENCY = 0.8         # achieved / datasheet memory bandwidth of element-wise kernels
ZERO_BUBBLE_FRACTION = 1 / 3  # zero-bubble schedules leave about a third of 1F1B's bubble (Qi et al. 2023, ZB-H1)

ASSUMPTIONS = (f"matmuls at {MATMUL_EFFICIENCY:.0%} of peak dense bf16 (fp32 at 1/{FP32_SLOWDOWN:g}, fp8 "
               f"x{FP8_SPEEDUP}); selective checkpointing's element-wise recomputation reads and writes what it "
               f"recomputes once at {HBM_EFFICIENCY:.0%} of HBM bandwidth; collectives at {BANDWIDTH_EFFICIENCY:.0%} of NVLink inside a node and of the NIC "
               f"between nodes (ring volumes); FSDP/ZeRO/DDP traffic overlaps compute, tp and pp traffic does not; "
               f"pipeline bubble (pp-1)/(m+pp-1) for GPipe/1F1B, divided by the stages per rank for interleaved "
               f"schedules, x{ZERO_BUBBLE_FRACTION:.2f} more for zero-bubble ones")


@dataclass
class StepTime:
    compute_s: float
    overlapped_comm_s: float
    exposed_comm_s: float
    bubble_s: float
    step_s: float
    tokens_per_s: float          # whole job
    mfu: float


def _group_bandwidth(gpu: GPU, size: int, stride: int) -> float:
    """Bytes/s per GPU of a group of `size` ranks spaced `stride` apart in the (pp, dp_replicate, dp_shard, tp)
    order: NVLink when the whole group fits in one node, else the network."""
    gbps = gpu.nvlink_gbps if size * stride <= gpu.gpus_per_node else gpu.internode_gbps
    return gbps * 1e9 * BANDWIDTH_EFFICIENCY


def _ring(volume: float, size: int) -> float:
    """Bytes each rank sends in a ring all-gather / reduce-scatter of `volume` total bytes."""
    return volume * (size - 1) / size if size > 1 else 0.0


def step_time(cfg: Config, dims: ParallelDims, gpu: GPU, params_per_rank: float) -> StepTime:
    p, t, m = cfg.parallel, cfg.training, cfg.model
    seq = cfg.data.seq_len
    micro, n_micro = micro_batching(t, dims.dp_size, pipeline_stages(cfg))
    tokens_per_rank = t.batch_size * seq / dims.dp_size
    model_flops = flops_per_token(m, seq) * tokens_per_rank / (dims.tp * dims.pp)
    # full checkpointing re-runs each block's forward (+1/3 of its FLOPs; the head is not re-run)
    recompute = 1 + (1 / 3 if p.activation_checkpoint == "full" else 0)
    rate = gpu.bf16_tflops * 1e12 * MATMUL_EFFICIENCY
    rate = rate / FP32_SLOWDOWN if t.precision == "fp32" else rate * (FP8_SPEEDUP if t.precision == "fp8" else 1)
    compute = model_flops * recompute / rate
    if p.activation_checkpoint == "selective" and gpu.hbm_gbps:
        remade = layer_activation_bytes_per_token(cfg, dims) - checkpointed_layer_bytes_per_token(cfg, dims)
        compute += 2 * remade * tokens_per_rank * m.n_layers / dims.pp / (gpu.hbm_gbps * 1e9 * HBM_EFFICIENCY)

    grad_bytes, weight_bytes = 4, (2 if t.precision != "fp32" else 4)
    if t.precision == "fp8" and p.backend == "fsdp" and cfg.training.fp8_recipe == "tensorwise":
        weight_bytes = 1
    dp_bw = _group_bandwidth(gpu, dims.dp_shard, dims.tp)
    overlapped = 0.0
    if p.backend == "ddp" or (p.backend == "deepspeed" and p.zero_stage == 0):
        overlapped = 2 * _ring(grad_bytes * params_per_rank, dims.dp_size) / dp_bw
    elif p.backend == "deepspeed":
        gathers = 2 if p.zero_stage == 3 else 1  # ZeRO-3 gathers in forward and backward, 1/2 after the step
        per_step = _ring(grad_bytes * params_per_rank, dims.dp_size) + gathers * _ring(
            weight_bytes * params_per_rank, dims.dp_size) * (n_micro if p.zero_stage == 3 else 1)
        overlapped = per_step / dp_bw
    else:  # FSDP2: gathers every micro-batch (twice with resharding), reduce-scatters once per step
        gathers = 2 if p.reshard_after_forward else 1
        overlapped = (gathers * n_micro * _ring(weight_bytes * params_per_rank, dims.dp_shard)
                      + _ring(grad_bytes * params_per_rank, dims.dp_shard)) / dp_bw
        if dims.dp_replicate > 1:  # HSDP: all-reduce the shard's gradients across replicas
            rep_bw = _group_bandwidth(gpu, dims.dp_replicate, dims.dp_shard * dims.tp)
            overlapped += 2 * _ring(grad_bytes * params_per_rank / dims.dp_shard, dims.dp_replicate) / rep_bw

    exposed = 0.0
    act_bytes = 4 if t.precision == "fp32" else 2
    layers_here = m.n_layers / dims.pp
    if dims.tp > 1:  # per block: 2 all-gathers + 2 reduce-scatters (or 2 all-reduces) forward, as many backward
        tp_bw = _group_bandwidth(gpu, dims.tp, 1)
        passes = 2 + (1 if p.activation_checkpoint == "full" else 0)
        per_block = 2 * 2 * _ring(micro * seq * m.dim * act_bytes, dims.tp) * passes
        exposed += n_micro * layers_here * per_block / tp_bw
    bubble = 0.0
    if dims.pp > 1:
        pp_bw = _group_bandwidth(gpu, dims.pp, dims.dp_size * dims.tp)
        v = stages_per_rank(p.pp_schedule, p.pp_stages_per_rank)
        exposed += 2 * n_micro * v * micro * seq * m.dim * act_bytes / dims.tp / pp_bw
        bubble_fraction = (dims.pp - 1) / (n_micro + dims.pp - 1)
        if p.pp_schedule not in ("GPipe", "1F1B"):
            bubble_fraction /= v
        if p.pp_schedule in ZERO_BUBBLE_SCHEDULES:
            bubble_fraction *= ZERO_BUBBLE_FRACTION
        busy = max(compute, overlapped) + exposed
        bubble = busy * bubble_fraction / (1 - bubble_fraction)
    step = max(compute, overlapped) + exposed + bubble
    tokens_per_s = t.batch_size * seq / step
    mfu = flops_per_token(m, seq) * tokens_per_s / (dims.world_size * gpu.bf16_tflops * 1e12)
    return StepTime(compute, overlapped, exposed, bubble, step, tokens_per_s, mfu)
