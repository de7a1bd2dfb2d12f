"""Training configuration: typed dataclasses are the source of truth, YAML files and `key.sub=value` overrides only
change their fields. Every value is checked once, up front, with errors that name the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib.util
import keyword
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from normtron.models.config import ModelConfig, bounds_error, config_field
from normtron.parallel.distributed import pick_device
from normtron.parallel.float8 import FP8_RECIPES, float8_problem
from normtron.parallel.config import ParallelConfig
from normtron.parallel.mesh import ParallelDims
from normtron.parallel.pipeline import SINGLE_STAGE_SCHEDULES, stages_per_rank
from normtron.parallel.zero import build_deepspeed_config
from normtron.trainer.errors import UserError
from normtron.trainer.resources import config_path


@dataclass
class RunConfig:
    name: str = config_field("run", "run name; the run directory is <output_dir>/<name>")
    output_dir: str = config_field("runs", "directory that holds run directories")
    seed: int = config_field(0, "seed for initialization and data order", ge=0, lt=2**63)


@dataclass
class DataConfig:
    dir: str = config_field("data/shakespeare", "directory written by `normtron prepare-data`, or the PREFIX of a "
                                                "Megatron-LM/GPT-NeoX indexed dataset (PREFIX.bin + PREFIX.idx)")
    seq_len: int = config_field(256, "tokens per training sequence", ge=1)
    sources: Optional[list[dict]] = config_field(
        None, "a mixture: [{dir: DIR, weight: W, name: NAME}, ...] (dir as data.dir; weight > 0, default 1; name "
              "default the dir's basename, used in val_loss/NAME and data_share/NAME); replaces data.dir when set")
    tokenizer: Optional[str] = config_field(
        None, "the tokenizer (sentencepiece .model or tokenizer.json) of Megatron indexed datasets, which carry "
              "none; required for them, and must match a prepared directory's own")
    val_fraction: float = config_field(0.02, "Megatron indexed datasets: every round(1/val_fraction)-th document "
                                             "is held out for validation", gt=0, le=0.5)


@dataclass
class DataSourceSpec:
    """One entry of data.sources (or data.dir), as the config gives it."""
    name: str
    dir: str
    weight: float
    key: str  # the config key naming its dir, for messages


SOURCE_KEYS = ("dir", "weight", "name")
PLAIN_NAME = r"[A-Za-z0-9][A-Za-z0-9._+=@-]*"  # run and source names: directory and metric names


def data_sources(data: DataConfig) -> list[DataSourceSpec]:
    """The run's sources: data.sources when set, else data.dir alone; checked without touching the disk."""
    if data.sources is None:
        return [DataSourceSpec(Path(data.dir).name or "data", data.dir, 1.0, "data.dir")]
    if not data.sources:
        raise UserError("data.sources is empty; list at least one {dir: DIR, weight: W}, or set it to null and use "
                        "data.dir")
    specs = []
    for i, entry in enumerate(data.sources):
        key = f"data.sources[{i}]"
        unknown = sorted(set(map(str, entry)) - set(SOURCE_KEYS))
        if unknown:
            raise UserError(f"{key} has unknown key(s) {', '.join(unknown)}; a source takes {', '.join(SOURCE_KEYS)}")
        if not isinstance(entry.get("dir"), str) or not entry["dir"]:
            raise UserError(f"{key}.dir is missing; name the prepared directory or Megatron prefix of the source")
        weight = _as_type(entry.get("weight", 1.0), float)
        if weight is _INVALID or weight <= 0:
            raise UserError(f"{key}.weight={entry.get('weight')!r} must be a positive number (the source's share "
                            f"of training tokens, relative to the other weights)")
        name = str(entry.get("name", Path(entry["dir"]).name))
        if not re.fullmatch(PLAIN_NAME, name):
            raise UserError(f"{key}.name={name!r} must be a plain name (letters, digits, . _ - + = @): it names the "
                            f"source's metrics (val_loss/NAME); set {key}.name")
        if name in (spec.name for spec in specs):
            raise UserError(f"{key}.name={name!r} is used by another source too; give each source a unique name "
                            f"({key}.name)")
        specs.append(DataSourceSpec(name, entry["dir"], weight, f"{key}.dir"))
    return specs


