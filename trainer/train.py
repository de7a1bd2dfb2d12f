"""`normtron train`: config -> distributed setup -> model on meta -> init -> parallelize -> data -> loop -> checkpoints.

Each arrow is one function below, called in order from `train()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from kernels import describe_kernels, triton_problem
from models import ModelConfig, Transformer, count_parameters, flops_per_token
from parallel.distributed import (DistInfo, all_reduce_sum, barrier, init_distributed, pick_device,
                                  shutdown_distributed)
from parallel.float8 import describe_float8, uses_float8_all_gather
from parallel.mesh import ParallelDims
from parallel.pipeline import layers_per_stage
from trainer.checkpoint import Checkpointer, check_init_from, complete_checkpoints
from trainer.config import (Config, config_to_dict, dump_config, micro_batching, parallel_dims, pipeline_stages,
                            validate, validate_tensor_parallel)
from trainer.data.batches import TokenStream, TrainBatches, eval_windows, stack_windows
from trainer.data.mixture import MixtureBatches, Source, make_batches, open_sources, sources_tokenizer
from trainer.diagnostics import Diagnostics
from trainer.engine import PipelineEngine, build_engine, compute_context, local_tensor
from trainer.errors import UserError
from trainer.metrics import LOG, MetricsLogger, device_peak_flops, format_duration, setup_logging
from trainer.optim import apply_hyperparameters, apply_lr_schedule
from trainer.preemption import PreemptionWatch
from trainer.stability import StabilityMonitor, z_loss


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float
    checkpoint: Path | None
    preempted: bool = False  # stopped early by a signal, after writing `checkpoint`: exit for a requeue


def train(cfg: Config) -> TrainResult:
    dist_info = init_distributed(needs_process_group=cfg.parallel.backend != "ddp")
    try:
        return _train(cfg, dist_info)
    except UserError as err:
        # Re-raised without its traceback, whose frames would keep the model (and DDP/FSDP state) alive past the
        # process-group shutdown below, where the gloo teardown can then hang.
        error = UserError(str(err))
    finally:
        gc.collect()
        shutdown_distributed()
    raise error


def _train(cfg: Config, dist_info: DistInfo) -> TrainResult:
    inputs = check_inputs(cfg, dist_info.world_size, dist_info.rank)
    run_dir = cfg.run_dir
    setup_logging(dist_info.is_main)

    model = build_model_on_meta(cfg)
    model_summary = describe_model(cfg, model)
    if cfg.deepspeed and cfg.parallel.backend != "deepspeed":
        LOG.warning(f"the deepspeed: section is ignored with parallel.backend={cfg.parallel.backend}")
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep_last, dist_info)
    checkpointer.remove_partial()
    latest = checkpointer.latest()
    # A new run may start from another checkpoint's weights; a run with checkpoints of its own resumes from them.
    init_from = Path(cfg.checkpoint.init_from) if cfg.checkpoint.init_from and latest is None else None
    engine = build_engine(cfg, model, dist_info, init_from)
    state = TrainState(engine.scheduler, inputs.batches)
    if latest is not None:
        checkpointer.load(latest, engine, state)
        apply_hyperparameters(engine.optimizer, cfg.training)  # the config wins over the checkpoint's values
        apply_lr_schedule(engine.optimizer, engine.scheduler, cfg.training)
    # The run has started cleanly: from here on it writes into its directory.
    if state.step < cfg.training.steps:  # a finished run keeps the config it finished with
        write_resolved_config(cfg, run_dir, dist_info)
    setup_logging(dist_info.is_main, run_dir / "train.log")
    LOG.info(f"run {run_dir} | {dist_info.world_size} rank(s) on {dist_info.device.type} "
             f"({dist_info.backend or 'single process'}) | {describe_parallel(cfg, dist_info.world_size)}")
    LOG.info(model_summary)
    for line in describe_data(inputs.sources).splitlines():
        LOG.info(line)
    if latest is not None:
        LOG.info(f"resumed from {latest} at step {state.step}")
    elif init_from is not None:
        LOG.info(f"initialized the model from {init_from}")

    loop = TrainLoop(cfg, dist_info, engine, state, checkpointer, inputs, run_dir)
    return loop.run()


def check(cfg: Config, world_size: int) -> str:
    """`normtron train --check`: every check a launch would make, without writing anything; returns a summary."""
    inputs = check_inputs(cfg, world_size, rank=0)
    model = build_model_on_meta(cfg)
    return (f"config OK for {world_size} rank(s) ({describe_parallel(cfg, world_size)}): "
            f"{describe_model(cfg, model)}\n{describe_data(inputs.sources)}\n"
            f"run directory {cfg.run_dir}{' (exists: the run will resume)' if cfg.run_dir.exists() else ''}")


def describe_data(sources: list[Source]) -> str:
    """One line per source: where, how many tokens, and its weight in a mixture."""
    return "\n".join(f"data {s.path}{f' ({s.name}, weight {s.weight:.3g})' if len(sources) > 1 else ''}"
                     f"{' [Megatron indexed dataset]' if s.megatron else ''}: {len(s.train):,} train / "
                     f"{len(s.val):,} val tokens" for s in sources)


# --- Setup steps -------------------------------------------------------------------------------------------------

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


def check_inputs(cfg: Config, world_size: int, rank: int) -> RunInputs:
    """Every check that can fail on user input: the config, the data, and the run directory (same on all ranks)."""
    validate(cfg, world_size)
    check_kernels(cfg.model.kernels, pick_device()[0])
    sources = open_sources(cfg.data)
    meta = sources[0].meta
    resolve_vocab_size(cfg, meta)
    validate_tensor_parallel(cfg)  # again, now that the vocabulary size is known
    # Ranks that differ only in pipeline stage or tensor-parallel slice read the same batches.
    dp_rank, dp_size = parallel_dims(cfg, world_size).dp_coordinates(rank)
    batches = make_batches(sources, cfg.data.seq_len, cfg.training.batch_size, dp_rank, dp_size, cfg.run.seed)
    validation = [ValidationSet(s.name, s.weight, s.val, source_eval_windows(cfg, s, dp_rank, dp_size),
                                s.meta["val_unigram_entropy"]) for s in sources]
    check_run_dir(cfg)
    if cfg.checkpoint.init_from and not complete_checkpoints(cfg.run_dir / "checkpoints"):
        check_init_from(Path(cfg.checkpoint.init_from), cfg.model, meta)
    return RunInputs(meta, sources, batches, validation)


def source_eval_windows(cfg: Config, source: Source, dp_rank: int, dp_size: int) -> np.ndarray:
    try:
        return eval_windows(source.val, cfg.data.seq_len, cfg.eval.steps * cfg.training.batch_size, dp_rank, dp_size)
    except UserError as err:
        hint = " (a Megatron dataset: a larger data.val_fraction)" if source.megatron else ""
        raise UserError(f"{source.key}={source.path}: {err}{hint}") from None


def check_kernels(choice: str, device: torch.device) -> None:
    if choice == "triton" and (problem := triton_problem(device.type)):
        raise UserError(f"model.kernels=triton cannot run here: {problem}; use model.kernels=auto or torch")


def resolve_vocab_size(cfg: Config, meta: dict) -> None:
    vocab = meta["vocab_size"]
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise UserError(f"the data's tokenizer has {vocab} tokens but model.vocab_size="
                        f"{cfg.model.vocab_size}; set model.vocab_size >= {vocab} (or null to use the tokenizer's)")


def check_run_dir(cfg: Config) -> None:
    """The run directory can be created or reused: nothing in the way, writable, and any run in it has our model."""
    output_dir, run_dir = Path(cfg.run.output_dir), cfg.run_dir
    for path, key in ((output_dir, "run.output_dir"), (run_dir, "run.name")):
        if path.exists() and not path.is_dir():
            raise UserError(f"{key}: {path} exists and is a file, not a directory; choose another {key}")
    expected = {"checkpoints": "directory", "tensorboard": "directory", "config.yaml": "file",
                "metrics.jsonl": "file", "train.log": "file"}
    for name, kind in expected.items():
        path = run_dir / name
        if path.exists() and path.is_dir() != (kind == "directory"):
            raise UserError(f"{path} should be a {kind}; move it away or choose another run.name")
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {existing}; choose a writable run.output_dir")
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            previous = yaml.safe_load(saved.read_text(encoding="utf-8"))["model"]
        except (yaml.YAMLError, UnicodeDecodeError, TypeError, KeyError):
            previous = None
        if not isinstance(previous, dict):
            raise UserError(f"{saved} is damaged (no readable model section), so the run there cannot be checked "
                            f"for resuming; repair or remove it, or choose another run.name")
        current, defaults = config_to_dict(cfg)["model"], dataclasses.asdict(ModelConfig())
        # A key the saved config lacks (added in a later version) had its default value then.
        changed = sorted(k for k in current if previous.get(k, defaults[k]) != current[k]
                         and k not in ModelConfig.COMPUTE_ONLY_KEYS)
        if changed:
            diffs = ", ".join(f"model.{k}: {previous.get(k, defaults[k])!r} -> {current[k]!r}" for k in changed)
            raise UserError(f"{run_dir} holds a run with a different model ({diffs}); use another run.name to "
                            f"start a new run")


def write_resolved_config(cfg: Config, run_dir: Path, dist_info: DistInfo) -> None:
    """config.yaml with every value resolved; written only once the run has started (or resumed) cleanly."""
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(dump_config(cfg))
        os.replace(tmp, run_dir / "config.yaml")
    barrier()


def build_model_on_meta(cfg: Config) -> Transformer:
    """The model's structure without memory; parallel/ decides when to materialize it."""
    with torch.device("meta"):
        return Transformer(cfg.model)


