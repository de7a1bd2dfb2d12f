"""One writer per run directory (trainer/run_lock.py): a second `normtron train` of a running run stops at once with
one line naming the first, which finishes untouched; `train --check` (what launch/torchrun.sh and the quickstart run
first) says the same; a killed run's lock never blocks its re-run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from helpers import REPO, TINY, run_cli

STEPS = 1500  # ~25 s of a micro model: the first run is still going while two more processes start


def _metrics_steps(run) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


def _start(args: list[str], *options: str) -> subprocess.Popen:
    """`normtron train [OPTIONS] TINY ARGS` in the background."""
    return subprocess.Popen([sys.executable, "-m", "normtron", "train", *options, TINY, *args], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_steps(run, proc, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(_metrics_steps(run)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the first run did not start"
        time.sleep(0.05)


def test_a_second_writer_stops_at_once_and_the_first_run_finishes_whole(micro_args, tmp_path):
    args = micro_args("shared", f"training.steps={STEPS}", "checkpoint.every=500", "eval.every=500")
    run = tmp_path / "runs" / "shared"
    first = _start(args)
    try:
        _wait_for_steps(run, first, 5)
        second, check = _start(args), _start(args, "--check")  # both at once
        results = [subprocess.CompletedProcess(p.args, p.wait(300), *p.communicate()) for p in (second, check)]
        still_running = first.poll() is None
    finally:
        out, err = first.communicate(timeout=600)
    assert still_running, "the first run ended before the second writer came (make STEPS larger)"
    expected = f"is in use by another run (pid {first.pid} on host {socket.gethostname()})"
    for result in results:
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("normtron: error: ") and expected in lines[0], result.stderr
    assert first.returncode == 0, out + err
    assert _metrics_steps(run) == list(range(1, STEPS + 1))  # every step, once: nothing lost, nothing doubled
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00001000", "step_00001500"]
    assert not list(run.rglob("*.tmp"))


def test_a_killed_runs_lock_does_not_block_its_rerun(micro_args, tmp_path):
    args = micro_args("killed", "training.steps=400", "checkpoint.every=100", "eval.every=100")
    run = tmp_path / "runs" / "killed"
    proc = _start(args)
    _wait_for_steps(run, proc, 5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert (run / ".lock").is_file()  # left behind, but no longer held
    result = run_cli("train", TINY, *args)
    assert "step 400/400" in result.stdout


def test_a_failed_start_leaves_no_run_directory(micro_args, tmp_path):
    """A run that stops before it started (here: a bad checkpoint.init_from) leaves no directory with a lock file."""
    result = run_cli("train", TINY, *micro_args("never", "checkpoint.init_from=" + str(tmp_path / "nothing")),
                     check=False)
    assert result.returncode == 2 and not (tmp_path / "runs" / "never").exists(), result.stderr


def test_lookers_do_not_clash_with_each_other_only_with_the_run(tmp_path):
    """`train --check` runs on every node of a job at once: its look (a shared lock) clashes with a running run's
    exclusive lock, never with another look."""
    import fcntl

    from normtron.trainer.run_lock import holder, run_lock

    run = tmp_path / "run"
    with run_lock(run):
        assert holder(run) == f"pid {os.getpid()} on host {socket.gethostname()}"
    with open(run / ".lock") as other_look:
        fcntl.flock(other_look, fcntl.LOCK_SH | fcntl.LOCK_NB)
        assert holder(run) is None
