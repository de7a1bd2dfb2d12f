"""The study file: a grid of training runs ("cells"), how each is launched and with which resources.

    base: ../tiny.yaml              # training config every run starts from (relative to the study file)
    output_dir: runs/study-cpu      # runs/<cell>/ for the runs, logs/, status/, report/ (relative to the cwd)
    max_parallel: 2                 # cells at a time; with launcher: slurm, queued or running (default: all)
    overrides: {training.steps: 200}  # applied to every run
    grid:                           # the runs: every combination of these values
      model.placement: [pre, post]
      training.lr: [1.0e-3, 1.0e-2]
      run.seed: [0, 1]              # seeds are averaged over in the report
    reference: {training.lr: 1.0e-3}  # the cell the per-layer plots show (default: each axis's first value)

An axis may instead list named variants, each a set of overrides, for choices that span several keys:

    grid:
      model.placement:              # a variant that does not set the axis key itself sets it to its name
        pre: {}
        subln: {}
        dyt-pre: {model.placement: pre, model.norm: dyt}

    launcher: slurm                 # local (default: one process per cell) | torchrun | slurm
    nproc_per_cell: 2               # torchrun: processes per cell (default: 1 per GPU, else 2)
    retries: 1                      # slurm: resubmit a cell whose job failed (not diverged) this many times
    resources:                      # slurm: per cell, passed to sbatch launch/slurm/train.sbatch
      nodes: 2
      gpus_per_node: 8
      nproc_per_node: 8             # processes per node (default: gpus_per_node, else 2)
      time: "24:00:00"
      partition: gpu
      account: myproject
      sbatch: [--qos=normal]        # any other sbatch options
      per_axis:                     # overrides for the cells with a given grid value
        model.dim: {2048: {nodes: 4}}
    cost: {gpu_peak_tflops: 989, mfu: 0.4}   # the cost estimate's assumptions (defaults: H100 bf16, 40% MFU)
    published:                      # a paper's numbers, shown next to the measured ones in the report
      source: "the paper, table N"
      metric: perplexity            # perplexity (exp of the final val loss) | val_loss
      axis: model.placement         # the grid axis the numbers are given by
      values: {pre: <number>, mix: <number>}
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from normtron.models.transformer import flops_per_token
from normtron.trainer.config import load_config, validate
from normtron.trainer.data.mixture import open_sources
from normtron.trainer.errors import UserError
from normtron.trainer.resources import config_path

STUDY_KEYS = {"base", "output_dir", "max_parallel", "overrides", "grid", "reference", "launcher", "nproc_per_cell",
              "retries", "resources", "cost", "published"}
LAUNCHERS = ("local", "torchrun", "slurm")
SEED_KEY = "run.seed"


@dataclass
class Resources:
    """What one cell's Slurm job asks for."""
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    sbatch: list[str] = field(default_factory=list)

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 2

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


RESOURCE_KEYS = {f.name for f in dataclasses.fields(Resources)}


@dataclass
class Cell:
    """One run of the grid: its grid values, name, directory, steps, and what it costs."""
    values: dict
    name: str
    run_dir: Path
    steps: int
    overrides: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)
    tokens: int = 0                  # trained over all steps
    flops_per_token: float = 0.0


@dataclass
class Study:
    path: Path
    base: Path
    output_dir: Path
    max_parallel: int
    overrides: dict
    grid: dict
    reference: dict
    cells: list[Cell]
    launcher: str = "local"
    nproc_per_cell: int = 1
    retries: int = 1
    cost: dict = field(default_factory=dict)
    published: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)  # axis -> {variant name: {key: value}} for named-variant axes

    @property
    def axes(self) -> list[str]:
        return list(self.grid)

    def status_file(self, cell: Cell) -> Path:
        return self.output_dir / "status" / f"{cell.name}.json"

    def log_file(self, cell: Cell) -> Path:
        return self.output_dir / "logs" / f"{cell.name}.log"


def _yaml_value(value) -> str:
    return json.dumps(value)  # JSON is YAML: the trainer's override parser reads it back unchanged


