"""The training engine: the parallelized model with its optimizer and schedule, behind one small interface the
loop and the checkpointer use — micro_batch/backward/step, save/load — whichever backend runs it.

    ddp        materialize the whole model, wrap it in DistributedDataParallel; DCP checkpoints
    fsdp       FSDP2 shards on the meta device, then materializes only the shards; DCP checkpoints (reshardable)
               with parallel.pp > 1: PipelineEngine, this rank's pipeline stages, each parallelized the same way
    deepspeed  DeepSpeed's engine with ZeRO stage 0-3 around the same model and optimizer; DeepSpeed checkpoints
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.distributed.checkpoint.stateful import Stateful

from parallel.distributed import DistInfo
from parallel.float8 import apply_float8, precompute_float8_scales, uses_float8_all_gather
from parallel.mesh import ParallelDims
from parallel.parallelize import (apply_activation_checkpointing, apply_compile, apply_ddp, apply_fsdp,
                                  clip_grad_norm, gradient_sync)
from parallel.tensor_parallel import apply_tp
from parallel.pipeline import (ZERO_BUBBLE_SCHEDULES, build_schedule, clip_grad_norm_pipelined, layers_per_stage,
                               merged_view, pipeline_part, stage_indices, stages_per_rank)
from trainer.checkpoint import load_dcp, load_model_weights, save_dcp
from trainer.config import Config, deepspeed_config, micro_batching
from trainer.metrics import LOG
from trainer.optim import build_lr_scheduler, build_optimizer
from trainer.stability import z_loss


class TorchEngine:
    """A single process, DDP or FSDP2: torch optimizer, torch clipping, DCP checkpoints."""

    checkpoint_format = "dcp"

    def __init__(self, model: nn.Module, cfg: Config, after_step=None):
        self.model = model
        # Loss and backward run under loss_parallel() when the logits are vocabulary-sharded DTensors.
        self.loss_context = loss_parallel if cfg.parallel.backend == "fsdp" and uses_loss_parallel(cfg) else \
            contextlib.nullcontext
        self.optimizer = build_optimizer(model, cfg.training)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.training)
        self.after_step = after_step  # called with the model after each optimizer update (FP8 weight scales)

    def micro_batch(self, last: bool):
        """Context for one micro-batch's forward and backward: gradients are reduced only on the last one."""
        return gradient_sync(self.model, enabled=last)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self, max_norm: float, skip_nonfinite: bool = False) -> torch.Tensor:
        """Clip, update, advance the schedule; returns the pre-clipping global gradient norm. With
        `skip_nonfinite`, a non-finite norm drops the update (the norm is read: one host-device sync)."""
        grad_norm = self.clip(max_norm)
        if not skip_nonfinite or torch.isfinite(grad_norm).item():
            self.optimizer.step()
            if self.after_step is not None:
                self.after_step(self.model)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def clip(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm(self.model, max_norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def local_state_elements(self) -> tuple[int, int]:
        """(parameter, optimizer-state) elements this rank holds: a shard of each under FSDP2."""
        params = {id(p): p for p in self.model.parameters()}.values()
        return sum(local_tensor(p).numel() for p in params), optimizer_state_elements(self.optimizer)

    def save_checkpoint(self, path: Path, train_state: Stateful) -> None:
        save_dcp(path, self.model, self.optimizer, train_state)

    def load_checkpoint(self, path: Path, train_state: Stateful) -> None:
        load_dcp(path, self.model, self.optimizer, train_state)


class PipelineEngine(TorchEngine):
    """The fsdp backend with parallel.pp > 1: this rank's pipeline stages (each one parallelized like a whole
    model), one optimizer over them under the whole model's names, and the schedule that runs a step's
    micro-batches (the training.micro_batch_size pieces of the rank's batch) through every stage.

    `model` is a view of the parts under the whole model's parameter names: DCP checkpoints hold the same keys as
    any other layout, so they resume under FSDP2, DDP or one process and back."""

    def __init__(self, parts: list[nn.Module], stages: list[int], n_stages: int, cfg: Config, pp_mesh: DeviceMesh,
                 device: torch.device, n_microbatches: int, loss: Callable, z_loss: Callable, after_step=None):
        super().__init__(merged_view(parts), cfg, after_step)
        self.parts, self.device, self.group = parts, device, pp_mesh.get_group()
        self.has_first, self.has_last = 0 in stages, n_stages - 1 in stages
        self.n_microbatches, self.z_coefficient = n_microbatches, cfg.stability.z_loss
        self.cross_entropy, self.z_loss = loss, z_loss
        self.evaluating, self.recorded = False, []
        # torch 2.13's ZBVZeroBubble cannot run forward only (its eval still schedules input-gradient steps): it
        # evaluates with a backward whose gradients are dropped.
        self.forward_only_eval = cfg.parallel.pp_schedule != "ZBVZeroBubble"
        self.schedule = build_schedule(parts, stages, n_stages, cfg.parallel.pp_schedule, n_microbatches,
                                       self.micro_batch_loss, device, self.group)

    def infer_shapes(self, batch: int, seq_len: int) -> None:
        """One throw-away forward and backward on a batch of zeros: on its first run each stage infers its input and
        output shapes, running its layers on uninitialized tensors; done here, that never happens inside a real
        step (whose activations the diagnostics record)."""
        tokens = torch.zeros(batch, seq_len, dtype=torch.long)
        self.forward_backward(tokens, tokens)
        self.optimizer.zero_grad(set_to_none=True)

    def micro_batch_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Called by the schedule on the last stage for each micro-batch: its share of the step's objective, as the
        loop computes it without a pipeline (mean token cross entropy / micro-batches, plus the z-loss term);
        in evaluation the summed cross entropy. The cross entropy alone is recorded for the logged loss."""
        if self.evaluating:
            loss = self.cross_entropy(logits, targets, reduction="sum")
            self.recorded.append(loss)
            return loss
        loss = self.cross_entropy(logits, targets) / self.n_microbatches
        self.recorded.append(loss.detach())
        if self.z_coefficient:
            return loss + self.z_coefficient * self.z_loss(logits) / self.n_microbatches
        return loss

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward of the rank's batch through the pipeline; returns the mean token loss."""
        self.evaluating = False
        return self._run(self.schedule.step, inputs, targets)

    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed token cross entropy of a batch of training's shape (targets -100 are not counted)."""
        self.evaluating = True
        try:
            if not self.forward_only_eval:
                with torch.enable_grad():
                    return self._run(self.schedule.step, inputs, targets)
            return self._run(self.schedule.eval, inputs, targets)
        finally:
            self.evaluating = False
            if not self.forward_only_eval:
                self.optimizer.zero_grad(set_to_none=True)

    def _run(self, run: Callable, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.recorded = []
        args = (inputs.to(self.device, non_blocking=True),) if self.has_first else ()
        run(*args, target=targets.to(self.device, non_blocking=True) if self.has_last else None,
            return_outputs=False)
        # The last n: on its first call a stage infers its shapes from a forward (and loss) of its own. Only the rank
        # holding the last stage has the losses: a sum over the pipeline group gives them to every rank.
        recorded = self.recorded[-self.n_microbatches:]
        total = torch.stack(recorded).sum() if recorded else torch.zeros((), device=self.device)
        torch.distributed.all_reduce(total, group=self.group)
        return total

    def clip(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_pipelined(list(self.model.parameters()), max_norm, self.group)


def build_pipeline_engine(cfg: Config, model: nn.Module, mesh: DeviceMesh, dims: ParallelDims,
                          device: torch.device, after_step=None) -> PipelineEngine:
    """Split the meta-device model into this rank's stages, parallelize each, and build the schedule."""
    from trainer.train import cross_entropy  # the loop's own loss (imported here: the loop imports this module)

    p = cfg.parallel
    n_local = stages_per_rank(p.pp_schedule, p.pp_stages_per_rank)
    n_stages = p.pp * n_local
    counts = layers_per_stage(cfg.model.n_layers, n_stages, p.pp_layers)
    stages = stage_indices(mesh["pp"].get_local_rank(), p.pp, n_local, p.pp_schedule)
    if p.pp_schedule in ZERO_BUBBLE_SCHEDULES and p.reshard_after_forward:
        # With FSDP2 resharding between a micro-batch's input-gradient and weight-gradient steps, torch 2.13
        # computes wrong weight gradients (measured against one process): keep the stage's parameters gathered.
        LOG.info(f"parallel.pp_schedule={p.pp_schedule}: parameters stay gathered from forward to backward "
                 f"(reshard_after_forward=false), which its split backward needs under FSDP2")
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(p, reshard_after_forward=False))
    parts = [parallelize(pipeline_part(model, stage, counts), cfg, mesh, device) for stage in stages]
    micro_batch, n_microbatches = micro_batching(cfg.training, dims.dp_size, n_stages)
    engine = PipelineEngine(parts, stages, n_stages, cfg, mesh["pp"], device, n_microbatches, cross_entropy, z_loss,
                            after_step)
    engine.infer_shapes(micro_batch * n_microbatches, cfg.data.seq_len)
    return engine


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def optimizer_state_elements(optimizer: torch.optim.Optimizer) -> int:
    """Elements of the per-parameter optimizer state (Adam's two moments; scalar step counters not counted)."""
    return sum(local_tensor(value).numel() for state in optimizer.state.values() for value in state.values()
               if torch.is_tensor(value) and value.dim() > 0)


def materialize(model: nn.Module, device: torch.device, seed: int, buffer_device: torch.device | None = None) -> None:
    """Allocate the (possibly sharded) parameters on `device` and initialize them from the run seed."""
    # Swap parameters in place so that a tied head still shares the embedding's parameter after to_empty().
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    model.init_weights(seed=seed, buffer_device=buffer_device or device)


def build_engine(cfg: Config, model: nn.Module, dist_info: DistInfo, init_from: Path | None = None):
    """Parallelize the meta-device model as `parallel.*` says, materialize it (from the weights of the checkpoint
    `init_from`, if given), and pair it with its optimizer."""
    p, t, device = cfg.parallel, cfg.training, dist_info.device
    dims = ParallelDims.resolve(p.pp, p.dp_replicate, p.dp_shard, p.tp, dist_info.world_size)
    fp8_all_gather = uses_float8_all_gather(t.precision, t.fp8_recipe, p.backend, dims.dp_shard)
    if t.precision == "fp8":  # swaps linears on meta, before any wrapper (as torchtitan's model converters)
        apply_float8(model, t.fp8_recipe, emulate=t.fp8_emulate, fsdp_float8_all_gather=fp8_all_gather)
    if p.backend != "fsdp":  # (the fsdp backend does these inside parallelize(), after tensor parallelism)
        apply_activation_checkpointing(model, p.activation_checkpoint)
        if p.compile:
            apply_compile(model)
    if p.backend == "ddp":
        model = apply_ddp(model, dist_info, lambda m: materialize(m, device, cfg.run.seed))
        if init_from is not None:
            load_model_weights(init_from, model)
        return TorchEngine(model, cfg)
    if p.backend == "fsdp":
        mesh = dims.build_mesh(device)
        after_step = precompute_float8_scales if fp8_all_gather else None
        if dims.pp > 1:
            engine = build_pipeline_engine(cfg, model, mesh, dims, device, after_step)
        else:
            engine = TorchEngine(parallelize(model, cfg, mesh, device), cfg, after_step)
        if init_from is not None:
            load_model_weights(init_from, engine.model)
        return engine
    from parallel.zero import DeepSpeedEngine
    materialize(model, device, cfg.run.seed)
    if init_from is not None:  # before DeepSpeed copies the weights into its fp32 master partitions
        load_model_weights(init_from, model)
    optimizer = build_optimizer(model, t)
    return DeepSpeedEngine(model, optimizer, build_lr_scheduler(optimizer, t),
                           deepspeed_config(cfg, dist_info.world_size), dist_info.backend)


def parallelize(model: nn.Module, cfg: Config, mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """The fsdp backend's treatment of one model (or one pipeline stage's part of it), in torchtitan's order:
    tensor parallelism, activation checkpointing, compile, FSDP2; then only the local shards are materialized."""
    p = cfg.parallel
    if p.tp > 1:
        apply_tp(model, mesh["tp"], p.sequence_parallel, uses_loss_parallel(cfg))
    apply_activation_checkpointing(model, p.activation_checkpoint)
    if p.compile:
        apply_compile(model)
    # CPU offload keeps the sharded parameters in host memory; FSDP moves what compute needs to the device.
    init_device = torch.device("cpu") if p.offload_params else device
    return apply_fsdp(model, mesh, lambda m: materialize(m, init_device, cfg.run.seed, buffer_device=device),
                      param_dtype=torch.bfloat16 if cfg.training.precision in ("bf16", "fp8") else None,
                      reshard_after_forward=p.reshard_after_forward, offload_params=p.offload_params)


def uses_loss_parallel(cfg: Config) -> bool:
    """Vocabulary-sharded logits into a sharded cross entropy: with tp, unless the logits are needed whole (a
    pipeline's last stage hands them to the schedule's loss; the z-loss takes a logsumexp over all of them)."""
    p = cfg.parallel
    return p.tp > 1 and p.loss_parallel and p.pp == 1 and not cfg.stability.z_loss


def compute_context(cfg: Config, device: torch.device):
    """Autocast where the backend does not cast itself: FSDP2 (MixedPrecisionPolicy) and DeepSpeed (bf16 weights)
    compute in bf16 on their own; a single process and DDP keep fp32 weights and autocast the matmuls (fp8: what
    the FP8 linears do not compute)."""
    if cfg.training.precision in ("bf16", "fp8") and cfg.parallel.backend == "ddp":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
