"""Pipeline parallelism with torch.distributed.pipelining: split the meta-device model into stages, wrap each in a
PipelineStage, and run micro-batches through one of its schedules.

A stage is a copy of the whole model with the layers of other stages deleted from its `layers` ModuleDict, the
embedding only on the first stage and the final norm and head only on the last (the model's forward then takes /
returns hidden states). Parameter names stay those of the whole model, so each stage initializes exactly as the
whole model does (weights are seeded by name) and DCP checkpoints do not depend on the layout.

    single-stage schedules   GPipe, 1F1B                            rank r holds stage r
    multi-stage schedules    Interleaved1F1B, InterleavedZeroBubble  rank r holds stages r, r+pp, r+2pp, ...
                             ZBVZeroBubble                           rank r holds stages r and 2pp-1-r (a "V")
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

# torch.distributed.pipelining is imported where a schedule is built: it imports Triton, which must not be loaded
# before TRITON_INTERPRET is set (the config, which imports this module, is read first).
SCHEDULES = {"GPipe": "ScheduleGPipe", "1F1B": "Schedule1F1B", "Interleaved1F1B": "ScheduleInterleaved1F1B",
             "InterleavedZeroBubble": "ScheduleInterleavedZeroBubble", "ZBVZeroBubble": "ScheduleZBVZeroBubble"}
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
ZERO_BUBBLE_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble")  # backward split into input and weight steps


def stages_per_rank(schedule: str, configured: int | None) -> int:
    """Stages each rank holds: 1 for GPipe/1F1B, the configured number (default 2) for the multi-stage ones."""
    if schedule in SINGLE_STAGE_SCHEDULES:
        return configured or 1
    return configured or 2


def stage_indices(pp_rank: int, pp: int, n_local: int, schedule: str) -> list[int]:
    """The global stage indices rank `pp_rank` holds, in order."""
    if schedule == "ZBVZeroBubble":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(n_local)]


def layers_per_stage(n_layers: int, n_stages: int, explicit: list[int] | None = None) -> list[int]:
    """`explicit`, or the layers spread evenly with the remainder on the first stages (e.g. 8 over 3: 3, 3, 2)."""
    if explicit:
        return list(explicit)
    base, extra = divmod(n_layers, n_stages)
    return [base + (i < extra) for i in range(n_stages)]


def pipeline_part(model: nn.Module, stage: int, layer_counts: list[int]) -> nn.Module:
    """A deep copy of the (meta-device) model keeping only stage `stage`'s layers, with the embedding on the first
    stage and the final norm and head on the last."""
    start = sum(layer_counts[:stage])
    keep = {str(i) for i in range(start, start + layer_counts[stage])}
    part = copy.deepcopy(model)
    for name in list(part.layers):
        if name not in keep:
            del part.layers[name]
    if stage > 0:
        part.tok_embeddings = part.embed_scale = part.embed_norm = None
    if stage < len(layer_counts) - 1:
        part.norm = part.output = part.logit_scale = None
    return part


def merged_view(parts: list[nn.Module]) -> nn.Module:
    """One module over all of this rank's parts under the whole model's names (layers.N, tok_embeddings, ...), so
    one optimizer, state dict and parameter census cover them."""
    view = nn.Module()
    view.layers = nn.ModuleDict()
    # The whole model's declarations about its direct children (nGPT's hypersphere weights) hold for the view too.
    view.hypersphere_dims = {k: v for part in parts for k, v in getattr(part, "hypersphere_dims", {}).items()}
    for part in parts:
        for name, child in part.named_children():
            if name == "layers":
                view.layers.update(child)
            elif child is not None:
                setattr(view, name, child)
    return view


def build_schedule(parts: list[nn.Module], stages: list[int], n_stages: int, schedule: str, n_microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device,
                   group: dist.ProcessGroup):
    """PipelineStages for this rank's parts (shapes inferred from the first micro-batch) and the schedule over them.
    `loss_fn` returns each micro-batch's share of the step's objective, so the schedule does not rescale gradients."""
    from torch.distributed.pipelining import PipelineStage, schedules

    pipeline_stages = [PipelineStage(part, index, n_stages, device, group=group) for part, index in zip(parts, stages)]
    cls = getattr(schedules, SCHEDULES[schedule])
    if schedule in SINGLE_STAGE_SCHEDULES:
        return cls(pipeline_stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(pipeline_stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


def clip_grad_norm_pipelined(params: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup) -> torch.Tensor:
    """Clip by the global gradient norm over every stage: each rank's sum of squares (over its shards too, as
    clip_grad_norm_ does for DTensors), summed over the pipeline group. Returns the pre-clipping norm."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    squared = norm.float().pow(2)
    dist.all_reduce(squared, group=pp_group)
    norm = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
