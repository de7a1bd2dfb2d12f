"""`normtron train`, read top to bottom in `_train()`; each step is one function, called in this order:

    config       check_inputs: validate() the config (resolving the rank layout, ParallelDims, once), open and
                 check the data sources and the run directory; nothing is written before these pass
    mesh         build_mesh: the DeviceMesh (pp, dp_replicate, dp_shard, tp) of the fsdp backend
    meta model   build_model_on_meta: the Transformer's structure, no memory
    parallelize  parallelize_model -> parallel.parallelize: FP8, pipeline stages, tp, activation checkpointing,
                 compile, FSDP2 or DDP, all on the meta device
    init         init_model: materialize (only the local shards) and initialize from run.seed, or load
                 checkpoint.init_from; then build_engine adds the optimizer and schedule (DeepSpeed wraps here)
    data         TrainState: the batches' position, with the schedule and RNG, that a resume restores
    loop         TrainLoop.run (trainer/loop.py): steps through the engine, logs, evaluates
    checkpoint   Checkpointer.load before the loop (resume), Checkpointer.save from inside it
"""

from __future__ import annotations

import dataclasses
import gc
import os
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from normtron.kernels.dispatch import describe_kernels, triton_problem
from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer, count_parameters
from normtron.parallel.distributed import DistInfo, barrier, init_distributed, pick_device, shutdown_distributed
from normtron.parallel.float8 import describe_float8, uses_float8_all_gather
from normtron.parallel.mesh import ParallelDims
from normtron.parallel.pipeline import layers_per_stage
from normtron.trainer.checkpoint import Checkpointer, check_init_from, complete_checkpoints
from normtron.trainer.config import Config, config_to_dict, config_warnings, dump_config, pipeline_stages, validate, validate_tensor_parallel
from normtron.trainer.data.batches import eval_windows
from normtron.trainer.data.mixture import Source, make_batches, open_sources
from normtron.trainer.engine import build_engine, build_mesh, init_model, parallelize_model, uses_loss_parallel
from normtron.trainer.errors import UserError
from normtron.trainer.loop import RunInputs, TrainLoop, TrainResult, TrainState, ValidationSet
from normtron.trainer.metrics import LOG, setup_logging
from normtron.trainer.run_lock import holder as lock_holder
from normtron.trainer.run_lock import in_use, run_lock
from normtron.trainer.optim import apply_hyperparameters, apply_lr_schedule


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
    dims, inputs = check_inputs(cfg, dist_info.world_size, dist_info.rank)
    with run_lock(cfg.run_dir, take=dist_info.is_main):  # one writer per run directory
        return _train_locked(cfg, dist_info, dims, inputs)


def _train_locked(cfg: Config, dist_info: DistInfo, dims: ParallelDims, inputs: RunInputs) -> TrainResult:
    run_dir = cfg.run_dir
    setup_logging(dist_info.is_main)

    mesh = build_mesh(cfg, dims, dist_info.device)
    model = build_model_on_meta(cfg)
    model_summary = describe_model(cfg, model)
    if cfg.deepspeed and cfg.parallel.backend != "deepspeed":
        LOG.warning(f"the deepspeed: section is ignored with parallel.backend={cfg.parallel.backend}")
    parallel = parallelize_model(cfg, model, dims, mesh)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep_last, dist_info, cfg.checkpoint.on_damaged,
                                cfg.checkpoint.async_)
    checkpointer.remove_partial()
    latest = checkpointer.latest()
    # A new run may start from another checkpoint's weights; a run with checkpoints of its own resumes from them.
    init_from = Path(cfg.checkpoint.init_from) if cfg.checkpoint.init_from and latest is None else None
    init_model(parallel, cfg, dist_info.device, init_from)
    engine = build_engine(cfg, parallel, dims, mesh, dist_info)
    state = TrainState(engine.scheduler, inputs.batches)
    if latest is not None:
        latest = checkpointer.load(latest, engine, state)  # or the intact one before it (on_damaged=previous)
        apply_hyperparameters(engine.optimizer, cfg.training)  # the config wins over the checkpoint's values
        apply_lr_schedule(engine.optimizer, engine.scheduler, cfg.training)
    # The run has started cleanly: from here on it writes into its directory.
    if state.step < cfg.training.steps:  # a finished run keeps the config it finished with
        write_resolved_config(cfg, run_dir, dist_info)
    setup_logging(dist_info.is_main, run_dir / "train.log")
    LOG.info(f"run {run_dir} | {dist_info.world_size} rank(s) on {dist_info.device.type} "
             f"({dist_info.backend or 'single process'}) | {describe_parallel(cfg, dims)}")
    LOG.info(model_summary)
    for warning in config_warnings(cfg):
        LOG.warning(f"warning: {warning}")
    for line in describe_data(inputs.sources).splitlines():
        LOG.info(line)
    if latest is not None:
        LOG.info(f"resumed from {latest} at step {state.step}")
    elif init_from is not None:
        LOG.info(f"initialized the model from {init_from}")

    loop = TrainLoop(cfg, dist_info, dims, engine, state, checkpointer, inputs, run_dir)
    return loop.run()


