"""The training loop: `TrainLoop.run()` steps the engine (trainer/engine.py) until training.steps, logs progress
(loss, rates, ETA), evaluates on each source's validation windows and writes checkpoints; `TrainState` is what a
resume needs besides the model and optimizer."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

from normtron.models.transformer import flops_per_token
from normtron.parallel.distributed import DistInfo, all_reduce_sum, broadcast_object
from normtron.parallel.mesh import ParallelDims
from normtron.trainer.checkpoint import Checkpointer
from normtron.trainer.config import Config, config_to_dict, micro_batching, pipeline_stages
from normtron.trainer.data.batches import TokenStream, TrainBatches
from normtron.trainer.data.mixture import MixtureBatches, Source, sources_tokenizer
from normtron.trainer.diagnostics import Diagnostics
from normtron.trainer.engine import Engine
from normtron.trainer.errors import UserError
from normtron.trainer.loss import injected_fault, perplexity
from normtron.trainer.metrics import LOG, MetricsLogger, device_peak_flops, format_duration
from normtron.trainer.preemption import PreemptionWatch
from normtron.trainer.optim import apply_hyperparameters, apply_lr_schedule
from normtron.trainer.stability import RollbackLimit, StabilityMonitor


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float
    checkpoint: Path | None
    preempted: bool = False  # stopped early by a signal, after writing `checkpoint`: exit for a requeue


@dataclass
class ValidationSet:
    """One source's fixed validation windows (this rank's share) and their token stream."""
    name: str
    weight: float
    tokens: TokenStream
    windows: np.ndarray
    unigram_entropy: float


@dataclass
class RunInputs:
    """What a run reads from disk, opened and checked before it writes anything."""
    meta: dict  # the first source's; the sources share its tokenizer and vocabulary
    sources: list[Source]
    batches: TrainBatches | MixtureBatches
    validation: list[ValidationSet]  # one per source, in data.sources order


class TrainState(Stateful):
    """Everything besides model and optimizer that a resume needs: step, tokens, schedule, data position, RNG."""

    def __init__(self, scheduler, batches: TrainBatches | MixtureBatches):
        self.scheduler, self.batches = scheduler, batches
        self.step, self.tokens_seen = 0, 0

    def state_dict(self) -> dict:
        # The CPU generator only: nothing in training draws random numbers on the device (no dropout), and a
        # device-independent key set lets a GPU checkpoint resume on CPU and back.
        return {"step": self.step, "tokens_seen": self.tokens_seen, "scheduler": self.scheduler.state_dict(),
                "data": self.batches.state_dict(), "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])


class TrainLoop:
    """The training loop: steps, logging, evaluation and checkpoints; each step's work is the engine's."""

    def __init__(self, cfg: Config, dist_info: DistInfo, dims: ParallelDims, engine: Engine, state: TrainState,
                 checkpointer: Checkpointer, inputs: RunInputs, run_dir: Path):
        self.cfg, self.dist, self.engine, self.model = cfg, dist_info, engine, engine.model
        self.state = state
        self.checkpointer, self.run_dir, self.meta = checkpointer, run_dir, inputs.meta
        self.validation = inputs.validation
        t = cfg.training
        self.micro_batch, self.accum_steps = micro_batching(t, dims.dp_size, pipeline_stages(cfg))
        self.tokens_per_step = t.batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = device_peak_flops(dist_info.device, cfg.logging.peak_tflops)
        # The tokenizer under its own file name (tokenizer.model | tokenizer.json): a prepared directory's, or
        # data.tokenizer for Megatron sources; a tokenizer.json brings its tokenizer_config.json (its BOS/EOS).
        tokenizer = sources_tokenizer(inputs.sources)
        tokenizer_name = inputs.meta["tokenizer"].get("file", "tokenizer.model")  # older metas name no file
        self.extra_files = {"config.yaml": run_dir / "config.yaml", tokenizer_name: tokenizer}
        if tokenizer_name == "tokenizer.json" and tokenizer.with_name("tokenizer_config.json").is_file():
            self.extra_files["tokenizer_config.json"] = tokenizer.with_name("tokenizer_config.json")
        self.diagnostics = Diagnostics(engine.model, cfg.diagnostics.every, t.steps, dist_info.device,
                                       gradients=cfg.parallel.backend != "deepspeed", n_layers=cfg.model.n_layers,
                                       pp_group=engine.pipeline_group)
        # debug.*: step -> loss factor, each fired once (popped) the first time its step runs in this process
        self.faults = {step: factor for step, factor in ((cfg.debug.nan_at_step, float("nan")),
                                                         (cfg.debug.spike_at_step, 1000.0)) if step is not None}
        self.live_tasks = None  # eval.tasks: lm-eval tasks on the live model (trainer/downstream_live.py)
        if cfg.eval.tasks:
            from normtron.trainer.downstream_live import LiveTasks

            self.live_tasks = LiveTasks(cfg, engine, tokenizer, run_dir, dist_info.device, dist_info.is_main)
        if cfg.diagnostics.every and cfg.parallel.backend == "deepspeed":
            LOG.info("diagnostics under DeepSpeed: activation statistics and max attention logits per layer; "
                     "per-layer grad norms and update/weight ratios need parallel.backend=ddp or fsdp")

    def run(self) -> TrainResult:
        cfg, state = self.cfg, self.state
        metrics = MetricsLogger(self.run_dir, cfg.training.steps, state.step, self.dist.is_main,
                                cfg.logging.tensorboard,
                                wandb=cfg.logging if cfg.logging.wandb != "disabled" else None,
                                config=config_to_dict(cfg))
        start_step, started = state.step, time.time()
        if start_step >= cfg.training.steps:
            LOG.info(f"run already complete at step {start_step} (training.steps={cfg.training.steps})")
        else:
            LOG.info(f"training steps {start_step + 1}..{cfg.training.steps}: {self.tokens_per_step:,} tokens/step "
                     f"({cfg.training.batch_size} x {cfg.data.seq_len}), {self.accum_steps} micro-batch(es) of "
                     f"{self.micro_batch} per rank")
        self.interval_start, self.interval_step = time.time(), start_step
        val_loss, saved = float("nan"), self.checkpointer.latest()
        preemption = PreemptionWatch()  # SIGTERM/SIGUSR1: checkpoint after this step, exit for a requeue
        s = cfg.stability
        self.stability = StabilityMonitor(s.nonfinite, s.spike_window, s.spike_zscore, metrics,
                                          metrics.recorded_events(), s.on_spike)
        self.rollback_limit = RollbackLimit(s.max_rollbacks, s.rollback_window,
                                            broadcast_object(metrics.recorded_event_steps("rollback")))
        try:
            while state.step < cfg.training.steps:
                diagnose = self.diagnostics.due(state.step + 1)
                loss, grad_norm, lr = self.train_step(diagnose)
                if state.step == start_step:  # optimizer state exists once the first step is done
                    self.log_model_states(metrics)
                state.step += 1
                state.tokens_seen += self.tokens_per_step
                step, final = state.step, state.step == cfg.training.steps
                if diagnose:
                    metrics.log({"step": step, **self.diagnostics.after_step()}, quiet=True)
                do_log, do_eval, do_save = (step % every == 0 or final for every in
                                            (cfg.logging.every, cfg.eval.every, cfg.checkpoint.every))
                preempted = preemption.stop_requested() and not final
                do_save = do_save or preempted
                if do_log or do_save or self.stability.every_step:
                    loss_value, grad_value = self.mean_over_ranks(loss), grad_norm.item()
                    finite = self.stability.observe(step, loss_value, grad_value, self.skip_nonfinite)
                    reason = self.stability.rollback_reason(finite)
                    if reason is not None and (reloaded := self.rollback(metrics, step, reason)) is not None:
                        saved = reloaded  # the newest checkpoint again: any later one would postdate the event
                        continue
                    if do_log:
                        self.log_train_step(metrics, loss_value, grad_value, lr, started)
                    if not finite and (error := self.stability.stop(step, loss_value, grad_value, saved)):
                        raise error
                    if do_save and not finite:  # never save a diverged model
                        LOG.warning(f"no checkpoint at step {step}: the model state is not finite")
                        do_save = False
                if do_eval:
                    val_loss = self.evaluate_and_log(metrics, step)
                do_tasks = self.live_tasks is not None and self.live_tasks.due(step, final)
                if do_tasks:
                    self.run_live_tasks(metrics, step)
                if do_save:  # checkpoint.async: in the background, except the last one and a preemption's
                    saved = self.checkpointer.save(step, self.engine, state, self.extra_files,
                                                   wait=final or preempted) or saved
                if preempted:  # returned, not raised: a traceback would keep the model alive past shutdown
                    return TrainResult(self.run_dir, step, val_loss, saved, preempted=True)
                if do_eval or do_save or do_tasks:  # keep their time out of the next tokens/s
                    self.interval_start, self.interval_step = time.time(), step
            saved = self.checkpointer.wait() or saved  # a save still in flight (the last step was not saved)
            if not math.isfinite(val_loss):  # nothing was trained in this call: report the finished model
                val_loss = self.evaluate_all()[0]
        finally:
            metrics.close()
            preemption.close()
        self.report(val_loss, state.step - start_step, time.time() - started, saved)
        return TrainResult(self.run_dir, state.step, val_loss, saved)

    def rollback(self, metrics: MetricsLogger, step: int, reason: str) -> Path | None:
        """Reload the newest checkpoint from before `step` (through the resume path: verified, any backend and
        layout), skip batches, and record the rollback; returns the checkpoint loaded (None: a spike with nothing
        to return to, trained on)."""
        target = self.checkpointer.before(step)
        if target is None:
            if reason == "loss_spike":
                LOG.warning(f"no checkpoint before step {step} to roll back to; training on")
                return None
            raise UserError(f"non-finite loss at step {step} and no checkpoint before it to roll back to; lower "
                            f"checkpoint.every or training.lr and start again")
        if (error := self.rollback_limit.admit(step)) is not None:
            raise error
        loaded = self.checkpointer.load(target, self.engine, self.state)
        apply_hyperparameters(self.engine.optimizer, self.cfg.training)  # as on a resume: the config wins
        apply_lr_schedule(self.engine.optimizer, self.engine.scheduler, self.cfg.training)
        back_to, skip = self.state.step, self.cfg.stability.rollback_skip_batches
        skip = step - back_to if skip is None else skip
        self.state.batches.skip(skip)
        self.stability.restart()
        self.stability.rollbacks += 1
        metrics.rewind(back_to)
        metrics.log({"step": step, "event": "rollback", "reason": reason, "rollback_to": back_to,
                     "skipped_batches": skip}, quiet=True)
        LOG.warning(f"rollback {self.stability.rollbacks}: {reason.replace('_', ' ')} at step {step}; reloaded "
                    f"{loaded} (step {back_to}) and skipped the next {skip} batch(es)")
        self.interval_start, self.interval_step = time.time(), back_to
        return loaded

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        return all_reduce_sum([value.item()], self.dist.device)[0] / self.dist.world_size

    def log_model_states(self, metrics: MetricsLogger) -> None:
        """How many parameter and optimizer-state elements each rank holds (shows what sharding saves)."""
        world, rank = self.dist.world_size, self.dist.rank
        slots = [0.0] * (2 * world)
        slots[rank], slots[world + rank] = map(float, self.engine.local_state_elements())
        counts = [int(v) for v in all_reduce_sum(slots, self.dist.device)]
        params, optim = counts[:world], counts[world:]
        metrics.log({"step": self.state.step + 1, "param_elements": params, "optimizer_elements": optim}, quiet=True)
        LOG.info(f"model states per rank: {max(params) / 1e6:.2f}M parameter and {max(optim) / 1e6:.2f}M "
                 f"optimizer-state elements (max over {world} rank(s))")
        if hasattr(self.engine.optimizer, "newton_schulz_calls"):  # training.optimizer=muon
            slots = [0.0] * world
            slots[rank] = float(self.engine.optimizer.newton_schulz_calls)
            calls = [int(v) for v in all_reduce_sum(slots, self.dist.device)]
            metrics.log({"step": self.state.step + 1, "newton_schulz_calls": calls}, quiet=True)
            LOG.info(f"Muon: Newton-Schulz on {calls[rank]} whole matrices on this rank in the first step "
                     f"(per rank: {calls})")

    def log_train_step(self, metrics: MetricsLogger, loss: float, grad_norm: float, lr: float,
                       started: float) -> None:
        """One metrics row, with throughput over the steps since the last row."""
        step, total = self.state.step, self.cfg.training.steps
        now = time.time()
        step_time = (now - self.interval_start) / (step - self.interval_step)
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_sec": self.tokens_per_step / step_time, "tokens_seen": self.state.tokens_seen,
               "elapsed_s": now - started, "eta_s": step_time * (total - step), **self.stability.counters()}
        if isinstance(self.state.batches, MixtureBatches):
            row.update({f"data_share/{name}": share for name, share in self.state.batches.shares().items()})
        if self.peak_flops:
            row["mfu"] = row["tokens_per_sec"] * self.flops_per_token / (self.peak_flops * self.dist.world_size)
        metrics.log(row)
        self.interval_start, self.interval_step = time.time(), step

    @property
    def skip_nonfinite(self) -> bool:
        return self.cfg.stability.nonfinite == "skip"

    def train_step(self, diagnose: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over this rank's share of the global batch, with gradient accumulation.
        Returns (loss, grad norm) as device tensors, read on logging/checkpoint steps only unless the stability
        guards need every step (spike detection, skip), so GPUs are otherwise not synchronized per step.
        The loss is the cross entropy; an optional z-loss term is trained on but not included in it.
        On a `diagnose` step the first micro-batch's forward runs under the diagnostics' activation probe."""
        self.model.train()
        inputs, targets = self.state.batches.next_batch()
        lr = self.engine.lr
        with injected_fault(self.faults.pop(self.state.step + 1, None)):
            loss = self.engine.forward_backward(inputs, targets, self.diagnostics.probe() if diagnose else None)
        if diagnose:
            self.diagnostics.before_step()
        return loss, self.engine_step(), lr

    def engine_step(self) -> torch.Tensor:
        max_norm = self.cfg.training.grad_clip if self.cfg.training.grad_clip > 0 else float("inf")
        return self.engine.step(max_norm, self.skip_nonfinite)

    def evaluate_all(self) -> tuple[float, dict[str, float]]:
        """(overall validation loss, each source's). The overall loss is the sources' losses weighted by their
        (normalized) data.sources weights, the mixture the model is trained on; one source: its loss."""
        losses = {v.name: self.evaluate(v.tokens, v.windows) for v in self.validation}
        return sum(v.weight * losses[v.name] for v in self.validation), losses

    def evaluate_and_log(self, metrics: MetricsLogger, step: int) -> float:
        val_loss, per_source = self.evaluate_all()
        row = {"step": step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)}
        if len(per_source) > 1:
            for name, loss in per_source.items():
                row.update({f"val_loss/{name}": loss, f"val_ppl/{name}": perplexity(loss)})
        metrics.log(row)
        return val_loss

    def run_live_tasks(self, metrics: MetricsLogger, step: int) -> None:
        started = time.time()
        row = self.live_tasks.run(step)
        metrics.log(row, quiet=True)
        LOG.info(f"tasks step {step} | " + " | ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in row.items()
                                                      if k != "step") + f" | {time.time() - started:.1f}s")

    def evaluate(self, tokens: TokenStream, windows: np.ndarray) -> float:
        """Mean token loss over fixed validation windows, summed over all ranks."""
        loss_sum, count = self.engine.evaluate(tokens, windows)
        loss_sum, count = all_reduce_sum([loss_sum, float(count)], self.dist.device)
        return loss_sum / count

    def report(self, val_loss: float, steps_run: int, seconds: float, checkpoint: Path | None) -> None:
        # A mixture's baseline is its sources' unigram entropies weighted as its validation loss is.
        base = sum(v.weight * v.unigram_entropy for v in self.validation)
        base_ppl = math.exp(base)
        LOG.info(f"done: {steps_run} step(s) in {format_duration(seconds)}")
        gap = base - val_loss
        LOG.info(f"validation loss {val_loss:.4f} (ppl {perplexity(val_loss):.2f}) | unigram baseline "
                 f"{base:.4f} (ppl {base_ppl:.2f}) | {abs(gap):.4f} nats {'below' if gap >= 0 else 'ABOVE'} "
                 f"the baseline")
        LOG.info(f"run directory: {self.run_dir}" + (f" | checkpoint: {checkpoint}" if checkpoint else ""))
