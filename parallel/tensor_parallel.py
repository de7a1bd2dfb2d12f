"""Tensor (and sequence) parallelism with DTensor: Megatron's column/row split of every block, applied from outside.

The residual stream between the tensor-parallel matmuls is a DTensor on the tp mesh: sharded along the sequence with
sequence parallelism (`Shard(1)`), replicated without (`Replicate()`). Every norm that reads the stream gets its
weights replicated over tp, so the model's own norm code runs on the DTensor unchanged, wherever a placement puts
the norm:

    Pre-LN / input norms      on the stream before the attention / MLP input gathers it
    Peri-LN output norms      on the row-parallel output, after its reduce(-scatter), before the add
    Post-LN / Mix-LN norms    on the sum, after the add
    QK-norm                   per head, on each rank's local heads (the heads are sharded, the head_dim is whole)

DyT is a Norm here too: its scalar alpha is replicated with the weights, its gradient summed over tp.

Replicated norm weights that saw only a slice of the tokens get partial gradients; DTensor sums them over tp.
q/k/v and gate/up are column-parallel (heads and hidden units split), o and down row-parallel. The embedding is
split over the vocabulary, and so is the head, whose logits stay vocabulary-sharded for loss parallelism.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from models.norms import Norm


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool, loss_parallel: bool) -> None:
    """Shard `model` (the whole Transformer or a pipeline stage's part of it, still on the meta device) over
    `tp_mesh`. With `loss_parallel` the head returns vocabulary-sharded DTensor logits for
    `torch.distributed.tensor.parallel.loss_parallel`; otherwise full logits as a plain tensor."""
    stream = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, object] = {}
    if model.tok_embeddings is not None:
        # The embedding output leaves as a plain tensor and re-enters as a DTensor at the embedding norm (an identity
        # when there is none): its backward then reduces the stream's partial gradient (from the column-parallel
        # inputs) before the vocabulary-parallel embedding's own backward, which cannot take a partial one.
        # With DyT's learnable embedding scale, the stream re-enters at that scale instead (its replicated scalar then
        # gets its gradient summed over tp like the norm weights).
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
        for name in ("embed_scale", "embed_norm") if model.embed_scale is not None else ("embed_norm",):
            plan[name] = PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(stream,),
                                            use_local_output=False)
    else:  # a later pipeline stage receives the stream as a plain (local) tensor: make it a DTensor again
        parallelize_module(model, tp_mesh, PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(stream,),
                                                              use_local_output=False))
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1) if loss_parallel else
                                         Replicate(), use_local_output=not loss_parallel)
    else:  # pipeline stages hand plain tensors to each other
        parallelize_module(model, tp_mesh, PrepareModuleOutput(output_layouts=(stream,),
                                                               desired_output_layouts=(stream,),
                                                               use_local_output=True))
        # ... not a view of the DTensor's local tensor: zero-bubble schedules detach stage outputs in place.
        model.register_forward_hook(lambda module, args, output: output.clone() if output._is_view() else output)
    for block in model.layers.values():
        block_plan = {
            # Gather the stream once per sublayer (not once per projection).
            "attention": PrepareModuleInput(input_layouts=(stream, None), desired_input_layouts=(Replicate(), None),
                                            use_local_output=False),
            "attention.q_proj": ColwiseParallel(),
            "attention.k_proj": ColwiseParallel(),
            "attention.v_proj": ColwiseParallel(),
            "attention.o_proj": RowwiseParallel(output_layouts=stream, use_local_output=False),
            "feed_forward": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),),
                                               use_local_output=False),
            "feed_forward.gate_proj": ColwiseParallel(),
            "feed_forward.up_proj": ColwiseParallel(),
            "feed_forward.down_proj": RowwiseParallel(output_layouts=stream, use_local_output=False),
        }
        for qk in ("q_norm", "k_norm"):  # (batch, seq, local heads, head_dim): sharded on the heads, dim 2
            if isinstance(getattr(block.attention, qk), Norm):
                block_plan[f"attention.{qk}"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        parallelize_module(block, tp_mesh, block_plan)
    parallelize_module(model, tp_mesh, plan)
    if model.tok_embeddings is not None and model.embed_scale is not None:
        distribute_module(model.embed_scale, tp_mesh)  # replicate the scalar
    for name, norm in model.named_modules():
        if isinstance(norm, Norm):
            norm.kernels = "torch"  # the Triton kernels take plain tensors; DTensor shards the PyTorch ops
            if not name.endswith(("q_norm", "k_norm")):
                distribute_module(norm, tp_mesh)  # replicate the weights; the stream is a DTensor already
