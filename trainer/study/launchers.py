"""How a cell is started: `local` (one `normtron train` process), `torchrun` (launch/torchrun.sh with
nproc_per_cell processes on this node), or `slurm` (one `sbatch launch/slurm/train.sbatch` job per cell, so the
job's preemption -> checkpoint -> requeue -> resume comes with it).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from normtron.trainer.errors import UserError
from normtron.trainer.resources import launch_script
from normtron.trainer.study.spec import Cell, Study, gpu_count

# Slurm job states in which a job still holds or waits for resources (it may yet run or run again).
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                 "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"}


# --- local and torchrun: processes on this machine ----------------------------------------------------------------

def process_command(study: Study, cell: Cell, slot: int) -> tuple[list[str], dict]:
    """The command and environment of a cell's process(es) in parallel slot `slot`: each slot gets its own GPUs
    (a block of nproc_per_cell under torchrun) and its share of the CPU cores."""
    nproc = study.nproc_per_cell if study.launcher == "torchrun" else 1
    threads = max(1, (os.cpu_count() or 1) // (study.max_parallel * nproc))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)), "PYTHONUNBUFFERED": "1"}
    gpus = gpu_count()
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str((slot * nproc + i) % gpus) for i in range(nproc))
    if study.launcher == "torchrun":
        env.setdefault("NORMTRON_PYTHON", sys.executable)
        cmd = ["bash", str(launch_script("torchrun.sh")), "--nproc-per-node", str(nproc),
               "--log-dir", str(study.output_dir / "logs" / cell.name), str(study.base), *cell.overrides]
    else:
        cmd = [sys.executable, "-m", "normtron", "train", str(study.base), *cell.overrides]
    return cmd, env


# --- slurm ---------------------------------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def job_name(study: Study, cell: Cell) -> str:
    """Unique per study directory and cell, so a job submitted by a driver that died before recording its id is
    found again by name."""
    tag = hashlib.sha1(str(study.output_dir.resolve()).encode()).hexdigest()[:8]
    return f"nt-{tag}-{cell.name}"[:200]


def _partition(name: str | None) -> dict[str, str]:
    """`scontrol show partition -o` of the named (or default) partition as a dict; {} when it does not exist."""
    out = _run(["scontrol", "show", "partition", "-o", *([name] if name else [])])
    for line in out.stdout.splitlines():
        info = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if name or info.get("Default") == "YES":
            return info
    return {}


def _max_gpus_per_node(nodes: str) -> int:
    """The most GPUs any node of the partition has (from its Gres, e.g. gpu:8 or gpu:h100:8(S:0-1))."""
    out = _run(["sinfo", "-h", "-N", "-n", nodes, "-o", "%G"]).stdout if nodes else ""
    counts = [int(m.group(1)) for m in re.finditer(r"gpu(?::[A-Za-z0-9_-]+)?:(\d+)", out)]
    return max(counts, default=0)


def require_slurm() -> None:
    missing = [c for c in ("sbatch", "squeue", "scontrol", "scancel") if not shutil.which(c)]
    if missing:
        raise UserError(f"launcher: slurm needs {', '.join(missing)} on PATH (run on a Slurm login node), or use "
                        f"launcher: torchrun for this machine")


def check_slurm(study: Study) -> None:
    """Before anything is submitted: sbatch is there, every cell's partition exists and can hold the cell."""
    require_slurm()
    partitions: dict[str | None, dict] = {}
    for cell in study.cells:
        r = cell.resources
        if r.partition not in partitions:
            partitions[r.partition] = _partition(r.partition)
        info = partitions[r.partition]
        if not info:
            known = " ".join(re.findall(r"PartitionName=(\S+)", _run(["scontrol", "show", "partition", "-o"]).stdout))
            raise UserError(f"study cell {cell.name}: partition {r.partition or '(default)'} does not exist on this "
                            f"cluster; set resources.partition to one of: {known or 'none found'}")
        total = int(info.get("TotalNodes", "0"))
        if r.nodes > total:
            raise UserError(f"study cell {cell.name}: resources.nodes={r.nodes} but partition "
                            f"{info['PartitionName']} has {total} node(s); ask for at most {total}")
        max_nodes = info.get("MaxNodes", "UNLIMITED")
        if max_nodes.isdigit() and r.nodes > int(max_nodes):
            raise UserError(f"study cell {cell.name}: resources.nodes={r.nodes} is above partition "
                            f"{info['PartitionName']}'s MaxNodes={max_nodes}")
        if r.gpus_per_node and r.gpus_per_node > (have := _max_gpus_per_node(info.get("Nodes", ""))):
            raise UserError(f"study cell {cell.name}: resources.gpus_per_node={r.gpus_per_node} but the nodes of "
                            f"partition {info['PartitionName']} have at most {have} GPU(s)")