@dataclass
class TrainingConfig:
    steps: int = config_field(1000, "optimizer steps to train for", ge=1)
    batch_size: int = config_field(32, "global batch size in sequences (over all data-parallel ranks)", ge=1)
    micro_batch_size: Optional[int] = config_field(
        None, "sequences per rank per forward/backward; batch_size/(ranks*micro_batch_size) steps are accumulated "
              "(null = no accumulation); with parallel.pp > 1 the size of the pipeline's micro-batches (null = as "
              "many micro-batches as pipeline stages)", ge=1)
    lr: float = config_field(1e-3, "peak learning rate", gt=0)
    min_lr_ratio: float = config_field(0.1, "final learning rate as a fraction of lr (cosine and wsd)", ge=0, le=1)
    schedule: str = config_field("cosine", "learning-rate schedule after warmup", ("cosine", "wsd", "constant"))
    warmup_steps: int = config_field(100, "linear warmup steps", ge=0)
    decay_fraction: float = config_field(0.2, "wsd: fraction of steps spent in the final linear decay", gt=0,
                                         le=1)
    weight_decay: float = config_field(0.1, "AdamW weight decay (never on norms, biases or embeddings)", ge=0)
    beta1: float = config_field(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = config_field(0.95, "AdamW beta2", ge=0, lt=1)
    adam_eps: float = config_field(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = config_field(1.0, "clip the global gradient norm to this value (0 = off)", ge=0)
    precision: str = config_field("fp32", "compute precision, always with fp32 master weights and optimizer state: "
                                          "fp32, bf16, or fp8 (bf16 plus torchao FP8 matmuls in the linear layers)",
                                  ("fp32", "bf16", "fp8"))
    fp8_recipe: str = config_field("tensorwise", "precision=fp8: torchao scaling recipe (tensorwise is fastest and "
                                                 "all-gathers FP8 under fsdp; rowwise is more accurate)", FP8_RECIPES)
    fp8_emulate: bool = config_field(False, "precision=fp8 on a GPU without FP8 matmuls (compute capability < 8.9): "
                                            "emulate them in high precision (for testing; slower than bf16)")
    loss_chunk_size: int = config_field(0, "compute the output head and the loss together, this many tokens at a "
                                           "time, so the full logits and their gradient are never held (0 = off, the "
                                           "default; e.g. 1024; with parallel.pp > 1 on the last stage; not used with "
                                           "parallel.tp > 1, deepspeed ZeRO-3 or nGPT, which compute the full "
                                           "logits)", ge=0)
    optimizer: str = config_field("adamw", "adamw, or muon: Muon for the 2-D weights inside the blocks (attention and MLP "
                                           "projections), AdamW for embeddings, head, norms and biases",
                                  ("adamw", "muon"))
    muon_lr: Optional[float] = config_field(None, "optimizer=muon: peak lr of the Muon matrices, on the same schedule "
                                                  "(null = training.lr)", gt=0)
    muon_momentum: float = config_field(0.95, "optimizer=muon: momentum", ge=0, lt=1)
    muon_nesterov: bool = config_field(True, "optimizer=muon: Nesterov momentum")
    muon_ns_steps: int = config_field(5, "optimizer=muon: Newton-Schulz iterations", ge=1, lt=100)
    muon_adjust_lr_fn: str = config_field(
        "match_rms_adamw", "optimizer=muon: per-matrix lr scaling: match_rms_adamw (0.2*sqrt(max(A,B)), Moonshot: "
                           "the AdamW lr and weight decay carry over) or original (sqrt(max(1,A/B)), Keller Jordan)",
        ("match_rms_adamw", "original"))
    muon_ns_dtype: str = config_field(
        "bf16", "optimizer=muon: Newton-Schulz precision: bf16 (as torch.optim.Muon and the reference implementations) "
                "or fp32 (slower; no bf16 rounding)", ("bf16", "fp32"))
    muon_weight_decay: Optional[float] = config_field(
        None, "optimizer=muon: decoupled weight decay of the Muon matrices (null = training.weight_decay)", ge=0)


@dataclass
class CheckpointConfig:
    every: int = config_field(500, "save a checkpoint every N steps (and at the end)", ge=1)
    keep_last: int = config_field(2, "keep only the newest N checkpoints (0 = keep all)", ge=0)
    init_from: Optional[str] = config_field(
        None, "a new run starts from the model weights of this checkpoint (a step directory or the output of "
              "`normtron convert from-hf`) with a fresh optimizer; ignored once the run has its own checkpoints")
    on_damaged: str = config_field("fail", "a checkpoint to load whose files fail their checksums or sizes: fail "
                                           "(one line naming the damaged file and the previous intact checkpoint) "
                                           "or previous (load that one instead)", ("fail", "previous"))
    async_: bool = config_field(  # the key is checkpoint.async (a Python keyword: see key_name)
        False, "save in the background (DCP async_save): training waits only while the state is copied to host "
               "memory; at most one save in flight, the final and preemption checkpoints are waited for; "
               "parallel.backend=deepspeed saves synchronously")


@dataclass
class EvalConfig:
    every: int = config_field(250, "evaluate on val.bin every N steps (and at the end)", ge=1)
    steps: int = config_field(10, "batches of training.batch_size sequences per evaluation (capped by val.bin)",
                              ge=1)
    tasks: Optional[list[str]] = config_field(
        None, "lm-eval tasks (list or comma-separated) run on the live model during training, every rank taking "
              "part; logged as eval/<task>/<metric> (trainer/downstream_live.py)")
    tasks_every: Optional[int] = config_field(None, "run eval.tasks every N steps and at the end (default: "
                                                    "eval.every)", ge=1)
    tasks_include_path: Optional[str] = config_field(None, "directory of local lm-eval task YAMLs (offline tasks)")
    tasks_limit: Optional[int] = config_field(None, "evaluate at most N documents per task", ge=1)
    tasks_num_fewshot: Optional[int] = config_field(None, "few-shot examples per document (default: the task's)",
                                                    ge=0)
    tasks_batch_size: int = config_field(8, "requests per forward in eval.tasks", ge=1)


@dataclass
class LoggingConfig:
    every: int = config_field(10, "print and record training metrics every N steps", ge=1)
    tensorboard: bool = config_field(True, "write TensorBoard events into the run directory")
    peak_tflops: Optional[float] = config_field(
        None, "peak device TFLOP/s for MFU (null = look up known GPUs; no MFU when unknown)", gt=0)
    wandb: str = config_field("disabled", "Weights & Biases tracking from rank 0: the metrics rows, events and the "
                                          "resolved config (offline = local files only, for `wandb sync`)",
                              ("disabled", "online", "offline"))
    wandb_project: str = config_field("normtron", "W&B project")
    wandb_entity: Optional[str] = config_field(None, "W&B entity (team or user; null = your default)")
    wandb_name: Optional[str] = config_field(None, "W&B run name (null = run.name)")
    wandb_group: Optional[str] = config_field(None, "W&B group (null = none; `normtron study` sets its study name)")


@dataclass
class DiagnosticsConfig:
    every: int = config_field(100, "record per-layer diagnostics (grad norms, residual RMS/variance, max activation, "
                                   "max attention logit, update/weight ratio) every N steps and at the first and "
                                   "last step (0 = off)", ge=0)


@dataclass
class StabilityConfig:
    nonfinite: str = config_field("stop", "on a non-finite loss or grad norm: stop the run, skip the step's update "
                                          "(counted), log and go on, or rollback (reload the newest checkpoint "
                                          "before it and skip batches)", ("stop", "skip", "log", "rollback"))
    on_spike: str = config_field("log", "on a loss spike (spike_zscore): log it and go on, or rollback as "
                                        "nonfinite=rollback does", ("log", "rollback"))
    rollback_skip_batches: Optional[int] = config_field(
        None, "batches skipped after a rollback, counted from the reloaded checkpoint's data position (null = "
              "those from the checkpoint through the step of the event)", ge=0)
    max_rollbacks: int = config_field(3, "at most N rollbacks for events within rollback_window steps; one more "
                                         "stops the run", ge=1)
    rollback_window: int = config_field(1000, "the window, in training steps, that max_rollbacks counts over", ge=1)
    spike_window: int = config_field(100, "loss-spike detection: z-score against the last N losses (0 = off; on "
                                          "reads the loss every step)", ge=0)
    spike_zscore: float = config_field(6.0, "z-score above which a loss is reported as a spike", gt=0)
    z_loss: float = config_field(0.0, "z-loss coefficient: adds z_loss * mean(logsumexp(logits)^2) to the loss "
                                      "(PaLM uses 1e-4; 0 = off)", ge=0)


@dataclass
class DebugConfig:
    """Fault injection, for testing recovery: each fault fires once per process, the first time the step runs."""
    nan_at_step: Optional[int] = config_field(None, "fault injection for testing recovery (once per process, the "
                                                    "first time step N runs): the loss (and so every gradient) of "
                                                    "step N is NaN, as in a diverged step", ge=1)
    spike_at_step: Optional[int] = config_field(None, "fault injection for testing recovery (once per process, the "
                                                      "first time step N runs): the loss and gradients of step N "
                                                      "are multiplied by 1000, a loss spike", ge=1)


# Sections passed through as free-form mappings rather than typed fields.
FREE_FORM_SECTIONS = {
    "deepspeed": "DeepSpeed config entries merged into the one normtron builds (parallel.backend=deepspeed); "
                 "batch sizes, precision, clipping, ZeRO stage, optimizer and scheduler come from normtron's keys",
}


@dataclass
class Config:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)
    stability: StabilityConfig = dataclasses.field(default_factory=StabilityConfig)
    debug: DebugConfig = dataclasses.field(default_factory=DebugConfig)
    deepspeed: dict = dataclasses.field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# --- Loading -----------------------------------------------------------------------------------------------------

def key_name(name: str) -> str:
    """The config key of a field: a Python keyword is spelled with a trailing underscore in code (async_)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _fields(section: Any) -> dict[str, dataclasses.Field]:
    return {key_name(f.name): f for f in dataclasses.fields(section)}


def all_keys(cfg: Config | None = None) -> list[str]:
    cfg = cfg or Config()
    return [f"{s}.{k}" for s in _fields(cfg) if s not in FREE_FORM_SECTIONS for k in _fields(getattr(cfg, s))]


def _unknown_key(key: str, known: list[str]) -> UserError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(known)}"
    return UserError(f"unknown config key '{key}'{hint}")


_INVALID = object()
LIST_ITEMS = {int: "whole numbers", str: "names", dict: "mappings"}


def _as_type(value: Any, base: Any) -> Any:
    """`value` as `base`, or _INVALID; numeric strings such as '3e-4' (which YAML leaves as str) are accepted,
    and a list of strings may also be written comma-separated (handy on the command line)."""
    if typing.get_origin(base) is list:
        items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
        if not isinstance(items, list):
            return _INVALID
        if typing.get_args(base)[0] is dict:  # a list of mappings (data.sources)
            return items if all(isinstance(v, dict) for v in items) else _INVALID
        if typing.get_args(base)[0] is int:
            items = [_as_type(v, int) for v in items]
            return _INVALID if any(v is _INVALID for v in items) else items
        return items if all(isinstance(v, str) and v for v in items) else _INVALID
    if base is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value if isinstance(value, bool) else _INVALID
    if isinstance(value, bool):  # YAML's `true` where a number or name belongs is a mistake, not 1
        return _INVALID
    if base is str:  # names such as 2024-01-01 arrive as dates from YAML
        return str(value) if isinstance(value, (str, int, float, datetime.date)) else _INVALID
    if isinstance(value, str):
        try:
            value = float(value) if base is float or not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            return _INVALID
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return _INVALID
    if base is int:
        return int(value) if float(value).is_integer() else _INVALID
    return float(value)


def _coerce(key: str, value: Any, field: dataclasses.Field, hint: Any) -> Any:
    """Check `value` against the field's type hint and allowed values."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None:
        if optional:
            return None
        raise UserError(f"{key} must not be null (expected {base.__name__})")
    parsed = _as_type(value, base)
    if parsed is _INVALID:
        wanted = (f"list of {LIST_ITEMS[typing.get_args(base)[0]]}"
                  if typing.get_origin(base) is list else base.__name__)
        raise UserError(f"{key} expects {wanted}{' or null' if optional else ''}, got {value!r} "
                        f"({type(value).__name__})")
    choices = field.metadata.get("choices")
    for item in parsed if isinstance(parsed, list) else [parsed]:
        if choices and item not in choices:
            raise UserError(f"{key}={item!r} is not allowed; choose one of {', '.join(map(str, choices))}")
    if (problem := bounds_error(key, parsed, field)) is not None:
        raise UserError(problem)
    return parsed


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set `section.field` to `value` after type checking; unknown keys suggest the closest known key."""
    parts = key.split(".")
    if parts[0] in FREE_FORM_SECTIONS and len(parts) > 1 and all(parts):
        _set_free_form(getattr(cfg, parts[0]), parts[1:], value)
        return
    if len(parts) != 2 or parts[0] not in _fields(cfg) or parts[1] not in _fields(getattr(cfg, parts[0])):
        raise _unknown_key(key, all_keys(cfg))
    section, field = getattr(cfg, parts[0]), _fields(getattr(cfg, parts[0]))[parts[1]]
    hint = typing.get_type_hints(type(section))[field.name]
    setattr(section, field.name, _coerce(key, value, field, hint))


def _set_free_form(mapping: dict, path: list[str], value: Any) -> None:
    """`deepspeed.zero_optimization.overlap_comm=true`: nested keys are created as needed."""
    for part in path[:-1]:
        mapping = mapping.setdefault(part, {})
        if not isinstance(mapping, dict):
            raise UserError(f"cannot set '{'.'.join(path)}': '{part}' holds a value, not a mapping")
    mapping[path[-1]] = value


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (otherwise the last one silently wins)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        for key in keys:
            if keys.count(key) > 1:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (or shipped config named by its stem), then `section.key=value` overrides
    (values parsed as YAML)."""
    cfg = Config()
    if path is not None:
        path = config_path(path)
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UserError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must be a mapping of sections (run:, data:, model:, ...)")
        for section, values in data.items():
            if section not in _fields(cfg):
                raise _unknown_key(str(section), list(_fields(cfg)))
            if not isinstance(values, (dict, type(None))):  # a section whose keys are all commented out is None
                raise UserError(f"section '{section}' in {path} must be a mapping of keys to values")
            if section in FREE_FORM_SECTIONS:
                getattr(cfg, section).update(values or {})
                continue
            for key, value in (values or {}).items():
                set_key(cfg, f"{section}.{key}", value)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"override '{item}' is not of the form section.key=value (e.g. training.lr=3e-4)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        set_key(cfg, key.strip(), value)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return {section: values if section in FREE_FORM_SECTIONS else {key_name(k): v for k, v in values.items()}
            for section, values in dataclasses.asdict(cfg).items()}


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    for section, values in data.items():
        if section in FREE_FORM_SECTIONS:
            getattr(cfg, section).update(values or {})
            continue
        for key, value in values.items():
            set_key(cfg, f"{section}.{key}", value)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def describe_keys() -> str:
    """Every config key with its default and help, for `normtron train --help`."""
    cfg, lines = Config(), []
    for section in _fields(cfg):
        if section in FREE_FORM_SECTIONS:
            lines.append(f"{section}: {{...}}\n      {FREE_FORM_SECTIONS[section]}")
            continue
        lines.append(f"{section}:")
        for name, field in _fields(getattr(cfg, section)).items():
            default = getattr(getattr(cfg, section), field.name)
            choices, bounds = field.metadata.get("choices"), field.metadata.get("bounds", {})
            extra = f" [{'|'.join(map(str, choices))}]" if choices else ""
            symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
            extra += f" ({', '.join(f'{symbols[k]} {v}' for k, v in bounds.items())})" if bounds else ""
            lines.append(f"  {section}.{name} = {default!r}{extra}\n      {field.metadata.get('help', '')}")
    return "\n".join(lines)


