"""The training engine: the parallelized model with its optimizer and schedule, behind one interface (`Engine`)
that owns each step — forward and backward over the step's micro-batches, the optimizer step — plus evaluation and
save/load, whichever backend runs it. The loop only ever calls that interface.

    ddp        TorchEngine over the model replicated with DDP; DCP checkpoints
    fsdp       TorchEngine over the FSDP2-sharded model (only the shards are materialized); DCP checkpoints
               (reshardable); with parallel.pp > 1: PipelineEngine, this rank's pipeline stages
    deepspeed  ZeroEngine: DeepSpeed's engine with ZeRO stage 0-3 around the same model and optimizer; DeepSpeed
               checkpoints

The trainer's half of the composition, called in this order from trainer/train.py: `build_mesh`,
`parallelize_model` (parallel/parallelize.py's `parallelize()`, on the meta device), `init_model` (materialize and
initialize once), `build_engine` (optimizer, schedule, step).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import loss_parallel
from torch.distributed.checkpoint.stateful import Stateful

from normtron.models.hypersphere import normalize_hypersphere_
from normtron.models.placement import uses_hypersphere
from normtron.parallel.distributed import DistInfo
from normtron.parallel.float8 import precompute_float8_scales, uses_float8_all_gather
from normtron.parallel.mesh import ParallelDims
from normtron.parallel.parallelize import ParallelModel, Precision, clip_grad_norm, gradient_sync, parallelize
from normtron.parallel.pipeline import build_schedule, clip_grad_norm_pipelined, merged_view
from normtron.parallel.zero import DeepSpeedEngine
from normtron.trainer.checkpoint import AsyncSave, load_dcp, load_model_weights, save_dcp
from normtron.trainer.chunked_loss import IGNORE_INDEX, linear_cross_entropy
from normtron.trainer.config import Config, deepspeed_config, micro_batching
from normtron.trainer.data.batches import TokenStream, stack_windows
from normtron.trainer.loss import chunked_head_objective, cross_entropy, micro_batch_objective
from normtron.trainer.optim import build_lr_scheduler, build_optimizer


class Engine(Protocol):
    """What the loop and the checkpointer use of a training engine, for plain, sharded and pipelined models alike."""
    model: nn.Module  # forward, train() and eval(); a view of the local stages under a pipeline
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    checkpoint_format: str  # "dcp" | "deepspeed"
    pipeline_group: dist.ProcessGroup | None  # the stages' group under a pipeline (diagnostics complete over it)

    @property
    def lr(self) -> float: ...

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor,
                         probe: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
        """Forward and backward of this rank's batch in its micro-batches (gradients accumulate); returns the mean
        token cross entropy as a device tensor. `probe` (the diagnostics' activation probe) is entered around the
        first micro-batch's forward."""

    def step(self, max_norm: float, skip_nonfinite: bool = False) -> torch.Tensor:
        """Clip, update, advance the schedule, zero the gradients; returns the pre-clipping global gradient norm."""

    def evaluate(self, tokens: TokenStream, windows: np.ndarray) -> tuple[float, int]:
        """(summed token cross entropy, tokens) of this rank's validation windows, without training."""

    def local_state_elements(self) -> tuple[int, int]: ...

    def save_checkpoint(self, path: Path, train_state: Stateful, async_with: AsyncSave | None = None):
        """Write a checkpoint into `path`; DCP engines (checkpoint_format "dcp") also in the background: with
        `async_with` they return the write's future once the state is staged."""

    def load_checkpoint(self, path: Path, train_state: Stateful) -> None: ...


class WholeModelSteps:
    """forward_backward and evaluate for a model that runs whole on each rank (one process, DDP, FSDP2, DeepSpeed):
    the rank's batch in micro-batches of `micro_batch_size`, over the backend's `micro_batch`/`backward`."""

    pipeline_group = None

    def setup_steps(self, cfg: Config, device: torch.device, micro_batch_size: int, accum_steps: int,
                    loss_context: Callable = contextlib.nullcontext) -> None:
        self.device, self.micro_batch_size, self.accum_steps = device, micro_batch_size, accum_steps
        self.seq_len, self.z_coefficient = cfg.data.seq_len, cfg.stability.z_loss
        self.autocast = compute_context(cfg, device)
        self.loss_context = loss_context  # loss parallel under tp: the logits are vocabulary-sharded DTensors
        self.loss_chunk_size = loss_chunk_size(cfg)

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor,
                         probe: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
        loss_sum = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(zip(inputs.split(self.micro_batch_size), targets.split(self.micro_batch_size))):
            last = i == self.accum_steps - 1
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.micro_batch(last), self.loss_context():
                with self.autocast, probe if probe is not None and i == 0 else contextlib.nullcontext():
                    if self.loss_chunk_size:  # the head and the loss together, chunk by chunk
                        loss, objective = self.model(x, head=chunked_head_objective(
                            y, self.accum_steps, self.z_coefficient, self.loss_chunk_size))
                    else:
                        logits = self.model(x)
                if not self.loss_chunk_size:
                    loss, objective = micro_batch_objective(logits, y, self.accum_steps, self.z_coefficient)
                self.backward(objective, last)
            loss_sum += local_tensor(loss.detach())  # a replicated DTensor under loss parallel
        return loss_sum

    @torch.no_grad()
    def evaluate(self, tokens: TokenStream, windows: np.ndarray) -> tuple[float, int]:
        self.model.eval()
        loss_sum, count = 0.0, 0
        for chunk in np.array_split(windows, max(1, math.ceil(len(windows) / self.micro_batch_size))):
            if len(chunk) == 0:
                continue
            x, y = stack_windows(tokens, chunk, self.seq_len)
            # Compiled blocks run eagerly here: a second (no-grad) graph per block would add compile time for a
            # few batches (and hits a DTensor bug in torch 2.13's inference graphs under tensor parallelism).
            with self.autocast, torch.compiler.set_stance("force_eager"):
                logits = self.model(x.to(self.device))
            with self.loss_context():
                loss_sum += local_tensor(cross_entropy(logits, y.to(self.device), reduction="sum")).item()
            count += y.numel()
        self.model.train()
        return loss_sum, count


class TorchEngine(WholeModelSteps):
    """A single process, DDP or FSDP2: torch optimizer, torch clipping, DCP checkpoints."""

    checkpoint_format = "dcp"

    def __init__(self, model: nn.Module, cfg: Config, after_step=None):
        self.model = model
        self.optimizer = build_optimizer(model, cfg.training, cfg.model)
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

    def save_checkpoint(self, path: Path, train_state: Stateful, async_with: AsyncSave | None = None):
        return save_dcp(path, self.model, self.optimizer, train_state, async_with)

    def load_checkpoint(self, path: Path, train_state: Stateful) -> None:
        load_dcp(path, self.model, self.optimizer, train_state)


class ZeroEngine(WholeModelSteps, DeepSpeedEngine):
    """DeepSpeed's engine (parallel/zero.py) with the trainer's micro-batch steps and evaluation."""


class PipelineEngine(TorchEngine):
    """The fsdp backend with parallel.pp > 1: this rank's pipeline stages (each one parallelized like a whole
    model), one optimizer over them under the whole model's names, and the schedule that runs a step's
    micro-batches (the training.micro_batch_size pieces of the rank's batch) through every stage.

    `model` is a view of the parts under the whole model's parameter names: DCP checkpoints hold the same keys as
    any other layout, so they resume under FSDP2, DDP or one process and back."""

    def __init__(self, parts: list[nn.Module], stages: list[int], n_stages: int, cfg: Config, pp_mesh: DeviceMesh,
                 device: torch.device, n_microbatches: int, after_step=None):
        super().__init__(merged_view(parts), cfg, after_step)
        self.parts, self.device, self.group = parts, device, pp_mesh.get_group()
        self.pipeline_group = self.group
        self.has_first, self.has_last = 0 in stages, n_stages - 1 in stages
        self.n_microbatches, self.z_coefficient = n_microbatches, cfg.stability.z_loss
        self.seq_len = cfg.data.seq_len
        self.evaluating, self.recorded, self.captured = False, [], None
        self.vocab_size = cfg.model.vocab_size
        # torch 2.13's ZBVZeroBubble cannot run forward only (its eval still schedules input-gradient steps): it
        # evaluates with a backward whose gradients are dropped.
        self.forward_only_eval = cfg.parallel.pp_schedule != "ZBVZeroBubble"
        self.schedule = build_schedule(parts, stages, n_stages, cfg.parallel.pp_schedule, n_microbatches,
                                       self.micro_batch_loss, device, self.group)
        # Chunked loss (setup_steps sets loss_chunk_size): the last stage hands on its hidden states and its gathered
        # head weight (models/transformer.py's `head` hook), the loss computes the head chunk by chunk from them.
        self.logit_scale = parts[stages.index(n_stages - 1)].logit_scale if self.has_last else None

    def infer_shapes(self, batch: int, seq_len: int) -> None:
        """One throw-away forward and backward on a batch of zeros: on its first run each stage infers its input and
        output shapes, running its layers on uninitialized tensors; done here, that never happens inside a real
        step (whose activations the diagnostics record)."""
        tokens = torch.zeros(batch, seq_len, dtype=torch.long)
        self.forward_backward(tokens, tokens)
        self.optimizer.zero_grad(set_to_none=True)

    def micro_batch_loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        """Called by the schedule on the last stage for each micro-batch: its share of the step's objective, as
        without a pipeline (trainer/loss.py); in evaluation the summed cross entropy. The cross entropy alone is
        recorded for the logged loss. `output`: the logits, or with a chunked loss (hidden states, head weight)."""
        if self.captured is not None:  # forward_logits: keep the logits, a zero loss for the schedule
            logits = self.whole_logits(output)
            self.captured.append(logits.detach().float())
            loss = logits.sum() * 0
            self.recorded.append(loss)
            return loss
        if self.evaluating:
            loss = self.summed_cross_entropy(output, targets)
            self.recorded.append(loss)
            return loss
        if self.loss_chunk_size:
            loss, objective = chunked_head_objective(targets, self.n_microbatches, self.z_coefficient,
                                                     self.loss_chunk_size)(*output, self.logit_scale)
        else:
            loss, objective = micro_batch_objective(output, targets, self.n_microbatches, self.z_coefficient)
        self.recorded.append(loss.detach())
        return objective

    def whole_logits(self, output) -> torch.Tensor:
        """The last stage's full logits from what it returns (forward_logits: eval.tasks on the live model)."""
        if self.loss_chunk_size:
            hidden, weight = output
            logits = hidden @ weight.t()
            return logits if self.logit_scale is None else logits * self.logit_scale
        return output.full_tensor() if isinstance(output, DTensor) else output

    def summed_cross_entropy(self, output, targets: torch.Tensor) -> torch.Tensor:
        if not self.loss_chunk_size:
            return cross_entropy(output, targets, reduction="sum")
        hidden, weight = output
        scale = 1.0 if self.logit_scale is None else self.logit_scale
        # the objective (without z-loss: the mean cross entropy) stays differentiable: ZBVZeroBubble's evaluation
        # runs a backward
        _, mean = linear_cross_entropy(hidden, weight, targets, scale, 0.0, self.loss_chunk_size)
        counted = (targets != IGNORE_INDEX).sum()
        return torch.where(counted > 0, mean * counted, 0.0)  # a micro-batch of padding only: its mean is 0/0

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor,
                         probe: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
        """Forward and backward of the rank's batch through the pipeline; returns the mean token loss. The probe
        records the activations of each stage's first micro-batch."""
        self.evaluating = False
        with probe if probe is not None else contextlib.nullcontext():
            return self._run(self.schedule.step, inputs, targets)

    @torch.no_grad()
    def evaluate(self, tokens: TokenStream, windows: np.ndarray) -> tuple[float, int]:
        """Through the pipeline in batches of training's shape (the stages know that shape); a short last batch is
        padded with windows whose targets are ignored."""
        self.model.eval()
        batch = self.micro_batch_size * self.accum_steps
        loss_sum, count = 0.0, 0
        for start in range(0, len(windows), batch):
            chunk = windows[start:start + batch]
            x, y = stack_windows(tokens, chunk, self.seq_len)
            if len(chunk) < batch:
                pad = batch - len(chunk)
                x = torch.cat([x, x[:1].expand(pad, -1)])
                y = torch.cat([y, torch.full_like(y[:1], -100).expand(pad, -1)])  # cross_entropy's ignore_index
            loss_sum += self.evaluate_batch(x, y).item()
            count += len(chunk) * self.seq_len
        self.model.train()
        return loss_sum, count

    def evaluate_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
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

    @torch.no_grad()
    def forward_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """fp32 logits of up to a rank's batch of sequences of up to data.seq_len tokens (in-loop lm-eval tasks),
        on every rank: padded to training's shape (the stages know that shape) and run through the pipeline; the last
        stage's logits go to the other stages by a sum over the pipeline group."""
        n, length = tokens.shape
        x = torch.zeros(self.micro_batch_size * self.accum_steps, self.seq_len, dtype=torch.long)
        x[:n, :length] = tokens
        self.captured = []
        try:
            self.evaluate_batch(x, torch.zeros_like(x))
            logits = (torch.cat(self.captured[-self.n_microbatches:]) if self.has_last else
                      torch.zeros(*x.shape, self.vocab_size, device=self.device))
        finally:
            self.captured = None
        torch.distributed.all_reduce(logits, group=self.group)
        return logits[:n, :length]

    def _run(self, run: Callable, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.recorded = []
        args = (inputs.to(self.device, non_blocking=True),) if self.has_first else ()
        head = {"head": hidden_states_and_head_weight} if self.loss_chunk_size else {}  # used by the last stage only
        run(*args, target=targets.to(self.device, non_blocking=True) if self.has_last else None,
            return_outputs=False, **head)
        # The last n: on its first call a stage infers its shapes from a forward (and loss) of its own. Only the rank
        # holding the last stage has the losses: a sum over the pipeline group gives them to every rank.
        recorded = self.recorded[-self.n_microbatches:]
        total = torch.stack(recorded).sum() if recorded else torch.zeros((), device=self.device)
        torch.distributed.all_reduce(total, group=self.group)
        return total

    def clip(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_pipelined(list(self.model.parameters()), max_norm, self.group)


def hidden_states_and_head_weight(hidden: torch.Tensor, weight: torch.Tensor, _scale) -> tuple[torch.Tensor, ...]:
    """The last pipeline stage's `head`: its output is the final hidden states and the head weight as used in the
    forward (gathered by FSDP2), for the schedule's loss to compute the head chunk by chunk. A view, so that hooks
    FSDP2 puts on the stage's outputs belong to this micro-batch's graph, not to the parameter."""
    return hidden, weight.view_as(weight)


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


def build_mesh(cfg: Config, dims: ParallelDims, device: torch.device) -> DeviceMesh | None:
    """The DeviceMesh of the fsdp backend (pp, dp_replicate, dp_shard, tp); DDP and DeepSpeed use the world group."""
    return dims.build_mesh(device) if cfg.parallel.backend == "fsdp" else None


def parallelize_model(cfg: Config, model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None) -> ParallelModel:
    """parallel/parallelize.py's `parallelize()` with what it needs of training.* and stability.*."""
    t = cfg.training
    return parallelize(model, dims, mesh, cfg.parallel, Precision(t.precision, t.fp8_recipe, t.fp8_emulate),
                       loss_parallel=uses_loss_parallel(cfg))


def renormalize_then(then: Callable[[nn.Module], None] | None, model: nn.Module) -> None:
    """After an optimizer step: nGPT's weights back onto the unit hypersphere (on this rank's shards), then `then`."""
    normalize_hypersphere_(model)
    if then is not None:
        then(model)


def build_engine(cfg: Config, parallel: ParallelModel, dims: ParallelDims, mesh: DeviceMesh | None,
                 dist_info: DistInfo) -> Engine:
    """The engine over the parallelized, initialized model: its optimizer and schedule, and its step."""
    p, t, device = cfg.parallel, cfg.training, dist_info.device
    micro_batch, accum_steps = micro_batching(t, dims.dp_size, parallel.n_stages)
    if p.backend == "deepspeed":  # DeepSpeed wraps the initialized model, with the optimizer, in its engine
        optimizer = build_optimizer(parallel.model, t, cfg.model)
        engine = ZeroEngine(parallel.model, optimizer, build_lr_scheduler(optimizer, t),
                            deepspeed_config(cfg, dist_info.world_size), dist_info.backend,
                            hypersphere=uses_hypersphere(cfg.model))
        engine.setup_steps(cfg, device, micro_batch, accum_steps)
        return engine
    after_step = precompute_float8_scales if uses_float8_all_gather(t.precision, t.fp8_recipe, p.backend,
                                                                    dims.dp_shard) else None
    if uses_hypersphere(cfg.model):  # nGPT: weights back onto the hypersphere first, then their FP8 scales
        after_step = functools.partial(renormalize_then, after_step)
    if dims.pp > 1:
        engine = PipelineEngine(parallel.parts, parallel.stages, parallel.n_stages, cfg, mesh["pp"], device,
                                accum_steps, after_step)
        engine.setup_steps(cfg, device, micro_batch, accum_steps)
        engine.infer_shapes(micro_batch * accum_steps, cfg.data.seq_len)
        return engine
    engine = TorchEngine(parallel.model, cfg, after_step)
    engine.setup_steps(cfg, device, micro_batch, accum_steps,
                       loss_parallel if uses_loss_parallel(cfg) else contextlib.nullcontext)
    return engine


def init_model(parallel: ParallelModel, cfg: Config, device: torch.device, init_from: Path | None) -> None:
    """Materialize every part of the parallelized model (only the local shards under FSDP2) and initialize it from
    run.seed, then load the weights of `init_from` if given (before DeepSpeed copies them into its fp32 master
    partitions)."""
    # CPU offload keeps the sharded parameters in host memory; FSDP moves what compute needs to the device.
    init_device = torch.device("cpu") if parallel.cfg.backend == "fsdp" and parallel.cfg.offload_params else device
    # Generated values are whole tensors; implicit replication lets each sharded parameter keep its own slice.
    with implicit_replication():
        for part in parallel.parts:
            materialize(part, init_device, cfg.run.seed, buffer_device=device)
    if init_from is not None:
        load_model_weights(init_from, merged_view(parallel.parts) if parallel.n_stages > 1 else parallel.model)


def uses_loss_parallel(cfg: Config) -> bool:
    """Vocabulary-sharded logits into a sharded cross entropy: with tp, unless the logits are needed whole (a
    pipeline's last stage hands them to the schedule's loss; the z-loss takes a logsumexp over all of them)."""
    p = cfg.parallel
    return p.tp > 1 and p.loss_parallel and p.pp == 1 and not cfg.stability.z_loss


def loss_chunk_size(cfg: Config) -> int:
    """training.loss_chunk_size where the whole head runs on one rank: inside the model's forward, or on a pipeline's
    last stage in the schedule's loss (from the stage's hidden states and head weight). Not under tensor parallelism
    (the loss-parallel path keeps the logits vocabulary-sharded instead), DeepSpeed ZeRO-3 (the head weight is
    gathered only inside its own module's forward) or nGPT (its learned per-token logit scale); 0 there, the full
    logits as before."""
    p = cfg.parallel
    if p.tp > 1 or (p.backend == "deepspeed" and p.zero_stage == 3) or uses_hypersphere(cfg.model):
        return 0
    return cfg.training.loss_chunk_size


def compute_context(cfg: Config, device: torch.device):
    """Autocast where the backend does not cast itself: FSDP2 (MixedPrecisionPolicy) and DeepSpeed (bf16 weights)
    compute in bf16 on their own; a single process and DDP keep fp32 weights and autocast the matmuls (fp8: what
    the FP8 linears do not compute)."""
    if cfg.training.precision in ("bf16", "fp8") and cfg.parallel.backend == "ddp":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