def submit(study: Study, cell: Cell) -> int:
    """`sbatch launch/slurm/train.sbatch BASE OVERRIDES` with the cell's resources; returns the job id. The job's
    output is appended to logs/<cell>.log (a resubmission adds to it), per-node logs go to logs/<cell>/."""
    r = cell.resources
    logs = (study.output_dir / "logs").resolve()
    cmd = ["sbatch", "--parsable", "--job-name", job_name(study, cell), "--output", str(study.log_file(cell).resolve()),
           "--nodes", str(r.nodes)]
    if r.gpus_per_node:
        cmd += ["--gpus-per-node", str(r.gpus_per_node)]
    for flag, value in (("--time", r.time), ("--partition", r.partition), ("--account", r.account)):
        if value:
            cmd += [flag, value]
    cmd += [*r.sbatch, str(launch_script("slurm", "train.sbatch")), str(study.base), *cell.overrides]
    # The job runs in this directory (relative paths in the study stay valid) with this installation's Python and
    # launch templates.
    env = {**os.environ, "NORMTRON_LAUNCH": str(launch_script("torchrun.sh").parent), "NORMTRON_LOGS": str(logs),
           "NORMTRON_NPROC_PER_NODE": str(r.procs_per_node)}
    env.setdefault("NORMTRON_PYTHON", sys.executable)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, env=env)
    if result.returncode != 0 or not result.stdout.strip().split(";")[0].isdigit():
        raise UserError(f"sbatch refused cell {cell.name}: {' '.join(result.stderr.split()) or result.stdout.strip()}"
                        f"; fix the study's resources")
    return int(result.stdout.strip().split(";")[0])


def jobs_named(name: str) -> list[int]:
    """Ids of the jobs with this name that Slurm still knows (squeue --states=all, then sacct)."""
    out = _run(["squeue", "-h", "--states=all", "--name", name, "-o", "%i"]).stdout.split()
    if not out and shutil.which("sacct"):
        out = _run(["sacct", "-n", "-X", "-P", "--name", name, "-o", "JobID"]).stdout.split()
    return sorted({int(j) for j in out if j.isdigit()})


def job_states(ids: list[int]) -> dict[int, str]:
    """Current state of each job Slurm still knows: squeue for queued, running and recently ended jobs, then sacct
    (when accounting is on) for older ones. Jobs neither knows are left out."""
    if not ids:
        return {}
    states = {}
    out = _run(["squeue", "-h", "--states=all", "-o", "%i %T", "--jobs", ",".join(map(str, ids))]).stdout
    for line in out.splitlines():
        job, _, state = line.partition(" ")
        if job.isdigit():
            states[int(job)] = state.strip()
    rest = [j for j in ids if j not in states]
    if rest and shutil.which("sacct"):
        out = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(map(str, rest))]).stdout
        for line in out.splitlines():
            job, _, state = line.partition("|")
            if job.isdigit():
                states[int(job)] = state.split()[0] if state.split() else "UNKNOWN"
    for job in ids:  # squeue --jobs fails as a whole when one id is no longer known: ask one by one
        if job not in states:
            line = _run(["squeue", "-h", "--states=all", "-o", "%T", "--jobs", str(job)]).stdout.strip()
            if line:
                states[job] = line.split()[0]
    return states


def cancel(ids: list[int]) -> None:
    if ids:
        _run(["scancel", *map(str, ids)])
