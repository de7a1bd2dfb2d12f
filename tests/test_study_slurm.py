"""`normtron study` with launcher: slurm under a real Slurm cluster (two emulated nodes, tests/slurm_cluster.py),
against the same grid run with launcher: torchrun on this node.

One 4-cell study of 2-rank micro-model cells (two on one node x 2 ranks, two - by a per-axis override - on two
nodes x 1 rank) goes through sbatch to a complete report while its driver is killed and re-run and one cell is
preempted with `scancel --signal=USR1`; every number is compared with the torchrun grid's. A cell whose job fails
is resubmitted once and then reported failed with its log; bad study files fail before anything is submitted.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import MICRO_MODEL, REPO, TINY, read_metrics, run_cli, step_losses
from slurm_cluster import LocalSlurm

STEPS = 150
GRID = {"training.lr": [3e-3, 1e-2], "run.seed": [0, 1]}
PUBLISHED = {"source": "made-up numbers for the test", "metric": "perplexity", "axis": "training.lr",
             "values": {3e-3: 123.0}}




def driver_env(slurm: LocalSlurm) -> dict[str, str]:
    """The emulated nodes share this host and their names do not resolve: rendezvous on 127.0.0.1."""
    return {**slurm.env, "NORMTRON_RDZV_HOST": "127.0.0.1", "NORMTRON_LOCAL_ADDR": "127.0.0.1",
            "NORMTRON_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def normtron(slurm, monkeypatch, capsys):
    """`normtron ARGS` in this process (no interpreter start-up), as a driver on the cluster; returns its stdout."""
    for key, value in driver_env(slurm).items():
        monkeypatch.setenv(key, value)

    def run(*args: str) -> str:
        from normtron.trainer.cli import main

        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        assert code == 0, err
        return out
    return run


def write_study(path: Path, data: Path, **extra) -> Path:
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in MICRO_MODEL)}
    overrides.update({"data.dir": str(data), "training.steps": STEPS, "checkpoint.every": 25, "eval.every": STEPS,
                      "diagnostics.every": 50})
    study = {"base": TINY, "output_dir": str(path.parent / "out"), "max_parallel": 2, "overrides": overrides,
             "grid": GRID, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "status").glob("*.json")}


def study_jobs(slurm: LocalSlurm, prefix: str) -> list[tuple[int, str]]:
    """(job id, job name) of every job the cluster ran or runs whose name starts with `prefix`."""
    out = slurm._run(["squeue", "-h", "--states=all", "-o", "%i %j"]).stdout
    return [(int(i), n) for i, n in (line.split() for line in out.splitlines()) if n.startswith(prefix)]


def test_slurm_study_matches_torchrun_through_a_killed_driver_and_a_preemption(slurm, normtron, shakespeare_data,
                                                                                tmp_path):
    env = driver_env(slurm)
    study = write_study(tmp_path / "slurm" / "study.yaml", shakespeare_data, launcher="slurm", published=PUBLISHED,
                        resources={"nproc_per_node": 2,
                                   "per_axis": {"training.lr": {1e-2: {"nodes": 2, "nproc_per_node": 1}}}})
    out = study.parent / "out"
    first = "lr=0.003_seed=0"

    # The driver submits two cells (max_parallel); one of them is preempted, and the driver is killed meanwhile.
    driver = subprocess.Popen([sys.executable, "-m", "normtron", "study", str(study), "--watch", "--poll", "0.5"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        def running_with_steps():
            assert driver.poll() is None, driver.stdout.read()
            metrics = out / "runs" / first / "metrics.jsonl"
            return metrics.is_file() and metrics.read_text().count('"loss"') >= 10
        slurm.wait_for(running_with_steps, 240, f"{first} to train 10 steps", poll=0.05)
        preempted = records(out)[first]["jobs"][0]
        subprocess.run(["scancel", "--signal=USR1", str(preempted)], env=slurm.env, check=True, timeout=30)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    submitted = records(out)
    assert sorted(submitted) == ["lr=0.003_seed=0", "lr=0.003_seed=1"] and all(
        len(r["jobs"]) == 1 for r in submitted.values())

    # --report-only while cells run: running ones with their step, missing ones marked.
    normtron("study", str(study), "--report-only")
    report = (out / "report" / "report.md").read_text()
    assert "## Runs not finished" in report and "| lr=0.01_seed=0 | missing (not started) | 0/150 |" in report

    # The driver re-run: no cell is submitted twice, the preempted one requeues itself and resumes.
    result = run_cli("study", str(study), "--watch", "--poll", "0.5", env=env, timeout=600)
    assert "report:" in result.stdout
    final = records(out)
    assert all(len(r["jobs"]) == 1 and r["status"] == "finished" for r in final.values()) and len(final) == 4
    jobs = study_jobs(slurm, submitted[first]["job_name"].rsplit("-lr=", 1)[0])
    assert len(jobs) == 4 and len({name for _, name in jobs}) == 4, jobs  # one job per cell, ever
    assert slurm.job(preempted)["Restarts"] == "1"
    for cell, record in final.items():  # the per-axis override: the lr=0.01 cells on both nodes
        nodes = slurm.job(record["jobs"][0])["NumNodes"]
        assert nodes == ("2" if cell.startswith("lr=0.01_") else "1"), (cell, nodes)
    log = (out / "logs" / f"{first}.log").read_text()
    assert "requeueing it" in log and "attempt 2" in log and "resumed from" in log
    status = normtron("study", str(study), "--status")
    print(status)  # the README shows this table
    assert status.splitlines()[0].split() == ["cell", "job", "state", "step", "loss", "ETA"]
    assert status.count("finished  150/150") == 4 and status.strip().endswith("4 finished")

    # The same grid with launcher: torchrun (2 ranks per cell on this node) is the reference.
    reference = write_study(tmp_path / "torchrun" / "study.yaml", shakespeare_data, launcher="torchrun",
                            nproc_per_cell=2)
    run_cli("study", str(reference), env={"NORMTRON_PYTHON": sys.executable})
    ref_out = reference.parent / "out"
    for cell in final:
        got, want = step_losses(out / "runs" / cell), step_losses(ref_out / "runs" / cell)
        assert list(got) == list(range(1, STEPS + 1)), cell  # every step once, also in the preempted cell
        for step, loss in want.items():
            assert got[step] == pytest.approx(loss, rel=1e-5), (cell, step)
    runs, ref_runs = (read_csv(o / "report" / "runs.csv") for o in (out, ref_out))
    assert [r["name"] for r in runs] == [r["name"] for r in ref_runs]
    for run, ref in zip(runs, ref_runs):
        assert run["status"] == ref["status"] == "finished" and run["diverged"] == "False"
        assert float(run["final_val_loss"]) == pytest.approx(float(ref["final_val_loss"]), rel=1e-5)
    cells, ref_cells = (read_csv(o / "report" / "cells.csv") for o in (out, ref_out))
    for cell, ref in zip(cells, ref_cells):
        assert float(cell["val_loss_mean"]) == pytest.approx(float(ref["val_loss_mean"]), rel=1e-5)

    # Published numbers side by side: measured perplexity = exp(mean final val loss over the seeds).
    finals = [read_metrics(out / "runs" / f"lr=0.003_seed={s}")[1][-1]["val_loss"] for s in (0, 1)]
    row = next(line for line in (out / "report" / "report.md").read_text().splitlines()
               if line.startswith("| 0.003 |"))
    assert "| 2/2 | 0 of 2 seeds | " in row and f"| {math.exp(statistics.fmean(finals)):.4g} | 123 |" in row


def test_a_failing_cell_is_resubmitted_once_then_reported_with_its_log(slurm, shakespeare_data, tmp_path):
    """One cell's run directory is a file, so its job fails (not a divergence): one resubmission, then failed. The
    other cell diverges (a non-finite loss at LR 1e30): recorded as diverged, never resubmitted."""
    study = write_study(tmp_path / "study.yaml", shakespeare_data, launcher="slurm",
                        grid={"training.lr": [3e-3, 1e30]}, resources={"nproc_per_node": 2})
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "lr=0.003").write_text("in the way")
    result = run_cli("study", str(study), "--watch", "--poll", "0.5", env=driver_env(slurm), check=False)
    log = out / "logs" / "lr=0.003.log"
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "1 of 2 runs failed after 2 attempt(s)" in result.stderr
    assert str(log.resolve()) in result.stderr
    failed, diverged = records(out)["lr=0.003"], records(out)["lr=1e+30"]
    assert failed["status"] == "failed" and len(failed["jobs"]) == 2
    for job in failed["jobs"]:
        assert slurm.job(job)["JobState"] == "FAILED"
        assert f"job {job} attempt 1" in log.read_text()
    assert diverged["status"] == "diverged" and len(diverged["jobs"]) == 1 and diverged["step"] >= 1
    assert "resubmitting (retry 1 of 1)" in result.stdout
    report = (out / "report" / "report.md").read_text()
    assert f"| lr=0.003 | failed (log `{log.resolve()}`) |" in report
    assert "| 1e+30 | 1/1 | 1 of 1 runs |" in report


@pytest.mark.parametrize("resources, message", [
    ({"partition": "gpu"}, "partition gpu does not exist on this cluster; set resources.partition to one of: debug"),
    ({"nodes": 4}, "resources.nodes=4 but partition debug has 2 node(s)"),
    ({"gpus_per_node": 8}, "resources.gpus_per_node=8 but the nodes of partition debug have at most 0 GPU(s)"),
    ({"per_axis": {"run.seed": {1: {"nodes": 4}}}}, "study cell seed=1: resources.nodes=4"),
])
def test_study_the_cluster_cannot_run_fails_before_submitting(slurm, shakespeare_data, tmp_path, monkeypatch,
                                                              capsys, resources, message):
    from normtron.trainer.cli import main

    study = write_study(tmp_path / "study.yaml", shakespeare_data, launcher="slurm", grid={"run.seed": [0, 1]},
                        resources=resources)
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    assert main(["study", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normtron: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists() and not slurm.squeue()


def test_slurm_study_without_sbatch_fails_with_one_line(shakespeare_data, tmp_path, monkeypatch, capsys):
    from normtron.trainer.cli import main

    study = write_study(tmp_path / "study.yaml", shakespeare_data, launcher="slurm")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["study", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normtron: error: launcher: slurm needs sbatch, squeue, scontrol, scancel on PATH")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_cancel_stops_the_study_jobs_and_a_rerun_resubmits(slurm, normtron, shakespeare_data, tmp_path):
    study = write_study(tmp_path / "study.yaml", shakespeare_data, launcher="slurm", grid={"run.seed": [0]},
                        resources={"nproc_per_node": 2})
    submitted = normtron("study", str(study))
    assert "follow with:" in submitted
    job = records(tmp_path / "out")["seed=0"]["jobs"][0]
    assert "cancelled 1 job(s)" in normtron("study", str(study), "--cancel")
    slurm.wait_for(lambda: slurm.job(job).get("JobState") == "CANCELLED", 60, f"job {job} to be cancelled")
    row = normtron("study", str(study), "--status").splitlines()[1].split()
    assert row[:3] == ["seed=0", str(job), "cancelled"]
    assert records(tmp_path / "out")["seed=0"]["status"] == "cancelled"
    normtron("study", str(study))  # a plain re-run resubmits the cancelled cell, as a new job
    jobs = records(tmp_path / "out")["seed=0"]["jobs"]
    assert jobs[0] == job and len(jobs) == 2
    normtron("study", str(study), "--cancel")


def test_a_job_submitted_by_a_driver_killed_inside_sbatch_is_adopted_not_resubmitted(slurm, normtron,
                                                                                       shakespeare_data, tmp_path):
    """The driver records "submitting" before sbatch and the job id after it; killed in between, the job exists but
    its id is not recorded. The next driver finds it by its job name and does not submit the cell again."""
    from normtron.trainer.study.launchers import job_name
    from normtron.trainer.study.spec import load_study

    study = write_study(tmp_path / "study.yaml", shakespeare_data, launcher="slurm", grid={"run.seed": [0]},
                        resources={"nproc_per_node": 2})
    name = job_name(load_study(study), load_study(study).cells[0])
    (tmp_path / "out" / "status").mkdir(parents=True)
    (tmp_path / "out" / "status" / "seed=0.json").write_text(json.dumps({"submitting": True, "job_name": name}))
    job = slurm.sbatch("--job-name", name, "--wrap", "sleep 120", cwd=tmp_path)
    normtron("study", str(study))
    assert records(tmp_path / "out")["seed=0"]["jobs"] == [job]
    assert [j for j, _ in study_jobs(slurm, name)] == [job]
    normtron("study", str(study), "--cancel")