# --- Validation ----------------------------------------------------------------------------------------------------

def config_warnings(cfg: Config) -> list[str]:
    """Settings that run but are probably not what was meant: one line each, printed at the start of a run and by
    `train --check`."""
    t = cfg.training
    warnings = []
    if t.warmup_steps > t.steps:
        warnings.append(f"training.warmup_steps={t.warmup_steps} is longer than training.steps={t.steps}: the run "
                        f"ends still warming up, below training.lr; lower training.warmup_steps")
    return warnings


def validate(cfg: Config, world_size: int = 1) -> ParallelDims:
    """Cross-field checks that need no data on disk; raises UserError naming the key. Returns the rank layout,
    resolved here once for the whole run."""
    try:
        cfg.model.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    if not re.fullmatch(PLAIN_NAME, cfg.run.name):
        raise UserError(f"run.name={cfg.run.name!r} must be a plain directory name (letters, digits, . _ - + = @), "
                        f"not a path; use run.output_dir for the location")
    data_sources(cfg.data)
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
                        f"raise model.max_seq_len or shorten data.seq_len")
    dims = validate_parallel(cfg, world_size)
    if cfg.stability.nonfinite == "skip" and cfg.parallel.backend == "deepspeed":
        raise UserError("stability.nonfinite=skip is not available with parallel.backend=deepspeed (DeepSpeed "
                        "steps the optimizer inside its engine); use stop or log")
    if cfg.stability.on_spike == "rollback" and cfg.stability.spike_window == 0:
        raise UserError("stability.on_spike=rollback needs loss-spike detection; set stability.spike_window > 0 "
                        "(e.g. 100)")
    if cfg.training.optimizer == "muon" and cfg.parallel.backend == "deepspeed":
        raise UserError("training.optimizer=muon is not available with parallel.backend=deepspeed (its ZeRO "
                        "partitions and bf16 optimizer flatten the matrices that Muon orthogonalizes whole); use "
                        "parallel.backend=fsdp (Muon distributed over the shards) or ddp")
    if cfg.training.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(f"training.optimizer=muon needs torch >= 2.9 (torch.optim.Muon); this is torch "
                        f"{torch.__version__}")
    validate_pipeline(cfg, dims)  # the micro-batch split too, with or without a pipeline
    validate_precision(cfg)
    if cfg.eval.tasks:
        from normtron.trainer.downstream import check_live_tasks

        check_live_tasks(cfg)
    if cfg.logging.wandb != "disabled" and importlib.util.find_spec("wandb") is None:
        raise UserError(f"logging.wandb={cfg.logging.wandb} needs wandb: pip install 'normtron[wandb]' (or pip "
                        f"install wandb), or set logging.wandb=disabled")
    return dims


