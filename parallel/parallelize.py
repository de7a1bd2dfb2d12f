"""Apply parallelism to the model from outside; the model itself never sees a mesh or a process group.

`parallelize()` is the one place the strategies are composed, for every backend, in torchtitan's order: FP8
conversion -> tensor parallelism -> activation checkpointing -> compile -> FSDP2 or DDP, after the split into
pipeline stages. Everything happens on the meta device; the trainer then materializes and initializes the result
once (FSDP2 allocates only the local shards; DDP, through `replicate`, synchronizes at the first forward).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.distributed._composable.replicate import DDP, replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from normtron.parallel.config import ParallelConfig
from normtron.parallel.float8 import apply_float8, uses_float8_all_gather
from normtron.parallel.mesh import ParallelDims
from normtron.parallel.pipeline import (ZERO_BUBBLE_SCHEDULES, layers_per_stage, pipeline_part, stage_indices,
                               stages_per_rank)
from normtron.parallel.tensor_parallel import apply_tp

LOG = logging.getLogger("normtron")


@dataclass(frozen=True)
class Precision:
    """What of training.* the composition needs: the compute precision and the FP8 recipe."""
    precision: str = "fp32"  # fp32 | bf16 | fp8
    fp8_recipe: str = "tensorwise"
    fp8_emulate: bool = False


@dataclass
class ParallelModel:
    """What this rank runs: the whole model, or its pipeline stages (`parts[i]` is stage `stages[i]`)."""
    parts: list[nn.Module]
    stages: list[int]
    n_stages: int
    cfg: ParallelConfig  # as applied (a zero-bubble schedule keeps parameters gathered)

    @property
    def model(self) -> nn.Module:
        return self.parts[0]


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None, cfg: ParallelConfig,
                precision: Precision = Precision(), loss_parallel: bool = False) -> ParallelModel:
    """Apply parallel.* to the meta-device model: FP8 conversion, the pipeline split into this rank's stages, then
    to the model (or each stage) tensor parallelism, activation checkpointing, compile and FSDP2 (backend fsdp) or
    DDP (backend ddp over several ranks). Backend deepspeed stops before data parallelism: DeepSpeed wraps the
    initialized model with its optimizer (parallel/zero.py). `mesh` is None except for backend fsdp."""
    if precision.precision == "fp8":  # swaps linears on meta, before any wrapper (as torchtitan's model converters)
        apply_float8(model, precision.fp8_recipe, emulate=precision.fp8_emulate,
                     fsdp_float8_all_gather=uses_float8_all_gather(precision.precision, precision.fp8_recipe,
                                                                   cfg.backend, dims.dp_shard))
    parts, stages, n_stages = [model], [0], 1
    if dims.pp > 1:
        n_local = stages_per_rank(cfg.pp_schedule, cfg.pp_stages_per_rank)
        n_stages = dims.pp * n_local
        counts = layers_per_stage(len(model.layers), n_stages, cfg.pp_layers)
        stages = stage_indices(mesh["pp"].get_local_rank(), dims.pp, n_local, cfg.pp_schedule)
        parts = [pipeline_part(model, stage, counts) for stage in stages]
        if cfg.pp_schedule in ZERO_BUBBLE_SCHEDULES and cfg.reshard_after_forward:
            # With FSDP2 resharding between a micro-batch's input-gradient and weight-gradient steps, torch 2.13
            # computes wrong weight gradients (measured against one process): keep the stage's parameters gathered.
            LOG.info(f"parallel.pp_schedule={cfg.pp_schedule}: parameters stay gathered from forward to backward "
                     f"(reshard_after_forward=false), which its split backward needs under FSDP2")
            cfg = dataclasses.replace(cfg, reshard_after_forward=False)
    for part in parts:
        if dims.tp > 1:
            apply_tp(part, mesh["tp"], cfg.sequence_parallel, loss_parallel)
        apply_activation_checkpointing(part, cfg.activation_checkpoint)
        if cfg.compile:
            apply_compile(part)
        if cfg.backend == "fsdp":
            apply_fsdp(part, mesh, param_dtype=torch.bfloat16 if precision.precision in ("bf16", "fp8") else None,
                       reshard_after_forward=cfg.reshard_after_forward, offload_params=cfg.offload_params)
        elif cfg.backend == "ddp" and dims.world_size > 1:
            apply_ddp(part)
    return ParallelModel(parts, stages, n_stages, cfg)


def apply_ddp(model: nn.Module) -> None:
    """Replicate the model on every rank and all-reduce gradients (plain data parallelism), as torchtitan: the
    composable `replicate` keeps the module and its parameter names, and builds its DistributedDataParallel at the
    first forward, once the model is materialized (rank 0's initial weights are broadcast then)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    # The only buffer (the RoPE table) is computed identically everywhere: no need to broadcast it every forward.
    # torch 2.13 deprecated DDP's broadcast_buffers (a FutureWarning per rank) for forward_sync_buffers.
    ddp_args = inspect.signature(DistributedDataParallel.__init__).parameters
    replicate(model, device_id=device,
              **{"forward_sync_buffers" if "forward_sync_buffers" in ddp_args else "broadcast_buffers": False})


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype | None, reshard_after_forward: bool,
               offload_params: bool) -> None:
    """FSDP2: shard every transformer block and then the rest (embeddings, final norm, head) over the
    data-parallel mesh dimensions, on the meta device (materializing then allocates only the local shards).

    Master weights, gradients and optimizer state stay fp32 and sharded; `param_dtype` (bf16) is what the gathered
    parameters are cast to for compute, and gradients are reduced in fp32. With both dp_replicate and dp_shard > 1
    the 2-D mesh gives HSDP: shard within a group, all-reduce across groups.
    """
    dp_mesh = mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]
    options = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward,
               "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)}
    if offload_params:
        options["offload_policy"] = CPUOffloadPolicy()
    for block in model.layers.values():
        fully_shard(block, **options)
    # The root's parameters are used first and last; resharding them after forward would only re-gather them.
    fully_shard(model, **{**options, "reshard_after_forward": False})


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute each block's activations in backward instead of keeping them: `full` keeps only the block inputs;
    `selective` also keeps the outputs of the matmuls and attention (the expensive ops) and recomputes the rest
    (norms, activations, RoPE, residual adds)."""
    if mode == "none":
        return
    options = {"preserve_rng_state": False}  # nothing in a block draws random numbers
    if mode == "selective":
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_expensive_ops)
    for name, block in model.layers.items():
        # The wrapper's prefix is stripped from state-dict keys, so checkpoints keep their names.
        model.layers[name] = checkpoint_wrapper(block, **options)


_EXPENSIVE_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                  torch.ops.aten._scaled_dot_product_flash_attention.default,
                  torch.ops.aten._scaled_dot_product_efficient_attention.default,
                  torch.ops.aten._scaled_dot_product_cudnn_attention.default,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}


def _save_expensive_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _EXPENSIVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (parameter names unchanged): blocks are identical, so one compiled graph
    serves them all, and compile time does not grow with depth."""
    for block in model.layers.values():
        block.compile()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduction inside this context when `enabled` is False (gradient accumulation)."""
    if enabled:
        yield
    elif isinstance(model, (FSDPModule, DDP)):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (over all shards) and return it as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