def check(cfg: Config, world_size: int) -> str:
    """`normtron train --check`: every check a launch would make, without writing anything; returns a summary."""
    dims, inputs = check_inputs(cfg, world_size, rank=0)
    model = build_model_on_meta(cfg)
    from normtron.trainer.plan import check_memory_line

    return (f"config OK for {world_size} rank(s) ({describe_parallel(cfg, dims)}): "
            f"{describe_model(cfg, model)}\n{describe_data(inputs.sources)}\n"
            f"run directory {cfg.run_dir}{_run_dir_state(cfg.run_dir)}\n"
            f"{check_memory_line(cfg, world_size)}"
            + "".join(f"\nwarning: {w}" for w in config_warnings(cfg)))


def _run_dir_state(run_dir: Path) -> str:
    if not run_dir.exists():
        return ""
    busy = lock_holder(run_dir)
    if busy:  # what the run itself would say when it starts
        raise in_use(run_dir, busy)
    return " (exists: the run will resume)"


def describe_data(sources: list[Source]) -> str:
    """One line per source: where, how many tokens, and its weight in a mixture."""
    return "\n".join(f"data {s.path}{f' ({s.name}, weight {s.weight:.3g})' if len(sources) > 1 else ''}"
                     f"{' [Megatron indexed dataset]' if s.megatron else ''}: {len(s.train):,} train / "
                     f"{len(s.val):,} val tokens" for s in sources)


# --- Setup steps -------------------------------------------------------------------------------------------------

def check_inputs(cfg: Config, world_size: int, rank: int) -> tuple[ParallelDims, RunInputs]:
    """Every check that can fail on user input: the config, the data, and the run directory (same on all ranks).
    Returns the rank layout and the opened inputs."""
    dims = validate(cfg, world_size)
    check_kernels(cfg.model.kernels, pick_device()[0])
    sources = open_sources(cfg.data)
    meta = sources[0].meta
    resolve_vocab_size(cfg, meta)
    validate_tensor_parallel(cfg)  # again, now that the vocabulary size is known
    # Ranks that differ only in pipeline stage or tensor-parallel slice read the same batches.
    dp_rank, dp_size = dims.dp_coordinates(rank)
    batches = make_batches(sources, cfg.data.seq_len, cfg.training.batch_size, dp_rank, dp_size, cfg.run.seed)
    validation = [ValidationSet(s.name, s.weight, s.val, source_eval_windows(cfg, s, dp_rank, dp_size),
                                s.meta["val_unigram_entropy"]) for s in sources]
    check_run_dir(cfg)
    if cfg.checkpoint.init_from and not complete_checkpoints(cfg.run_dir / "checkpoints"):
        check_init_from(Path(cfg.checkpoint.init_from), cfg.model, meta)
    return dims, RunInputs(meta, sources, batches, validation)


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
            f"{', qk_norm' if m.qk_norm else ''}{', embed_norm' if m.embed_norm else ''}"
            f"{f' | µP (base width {m.mup_base_dim})' if m.parametrization == 'mup' else ''} | "
            f"{describe_kernels(m.kernels, pick_device()[0])} | precision {precision}")


def describe_parallel(cfg: Config, dims: ParallelDims) -> str:
    p, t = cfg.parallel, cfg.training
    if p.backend == "deepspeed":
        offload = [name for name, on in (("optimizer", p.offload_optimizer), ("params", p.offload_params)) if on]
        return f"deepspeed ZeRO-{p.zero_stage}" + (f", offload {'+'.join(offload)}" if offload else "")
    if p.backend == "fsdp":
        extras = [f"reshard_after_forward={p.reshard_after_forward}"] + (["offload params"] if p.offload_params else [])
        if dims.tp > 1:
            extras.append(f"tp={dims.tp}" + (" with sequence parallel" if p.sequence_parallel else "")
                          + (", loss parallel" if uses_loss_parallel(cfg) else ""))
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
    return "ddp" if dims.world_size > 1 else "no data parallelism"