def describe_model(cfg: Config, model: nn.Module) -> str:
    m, t = cfg.model, cfg.training
    total, non_emb = count_parameters(model), count_parameters(model, exclude_embeddings=True)
    precision = describe_float8(model, t.fp8_recipe, t.fp8_emulate) if t.precision == "fp8" else t.precision
    return (f"model: {total / 1e6:.2f}M parameters ({non_emb / 1e6:.2f}M non-embedding) | {m.n_layers} layers, "
            f"dim {m.dim}, {m.n_heads} heads ({m.kv_heads} kv), vocab {m.vocab_size} | norm {m.norm}, placement "
            f"{','.join(m.layer_placements) if m.layer_placements else m.placement}"
            f"{f' (alpha {m.mix_alpha})' if m.placement == 'mix' and not m.layer_placements else ''}"
            f"{', qk_norm' if m.qk_norm else ''}{', embed_norm' if m.embed_norm else ''} | "
            f"{describe_kernels(m.kernels, pick_device()[0])} | precision {precision}")


def describe_parallel(cfg: Config, world_size: int) -> str:
    p, t = cfg.parallel, cfg.training
    if p.backend == "deepspeed":
        offload = [name for name, on in (("optimizer", p.offload_optimizer), ("params", p.offload_params)) if on]
        return f"deepspeed ZeRO-{p.zero_stage}" + (f", offload {'+'.join(offload)}" if offload else "")
    if p.backend == "fsdp":
        dims = ParallelDims.resolve(p.pp, p.dp_replicate, p.dp_shard, p.tp, world_size)
        extras = [f"reshard_after_forward={p.reshard_after_forward}"] + (["offload params"] if p.offload_params else [])
        if dims.tp > 1:
            extras.append(f"tp={dims.tp}" + (" with sequence parallel" if p.sequence_parallel else "")
                          + (", loss parallel" if p.loss_parallel and dims.pp == 1 else ""))
        if dims.pp > 1:
            counts = layers_per_stage(cfg.model.n_layers, pipeline_stages(cfg), p.pp_layers)
            extras.append(f"pp={dims.pp} {p.pp_schedule}, {len(counts)} stages of {'+'.join(map(str, counts))} layers")
        if p.activation_checkpoint != "none":
            extras.append(f"{p.activation_checkpoint} activation checkpointing")
        if p.compile:
            extras.append("compiled blocks")
        if uses_float8_all_gather(t.precision, t.fp8_recipe, p.backend, dims.dp_shard):
            extras.append("fp8 all-gather")
        return (f"fsdp2 {'HSDP ' if dims.dp_replicate > 1 else ''}dp_replicate={dims.dp_replicate} "
                f"dp_shard={dims.dp_shard}, {', '.join(extras)}")
    return "ddp" if world_size > 1 else "no data parallelism"


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


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: a diverged loss should print, not overflow


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token-level cross entropy, always in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