def validate_precision(cfg: Config) -> None:
    """FP8 needs torchao, a backend that runs it, and hardware with FP8 matmuls (or the emulation flag)."""
    t = cfg.training
    if t.precision != "fp8":
        return
    if cfg.parallel.backend == "deepspeed":
        raise UserError("training.precision=fp8 is not available with parallel.backend=deepspeed; use ddp or fsdp "
                        "(or training.precision=bf16 with deepspeed)")
    if importlib.util.find_spec("torchao") is None:
        raise UserError("training.precision=fp8 needs torchao: pip install 'normtron[fp8]' (or pip install torchao)")
    problem = float8_problem(pick_device()[0], t.fp8_emulate)
    if problem:
        raise UserError(f"training.precision=fp8: {problem}; use training.precision=bf16, or set "
                        f"training.fp8_emulate=true to emulate FP8 (numerics only, no speed-up)")


def parallel_dims(cfg: Config, world_size: int) -> ParallelDims:
    """The rank layout parallel.* asks for over `world_size` ranks (UserError if the degrees do not multiply up)."""
    p = cfg.parallel
    try:
        return ParallelDims.resolve(p.pp, p.dp_replicate, p.dp_shard, p.tp, world_size)
    except ValueError as err:
        raise UserError(str(err)) from None


