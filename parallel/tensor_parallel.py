"""Tensor (and sequence) parallelism with DTensor: Megatron's column/row split of every block, applied from outside.

The residual stream between the tensor-parallel matmuls is a DTensor on the tp mesh: sharded along the sequence with
sequence parallelism (`Shard(1)`), replicated without (`Replicate()`). Every norm that reads the stream gets its
weights replicated over tp, so the model's own norm code runs on the DTensor unchanged, wherever a placement puts
the norm:

    Pre-LN / input norms      on the stream before the attention / MLP input gathers it
    Peri-LN output norms      on the row-parallel output, after its reduce(-scatter), before the add
    Post-LN / Mix-LN norms    on the sum, after the add
    QK-norm                   per head, on each rank's local heads (the heads are sharded, the head_dim is whole)
    nGPT's scaling vectors    s_qk, s_u, s_v sharded with the heads / hidden units they scale (on local tensors);
                              the eigen learning rates and s_z replicated, on the stream / logits DTensors
    inner norms (Sub-LN)      on the heads before o_proj / the hidden units before down_proj, which tp shards: the
                              norm runs on a DTensor sharded along its features, so its statistics are all-reduced
                              and it stays the full-width norm; its weights are sharded like those features
    head scales (NormFormer)  one gain per head, sharded with the heads

DyT is a Norm here too: its scalar alpha is replicated with the weights, its gradient summed over tp.

Replicated norm weights that saw only a slice of the tokens get partial gradients; DTensor sums them over tp.
q/k/v and gate/up are column-parallel (heads and hidden units split), o and down row-parallel. The embedding is
split over the vocabulary, and so is the head, whose logits stay vocabulary-sharded for loss parallelism.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from normtron.models.hypersphere import ScaledVector
from normtron.models.norms import Norm
from normtron.models.transformer import Gain


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
        for sublayer in (block.attention, block.feed_forward):
            if isinstance(sublayer.inner_norm, Norm):
                shard_features(sublayer.inner_norm, tp_mesh, feature_dim=2)  # (batch, seq, local features)
        if isinstance(block.attention.head_scale, Gain):
            shard_features(block.attention.head_scale, tp_mesh, feature_dim=2)  # (batch, seq, local heads, hd)
    parallelize_module(model, tp_mesh, plan)
    if model.tok_embeddings is not None and model.embed_scale is not None:
        distribute_module(model.embed_scale, tp_mesh)  # replicate the scalar
    for name, module in model.named_modules():
        if isinstance(module, Norm):
            module.kernels = "torch"  # the Triton kernels take plain tensors; DTensor shards the PyTorch ops
        if isinstance(module, (Norm, Gain)) and not isinstance(module.weight, DTensor):
            distribute_module(module, tp_mesh)  # replicate the weights; the stream is a DTensor already
        elif isinstance(module, ScaledVector):
            distribute_module(module, tp_mesh, _shard_vector if module.column_indexed else None)


def _shard_vector(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    """A column-indexed ScaledVector split like the projection outputs it scales (ColwiseParallel's Shard(0))."""
    module.weight = nn.Parameter(distribute_tensor(module.weight, mesh, [Shard(0)]))


def shard_features(module: nn.Module, tp_mesh: DeviceMesh, feature_dim: int) -> None:
    """Run `module` (an inner norm or the head gains, between a column- and a row-parallel matmul) on its input's
    tp-sharded features as a whole: its weights are split like those features, and it sees the local activation
    as a DTensor sharded on `feature_dim`, so a norm's mean over the features is reduced over tp (DTensor)."""
    def shard_params(name, mod, mesh):
        for key, param in list(mod.named_parameters(recurse=False)):
            mod.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)])))

    def to_dtensor(mod, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Shard(feature_dim)], run_check=False) for x in inputs)

    def to_local(mod, output, mesh):
        return output.redistribute(mesh, [Shard(feature_dim)]).to_local()

    distribute_module(module, tp_mesh, shard_params, to_dtensor, to_local)
