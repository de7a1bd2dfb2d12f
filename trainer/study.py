"""`normtron study STUDY.yaml`: train every cell of a grid (each in its own run directory, several at a time),
then write a report (trainer/report.py). Re-running skips finished runs and resumes interrupted ones.

A study file:

    base: ../tiny.yaml              # training config every run starts from (relative to the study file)
    output_dir: runs/study-cpu      # runs/<cell>/ for the runs, logs/, status/, report/ (relative to the cwd)
    max_parallel: 2                 # runs at a time (default: 1 per 2 CPU cores, or 1 per GPU)
    overrides: {training.steps: 200}  # applied to every run
    grid:                           # the runs: every combination of these values
      model.placement: [pre, post]
      training.lr: [1.0e-3, 1.0e-2]
      run.seed: [0, 1]              # seeds are averaged over in the report
    reference: {training.lr: 1.0e-3}  # the cell the per-layer plots show (default: each axis's first value)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from trainer.checkpoint import complete_checkpoints
from trainer.config import DataConfig, load_config, validate
from trainer.data.mixture import open_sources
from trainer.errors import UserError
from trainer.metrics import format_duration

STUDY_KEYS = {"base", "output_dir", "max_parallel", "overrides", "grid", "reference"}
SEED_KEY = "run.seed"


@dataclass
class Cell:
    """One run of the grid: its grid values, name, directory and how many steps it trains."""
    values: dict
    name: str
    run_dir: Path
    steps: int
    overrides: list[str] = field(default_factory=list)


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


def default_parallel() -> int:
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, (os.cpu_count() or 1) // 2)


def load_study(path: str | Path, max_parallel: int | None = None) -> Study:
    """Read and check a study file; every cell's config is validated before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file {path} does not exist; pass a YAML file such as configs/study/cpu.yaml")
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
    grid, overrides, reference = data["grid"], data.get("overrides") or {}, data.get("reference") or {}
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"study file {path}: grid: must map config keys to non-empty lists of values")
    for name, value in (("overrides", overrides), ("reference", reference)):
        if not isinstance(value, dict):
            raise UserError(f"study file {path}: {name}: must be a mapping of config keys to values")
    for key, value in reference.items():
        if key not in grid or value not in grid[key]:
            raise UserError(f"study file {path}: reference {key}={value!r} is not a value of the grid axis {key}")
    for key in ("run.name", "run.output_dir"):
        if key in grid or key in overrides:
            raise UserError(f"study file {path}: {key} is set by the study for each run; remove it")
    parallel = max_parallel if max_parallel is not None else data.get("max_parallel", default_parallel())
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise UserError(f"study file {path}: max_parallel must be a positive whole number, not {parallel!r}")
    base = (path.parent / str(data["base"])).resolve()
    output_dir = Path(str(data["output_dir"]))
    study = Study(path, base, output_dir, parallel, overrides, grid, reference, [])
    short = _short_names(list(grid))
    common = [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    data_configs: dict[str, DataConfig] = {}  # each distinct data section once
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = cell_name(values, short)
        run_overrides = [*common, *(f"{k}={_yaml_value(v)}" for k, v in values.items()),
                         f"run.output_dir={output_dir / 'runs'}", f"run.name={name}"]
        try:
            cfg = load_config(base, run_overrides)
            validate(cfg)
        except UserError as err:
            raise UserError(f"study cell {name}: {err}") from None
        study.cells.append(Cell(values, name, cfg.run_dir, cfg.training.steps, run_overrides))
        data_configs[repr(dataclasses.replace(cfg.data, seq_len=0))] = cfg.data
    for key in sorted(data_configs):  # a missing corpus fails here once, not in every run
        open_sources(data_configs[key])
    return study


def finished(cell: Cell) -> bool:
    done = complete_checkpoints(cell.run_dir / "checkpoints")
    return bool(done) and done[-1][0] >= cell.steps


def cell_status(study: Study, cell: Cell) -> str:
    """finished | diverged (stopped on a non-finite loss: rerunning would diverge again) | pending."""
    if finished(cell):
        return "finished"
    status = study.status_file(cell)
    if status.is_file() and json.loads(status.read_text()).get("status") == "diverged":
        return "diverged"
    return "pending"


def run_study(study: Study) -> int:
    """Train every pending cell, `max_parallel` at a time, printing progress; finished and diverged cells are
    skipped and interrupted ones resume from their newest checkpoint (the trainer's own resume). Returns how many
    runs failed (not counting divergence)."""
    total = len(study.cells)
    pending = [c for c in study.cells if cell_status(study, c) == "pending"]
    print(f"study {study.path}: {total} runs, {total - len(pending)} already done, {len(pending)} to run, "
          f"{study.max_parallel} at a time", flush=True)
    for sub in ("logs", "status"):
        (study.output_dir / sub).mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // study.max_parallel)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    running: dict[int, tuple[Cell, subprocess.Popen, float]] = {}
    done, failed, started, durations = total - len(pending), 0, time.time(), []
    try:
        while pending or running:
            while pending and len(running) < study.max_parallel:
                slot = next(i for i in range(study.max_parallel) if i not in running)
                cell = pending.pop(0)
                env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
                       "PYTHONUNBUFFERED": "1"}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                cmd = [sys.executable, "-m", "trainer", "train", str(study.base), *cell.overrides]
                with open(study.log_file(cell), "a") as log:  # the child keeps its own handle
                    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True)
                running[slot] = (cell, process, time.time())
                print(f"  start {cell.name}", flush=True)
            time.sleep(0.2)
            for slot, (cell, process, t0) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[slot]
                durations.append(time.time() - t0)
                outcome = record_outcome(study, cell, process.returncode)
                done += outcome != "failed"
                failed += outcome == "failed"
                remaining = len(pending) + len(running)
                eta = sum(durations) / len(durations) * remaining / study.max_parallel
                print(f"[{done}/{total} done{f', {failed} failed' if failed else ''}] {cell.name}: {outcome} in "
                      f"{format_duration(durations[-1])} | elapsed {format_duration(time.time() - started)}, "
                      f"ETA {format_duration(eta)}", flush=True)
    except KeyboardInterrupt:
        for _, process, _ in running.values():
            os.killpg(process.pid, signal.SIGTERM)
        raise
    return failed


def record_outcome(study: Study, cell: Cell, returncode: int) -> str:
    """finished | diverged | failed, from the run's exit and log; diverged runs are recorded so they are not redone."""
    if returncode == 0 and finished(cell):
        study.status_file(cell).unlink(missing_ok=True)
        return "finished"
    tail = study.log_file(cell).read_text(errors="replace")[-4000:]
    match = re.search(r"training diverged at step (\d+)", tail)
    status = {"status": "diverged" if match else "failed", "returncode": returncode,
              "step": int(match.group(1)) if match else None,
              "message": tail.strip().splitlines()[-1] if tail.strip() else ""}
    study.status_file(cell).write_text(json.dumps(status) + "\n")
    return status["status"]