def validate_parallel(cfg: Config, world_size: int) -> ParallelDims:
    """The rank layout and the options each backend accepts."""
    p = cfg.parallel
    if (p.tp > 1 or p.pp > 1) and p.backend != "fsdp":
        raise UserError(f"parallel.tp={p.tp} / parallel.pp={p.pp} need parallel.backend=fsdp (FSDP2 composes with "
                        f"tensor and pipeline parallelism; set parallel.dp_shard=1 for no data sharding)")
    dims = parallel_dims(cfg, world_size)
    validate_tensor_parallel(cfg)
    if p.backend != "fsdp" and dims.dp_replicate != 1:
        raise UserError(f"parallel.dp_replicate={p.dp_replicate} (HSDP) needs parallel.backend=fsdp; "
                        f"parallel.backend={p.backend} replicates or shards over all ranks")
    if p.backend != "deepspeed" and p.zero_stage != 0:
        raise UserError(f"parallel.zero_stage={p.zero_stage} applies to parallel.backend=deepspeed; with "
                        f"parallel.backend={p.backend} leave it at 0 (fsdp shards like ZeRO-3 by itself)")
    if p.backend == "ddp" and (p.offload_params or p.offload_optimizer):
        raise UserError("CPU offload needs parallel.backend=fsdp or deepspeed; set parallel.offload_params and "
                        "parallel.offload_optimizer to false for ddp")
    if p.backend == "fsdp" and p.offload_params and not torch.cuda.is_available():
        raise UserError("parallel.offload_params with parallel.backend=fsdp moves parameters from the GPU to host "
                        "memory; without a GPU they are in host memory already: set it to false")
    if p.backend == "fsdp" and p.offload_optimizer:
        raise UserError("parallel.offload_optimizer is a DeepSpeed option; FSDP2 offloads parameters, gradients and "
                        "the optimizer step together: use parallel.offload_params=true instead")
    if p.backend == "deepspeed" and p.offload_params and p.zero_stage != 3:
        raise UserError(f"parallel.offload_params needs parallel.zero_stage=3 (only ZeRO-3 partitions parameters); "
                        f"got zero_stage={p.zero_stage}")
    if p.backend == "deepspeed" and p.offload_optimizer and p.zero_stage == 0:
        raise UserError("parallel.offload_optimizer needs parallel.zero_stage >= 1 (ZeRO-Offload)")
    if p.backend == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("parallel.backend=deepspeed needs DeepSpeed: pip install 'normtron[deepspeed]'")
        deepspeed_config(cfg, world_size)
    return dims


