"""Apply parallelism to the model from outside; the model itself never sees a mesh or a process group.

Every function here takes the model as built on the meta device plus a `materialize` callback (allocate on the
device, then initialize from the seed), and decides where in its sequence materialization belongs: DDP needs the
full model first, FSDP2 shards on meta and materializes only the shards.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from parallel.distributed import DistInfo


def apply_ddp(model: nn.Module, dist_info: DistInfo, materialize: Callable[[nn.Module], None]) -> nn.Module:
    """Replicate the model on every rank and all-reduce gradients (plain data parallelism)."""
    materialize(model)
    if dist_info.world_size == 1:
        return model
    device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    # The only buffer (the RoPE table) is computed identically everywhere: no need to broadcast it every forward.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, materialize: Callable[[nn.Module], None], *,
               param_dtype: torch.dtype | None, reshard_after_forward: bool, offload_params: bool) -> nn.Module:
    """FSDP2: shard every transformer block and then the rest (embeddings, final norm, head) over the
    data-parallel mesh dimensions, then materialize only the local shards.

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
    # Generated values are whole tensors; implicit replication lets each sharded parameter keep its own slice.
    with implicit_replication():
        materialize(model)
    return model


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
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
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