def _short_names(keys: list[str]) -> dict[str, str]:
    """`model.placement` -> `placement` unless two axes share the last part."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def cell_name(values: dict, short: dict[str, str]) -> str:
    text = "_".join(f"{short[k]}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9._+=@-]", "-", text)


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_parallel(launcher: str, nproc: int, cells: int) -> int:
    """local/torchrun: as many cells as the GPUs (or half the CPU cores) hold; slurm: every cell (Slurm queues)."""
    if launcher == "slurm":
        return cells
    if gpu_count():
        return max(1, gpu_count() // nproc)
    return max(1, (os.cpu_count() or 1) // (2 * nproc))


def _positive_int(path: Path, name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"study file {path}: {name} must be a whole number >= {minimum}, not {value!r}")
    return value


def _resources(path: Path, where: str, data) -> dict:
    """A checked resources mapping (without per_axis)."""
    if not isinstance(data, dict):
        raise UserError(f"study file {path}: {where} must be a mapping of {', '.join(sorted(RESOURCE_KEYS))}")
    unknown = sorted(set(map(str, data)) - RESOURCE_KEYS)
    if unknown:
        raise UserError(f"study file {path}: {where}: unknown key(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(RESOURCE_KEYS))}, per_axis")
    for key in ("nodes", "nproc_per_node"):
        if data.get(key) is not None:
            _positive_int(path, f"{where}.{key}", data[key])
    if "gpus_per_node" in data:
        _positive_int(path, f"{where}.gpus_per_node", data["gpus_per_node"], 0)
    for key in ("time", "partition", "account"):  # YAML reads an unquoted 24:00:00 as the number 86400
        if data.get(key) is not None and not isinstance(data[key], str):
            example = '"24:00:00"' if key == "time" else '"gpu"'
            raise UserError(f"study file {path}: {where}.{key} must be a quoted string such as {example}, "
                            f"not {data[key]!r}")
    if not isinstance(data.get("sbatch", []), list):
        raise UserError(f"study file {path}: {where}.sbatch must be a list of sbatch options, e.g. [--qos=high]")
    return dict(data)


def cell_resources(path: Path, resources: dict | None, grid: dict) -> Callable[[dict], Resources]:
    """The study's resources, and a function from a cell's grid values to its Resources (per-axis overrides
    applied in the order of the study file; sbatch options add up)."""
    resources = dict(resources or {})
    per_axis = resources.pop("per_axis", {}) or {}
    base = _resources(path, "resources", resources)
    if not isinstance(per_axis, dict):
        raise UserError(f"study file {path}: resources.per_axis must map a grid axis to {{value: resources}}")
    checked = {}
    for axis, by_value in per_axis.items():
        if axis not in grid:
            raise UserError(f"study file {path}: resources.per_axis.{axis} is not a grid axis ({', '.join(grid)})")
        if not isinstance(by_value, dict):
            raise UserError(f"study file {path}: resources.per_axis.{axis} must map values of {axis} to resources")
        for value, extra in by_value.items():
            if value not in grid[axis]:
                raise UserError(f"study file {path}: resources.per_axis.{axis}: {value!r} is not a value of the "
                                f"grid axis ({grid[axis]})")
            checked[(axis, value)] = _resources(path, f"resources.per_axis.{axis}.{value}", extra)

    def resolve(values: dict) -> Resources:
        merged = dict(base)
        for (axis, value), extra in checked.items():
            if values.get(axis) == value:
                sbatch = merged.get("sbatch", []) + extra.get("sbatch", [])
                merged.update(extra)
                merged["sbatch"] = sbatch
        return Resources(**{**merged, "sbatch": [str(o) for o in merged.get("sbatch", [])]})
    return resolve


def _published(path: Path, data, grid: dict) -> dict:
    if not data:
        return {}
    if not isinstance(data, dict) or not {"axis", "values"} <= set(data):
        raise UserError(f"study file {path}: published: needs axis: (a grid axis) and values: {{value: number}}")
    if data["axis"] not in grid:
        raise UserError(f"study file {path}: published.axis {data['axis']} is not a grid axis ({', '.join(grid)})")
    if data.get("metric", "perplexity") not in ("perplexity", "val_loss"):
        raise UserError(f"study file {path}: published.metric must be perplexity or val_loss, not {data['metric']!r}")
    if not isinstance(data["values"], dict) or not all(isinstance(v, (int, float)) for v in data["values"].values()):
        raise UserError(f"study file {path}: published.values must map values of {data['axis']} to numbers")
    return {"metric": "perplexity", "source": "", **data}


def _grid(path: Path, grid) -> tuple[dict, dict]:
    """(axis -> list of values, axis -> {name: overrides} for the axes given as named variants)."""
    problem = (f"study file {path}: grid: must map config keys to non-empty lists of values, or to named variants "
               f"{{name: {{key: value, ...}}}}")
    if not isinstance(grid, dict) or not grid:
        raise UserError(problem)
    values, variants = {}, {}
    for axis, entry in grid.items():
        if isinstance(entry, list) and entry:
            values[axis] = entry
        elif isinstance(entry, dict) and entry and all(isinstance(v, dict) or v is None for v in entry.values()):
            variants[axis] = {name: dict(overrides or {}) for name, overrides in entry.items()}
            values[axis] = list(variants[axis])
        else:
            raise UserError(problem)
    return values, variants


def variant_overrides(axis: str, name, variants: dict) -> dict:
    """The overrides of one grid value: a named variant's own, with its name as the axis key's value when the axis
    is a config key (section.key) the variant does not set; a plain value sets the axis key."""
    if axis not in variants:
        return {axis: name}
    overrides = dict(variants[axis][name])
    if "." in str(axis) and axis not in overrides:
        overrides[axis] = name
    return overrides


def _data_key(cfg) -> str:
    """Cells whose data sections differ only in seq_len read the same data."""
    return repr(dataclasses.replace(cfg.data, seq_len=0))


def load_study(path: str | Path, max_parallel: int | None = None, check_data: bool = True) -> Study:
    """Read and check a study file; every cell's config is validated (for its world size) before anything runs."""
    path = config_path(path, "study")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"study file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"study file {path} must be a mapping with base:, grid: and output_dir:")
    unknown = sorted(set(map(str, data)) - STUDY_KEYS)
    if unknown:
        raise UserError(f"study file {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(STUDY_KEYS))}")
    for key in ("base", "grid", "output_dir"):
        if key not in data:
            raise UserError(f"study file {path} needs a '{key}:' entry")
    grid, variants = _grid(path, data["grid"])
    overrides, reference = data.get("overrides") or {}, data.get("reference") or {}
    for name, value in (("overrides", overrides), ("reference", reference)):
        if not isinstance(value, dict):
            raise UserError(f"study file {path}: {name}: must be a mapping of config keys to values")
    for key, value in reference.items():
        if key not in grid or value not in grid[key]:
            raise UserError(f"study file {path}: reference {key}={value!r} is not a value of the grid axis {key}")
    variant_keys = {key for by_name in variants.values() for chosen in by_name.values() for key in chosen}
    for key in ("run.name", "run.output_dir"):
        if key in grid or key in overrides or key in variant_keys:
            raise UserError(f"study file {path}: {key} is set by the study for each run; remove it")
    launcher = data.get("launcher", "local")
    if launcher not in LAUNCHERS:
        raise UserError(f"study file {path}: unknown launcher {launcher!r}; use one of {', '.join(LAUNCHERS)}")
    nproc = _positive_int(path, "nproc_per_cell", data.get("nproc_per_cell", gpu_count() or 2))
    retries = _positive_int(path, "retries", data.get("retries", 1), 0)
    resolve = cell_resources(path, data.get("resources"), grid)
    cost = data.get("cost") or {}
    if not isinstance(cost, dict) or set(cost) - {"gpu_peak_tflops", "mfu"} or not all(
            isinstance(v, (int, float)) and v > 0 for v in cost.values()) or cost.get("mfu", 0.4) > 1:
        raise UserError(f"study file {path}: cost: takes gpu_peak_tflops: (> 0) and mfu: (a fraction in (0, 1])")
    published = _published(path, data.get("published"), grid)

    base = (path.parent / str(data["base"])).resolve()
    output_dir = Path(str(data["output_dir"]))
    study = Study(path, base, output_dir, 1, overrides, grid, reference, [], launcher, nproc, retries,
                  {"gpu_peak_tflops": 989.0, "mfu": 0.4, **cost}, published, variants)
    short = _short_names(list(grid))
    common = [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    configs = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = cell_name(values, short)
        resources = resolve(values)
        world = {"local": 1, "torchrun": nproc, "slurm": resources.nodes * resources.procs_per_node}[launcher]
        chosen = {k: v for axis, name in values.items() for k, v in variant_overrides(axis, name, variants).items()}
        run_overrides = [*common, *(f"{k}={_yaml_value(v)}" for k, v in chosen.items()),
                         f"run.output_dir={output_dir / 'runs'}", f"run.name={name}"]
        try:
            cfg = load_config(base, run_overrides)
            if cfg.logging.wandb != "disabled" and cfg.logging.wandb_group is None:  # W&B groups the study's cells
                run_overrides.append(f"logging.wandb_group={_yaml_value(path.stem)}")
                cfg = load_config(base, run_overrides)
            validate(cfg, world)
        except UserError as err:
            raise UserError(f"study cell {name}: {err}") from None
        study.cells.append(Cell(values, name, cfg.run_dir, cfg.training.steps, run_overrides, resources,
                                cfg.training.steps * cfg.training.batch_size * cfg.data.seq_len))
        configs.append(cfg)
    # After every cell is checked, each distinct data section once, so a missing corpus fails once.
    vocab = {}
    if check_data:
        for cfg in configs:
            if _data_key(cfg) not in vocab:
                vocab[_data_key(cfg)] = open_sources(cfg.data)[0].meta["vocab_size"]
    for cell, cfg in zip(study.cells, configs):
        if cfg.model.vocab_size is None and _data_key(cfg) in vocab:
            cfg.model.vocab_size = vocab[_data_key(cfg)]
        cell.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len) if cfg.model.vocab_size else 0.0
    parallel = max_parallel if max_parallel is not None else data.get(
        "max_parallel", default_parallel(launcher, nproc if launcher == "torchrun" else 1, len(study.cells)))
    study.max_parallel = _positive_int(path, "max_parallel", parallel)
    return study