def validate_tensor_parallel(cfg: Config) -> None:
    """What tp > 1 needs of the model: whole heads, KV heads and MLP columns per rank, and whole sequence shards."""
    m, tp = cfg.model, cfg.parallel.tp
    if tp == 1:
        return
    for key, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads),
                       ("the SwiGLU hidden size (model.ffn_hidden_dim)", m.hidden_dim)):
        if value % tp:
            raise UserError(f"{key}={value} does not divide by parallel.tp={tp}; each tensor-parallel rank needs a "
                            f"whole share: pick a tp that divides it")
    if m.vocab_size is not None and m.vocab_size % tp:
        raise UserError(f"model.vocab_size={m.vocab_size} does not divide by parallel.tp={tp} (the embedding and "
                        f"head are split over the vocabulary); round model.vocab_size up to a multiple of {tp}")
    if cfg.parallel.sequence_parallel and cfg.data.seq_len % tp:
        raise UserError(f"data.seq_len={cfg.data.seq_len} does not divide by parallel.tp={tp}, which sequence "
                        f"parallelism needs; change data.seq_len or set parallel.sequence_parallel=false")


def pipeline_stages(cfg: Config) -> int:
    """Pipeline stages in all (parallel.pp x stages per rank); 1 without pipeline parallelism."""
    p = cfg.parallel
    return p.pp * stages_per_rank(p.pp_schedule, p.pp_stages_per_rank) if p.pp > 1 else 1