# --- The loop ----------------------------------------------------------------------------------------------------

class TrainLoop:
    def __init__(self, cfg: Config, dist_info: DistInfo, engine, state: TrainState, checkpointer: Checkpointer,
                 inputs: RunInputs, run_dir: Path):
        self.cfg, self.dist, self.engine, self.model = cfg, dist_info, engine, engine.model
        self.state = state
        self.checkpointer, self.run_dir, self.meta = checkpointer, run_dir, inputs.meta
        self.validation = inputs.validation
        t = cfg.training
        self.micro_batch, self.accum_steps = micro_batching(t, parallel_dims(cfg, dist_info.world_size).dp_size,
                                                            pipeline_stages(cfg))
        self.pipelined = isinstance(engine, PipelineEngine)  # the engine runs forward and backward through stages
        self.tokens_per_step = t.batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = device_peak_flops(dist_info.device, cfg.logging.peak_tflops)
        self.autocast = compute_context(cfg, dist_info.device)
        self.loss_context = getattr(engine, "loss_context", contextlib.nullcontext)  # loss parallel under tp
        # The tokenizer under its own file name (tokenizer.model | tokenizer.json): a prepared directory's, or
        # data.tokenizer for Megatron sources; a tokenizer.json brings its tokenizer_config.json (its BOS/EOS).
        tokenizer = sources_tokenizer(inputs.sources)
        tokenizer_name = inputs.meta["tokenizer"].get("file", "tokenizer.model")  # older metas name no file
        self.extra_files = {"config.yaml": run_dir / "config.yaml", tokenizer_name: tokenizer}
        if tokenizer_name == "tokenizer.json" and tokenizer.with_name("tokenizer_config.json").is_file():
            self.extra_files["tokenizer_config.json"] = tokenizer.with_name("tokenizer_config.json")
        self.diagnostics = Diagnostics(engine.model, cfg.diagnostics.every, t.steps, dist_info.device,
                                       gradients=cfg.parallel.backend != "deepspeed", n_layers=cfg.model.n_layers,
                                       pp_group=engine.group if self.pipelined else None)
        if cfg.diagnostics.every and cfg.parallel.backend == "deepspeed":
            LOG.info("diagnostics under DeepSpeed: activation statistics and max attention logits per layer; "
                     "per-layer grad norms and update/weight ratios need parallel.backend=ddp or fsdp")

    def run(self) -> TrainResult:
        cfg, state = self.cfg, self.state
        metrics = MetricsLogger(self.run_dir, cfg.training.steps, state.step, self.dist.is_main,
                                cfg.logging.tensorboard)
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
                                          metrics.recorded_events())
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
                    if do_log:
                        self.log_train_step(metrics, loss_value, grad_value, lr, started)
                    if not finite and (error := self.stability.stop(step, loss_value, grad_value, saved)):
                        raise error
                    if do_save and not finite:  # never save a diverged model
                        LOG.warning(f"no checkpoint at step {step}: the model state is not finite")
                        do_save = False
                if do_eval:
                    val_loss = self.evaluate_and_log(metrics, step)
                if do_save:
                    saved = self.checkpointer.save(step, self.engine, state, self.extra_files)
                    LOG.info(f"checkpoint {saved}")
                if preempted:  # returned, not raised: a traceback would keep the model alive past shutdown
                    return TrainResult(self.run_dir, step, val_loss, saved, preempted=True)
                if do_eval or do_save:  # keep their time out of the next tokens/s
                    self.interval_start, self.interval_step = time.time(), step
            if not math.isfinite(val_loss):  # nothing was trained in this call: report the finished model
                val_loss = self.evaluate_all()[0]
        finally:
            metrics.close()
            preemption.close()
        self.report(val_loss, state.step - start_step, time.time() - started, saved)
        return TrainResult(self.run_dir, state.step, val_loss, saved)

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
        model, device = self.model, self.dist.device
        model.train()
        inputs, targets = self.state.batches.next_batch()
        lr = self.engine.lr
        if self.pipelined:  # diagnostics: the activations of each stage's first micro-batch
            with self.diagnostics.probe() if diagnose else contextlib.nullcontext():
                loss = self.engine.forward_backward(inputs, targets)
            if diagnose:
                self.diagnostics.before_step()
            return loss, self.engine_step(), lr
        loss_sum = torch.zeros((), device=device)
        for i, (x, y) in enumerate(zip(inputs.split(self.micro_batch), targets.split(self.micro_batch))):
            last = i == self.accum_steps - 1
            probe = self.diagnostics.probe() if diagnose and i == 0 else contextlib.nullcontext()
            with self.engine.micro_batch(last), self.loss_context():
                with self.autocast, probe:
                    logits = model(x.to(device, non_blocking=True))
                loss = cross_entropy(logits, y.to(device, non_blocking=True)) / self.accum_steps
                z_coefficient = self.cfg.stability.z_loss
                objective = loss + z_coefficient * z_loss(logits) / self.accum_steps if z_coefficient else loss
                self.engine.backward(objective, last)
            loss_sum += local_tensor(loss.detach())  # a replicated DTensor under loss parallel
        if diagnose:
            self.diagnostics.before_step()
        return loss_sum, self.engine_step(), lr

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

    @torch.no_grad()
    def evaluate(self, tokens: TokenStream, windows: np.ndarray) -> float:
        """Mean token loss over fixed validation windows, summed over all ranks."""
        if self.pipelined:
            return self.evaluate_pipelined(tokens, windows)
        self.model.eval()
        loss_sum, count = 0.0, 0
        for chunk in np.array_split(windows, max(1, math.ceil(len(windows) / self.micro_batch))):
            if len(chunk) == 0:
                continue
            x, y = stack_windows(tokens, chunk, self.cfg.data.seq_len)
            # Compiled blocks run eagerly here: a second (no-grad) graph per block would add compile time for a
            # few batches (and hits a DTensor bug in torch 2.13's inference graphs under tensor parallelism).
            with self.autocast, torch.compiler.set_stance("force_eager"):
                logits = self.model(x.to(self.dist.device))
            with self.loss_context():
                loss_sum += local_tensor(cross_entropy(logits, y.to(self.dist.device), reduction="sum")).item()
            count += y.numel()
        self.model.train()
        loss_sum, count = all_reduce_sum([loss_sum, float(count)], self.dist.device)
        return loss_sum / count

    def evaluate_pipelined(self, tokens: TokenStream, windows: np.ndarray) -> float:
        """evaluate() through the pipeline, in batches of training's shape (the stages know that shape); a short last
        batch is padded with windows whose targets are ignored."""
        self.model.eval()
        batch = self.micro_batch * self.accum_steps
        loss_sum, count = 0.0, 0
        for start in range(0, len(windows), batch):
            chunk = windows[start:start + batch]
            x, y = stack_windows(tokens, chunk, self.cfg.data.seq_len)
            if len(chunk) < batch:
                pad = batch - len(chunk)
                x = torch.cat([x, x[:1].expand(pad, -1)])
                y = torch.cat([y, torch.full_like(y[:1], -100).expand(pad, -1)])  # cross_entropy's ignore_index
            loss_sum += self.engine.evaluate(x, y).item()
            count += len(chunk) * self.cfg.data.seq_len
        self.model.train()
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