def validate_pipeline(cfg: Config, dims: ParallelDims) -> None:
    """The micro-batches, then what pp > 1 needs: a layer or more per stage, the stage split, and what the
    schedule needs of its stages per rank and micro-batches (micro_batching also applies without a pipeline)."""
    p, n_layers = cfg.parallel, cfg.model.n_layers
    stages = pipeline_stages(cfg)
    n_micro = micro_batching(cfg.training, dims.dp_size, stages)[1]
    if p.pp == 1:
        return
    per_rank = stages // p.pp
    if p.pp_schedule in SINGLE_STAGE_SCHEDULES and per_rank != 1:
        raise UserError(f"parallel.pp_schedule={p.pp_schedule} runs one stage per rank; set parallel."
                        f"pp_stages_per_rank=1 (or null), or use Interleaved1F1B, InterleavedZeroBubble or "
                        f"ZBVZeroBubble for {per_rank} stages per rank")
    if p.pp_schedule == "ZBVZeroBubble" and per_rank != 2:
        raise UserError(f"parallel.pp_schedule=ZBVZeroBubble runs exactly 2 stages per rank (a V); got "
                        f"parallel.pp_stages_per_rank={per_rank}")
    if cfg.model.tie_embeddings:
        raise UserError("model.tie_embeddings=true cannot be pipelined: the embedding (first stage) and the head "
                        "(last stage) would live on different ranks; set model.tie_embeddings=false or parallel.pp=1")
    if p.pp_layers is not None:
        if len(p.pp_layers) != stages or sum(p.pp_layers) != n_layers or min(p.pp_layers) < 1:
            raise UserError(f"parallel.pp_layers={','.join(map(str, p.pp_layers))} must give one count >= 1 per "
                            f"pipeline stage ({stages} = pp {p.pp} x {per_rank} per rank) adding up to "
                            f"model.n_layers={n_layers}")
    elif n_layers < stages:
        raise UserError(f"model.n_layers={n_layers} is fewer than the {stages} pipeline stages (pp {p.pp} x "
                        f"{per_rank} per rank); each stage needs a layer: lower parallel.pp or pp_stages_per_rank")
    if p.pp_schedule == "1F1B" and n_micro < p.pp:
        raise UserError(f"parallel.pp_schedule=1F1B needs at least parallel.pp={p.pp} micro-batches per step; got "
                        f"{n_micro} (training.batch_size / data-parallel ranks / training.micro_batch_size): lower "
                        f"training.micro_batch_size")
    rounds = max(1, n_micro // p.pp)
    if p.pp_schedule in ("Interleaved1F1B", "InterleavedZeroBubble") and n_micro % rounds:
        raise UserError(f"parallel.pp_schedule={p.pp_schedule} needs the micro-batches per step ({n_micro}) to be "
                        f"a multiple of {rounds} (micro-batches // parallel.pp); use a multiple of parallel.pp")


def micro_batching(t: TrainingConfig, dp_size: int, pipeline_stages: int = 1) -> tuple[int, int]:
    """(sequences per micro-batch, micro-batches per step) on each data-parallel rank.

    With pipeline parallelism the micro-batches are the pipeline's; by default as many as there are stages (the
    fewest that keep every stage busy) when the rank's batch divides into them, else one sequence each."""
    local = t.batch_size // dp_size
    if t.micro_batch_size is None and pipeline_stages > 1 and local >= 1:
        micro = local // next((n for n in range(pipeline_stages, local + 1) if local % n == 0), local)
    else:
        micro = t.micro_batch_size or local
    if micro < 1 or t.batch_size % (dp_size * micro):
        raise UserError(f"training.batch_size={t.batch_size} must be a multiple of data-parallel ranks ({dp_size}) "
                        f"x training.micro_batch_size ({t.micro_batch_size or 'auto'}); adjust either")
    return micro, t.batch_size // (dp_size * micro)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON config this run uses: normtron's keys, then the `deepspeed:` section merged over them."""
    t, p = cfg.training, cfg.parallel
    micro, accum_steps = micro_batching(t, world_size)
    try:
        return build_deepspeed_config(
            global_batch=t.batch_size, micro_batch=micro, accum_steps=accum_steps, grad_clip=t.grad_clip,
            bf16=t.precision == "bf16", zero_stage=p.zero_stage, offload_optimizer=p.offload_optimizer,
            offload_params=p.offload_params, user=cfg.deepspeed)
    except ValueError as err:
        raise UserError(str(err)) from None
