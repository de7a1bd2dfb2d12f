"""Cluster launch: launch/torchrun.sh (one node, two agents on loopback), preemption (a signal -> checkpoint ->
exit 75 -> resume with nothing lost), and launch/slurm/train.sbatch under a real Slurm with two emulated nodes.

Every run is compared with one reference: the same micro model trained by plain torchrun, one agent, two ranks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import MICRO_MODEL, REPO, TINY, assert_same_losses, run_torchrun, step_losses
from slurm_cluster import LocalSlurm, free_ports

from normtron.trainer.preemption import EXIT_REQUEUE

STEPS = 300  # long enough (~5 s) that a signal sent after the first steps lands mid-run
RUN = [*MICRO_MODEL, f"training.steps={STEPS}", "checkpoint.every=100", "eval.every=100"]
LAUNCH_ENV = {"NORMTRON_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def runs(shakespeare_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")

    def args(name: str) -> list[str]:
        return [f"data.dir={shakespeare_data}", f"run.output_dir={root / 'runs'}", f"run.name={name}", *RUN]
    args.root = root
    return args


@pytest.fixture(scope="module")
def reference(runs) -> Path:
    """The uninterrupted run: plain torchrun, one agent, world size 2, every step logged exactly once."""
    run_torchrun(2, "train", TINY, *runs("reference"))
    assert list(step_losses(runs.root / "runs" / "reference")) == list(range(1, STEPS + 1))
    return runs.root / "runs" / "reference"


def launch(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(REPO / "launch" / "torchrun.sh"), *args], cwd=REPO,
                            env={**os.environ, **LAUNCH_ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for_steps(run_dir: Path, n: int, alive, timeout: float = 120) -> None:
    """Until the run has logged `n` steps (it must still be running)."""
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        assert alive(), "the run ended before it could be signalled"
        if metrics.is_file() and metrics.read_text().count('"loss"') >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{metrics} did not reach {n} steps")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


# --- launch/torchrun.sh -------------------------------------------------------------------------------------------

def test_two_torchrun_agents_on_loopback_match_one_agent(runs, reference, tmp_path):
    """Multi-node emulation: two agents (--nnodes 2, c10d on 127.0.0.1), one rank each, train as one job."""
    port = free_ports(1)[0]
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t",
              "--local-addr", "127.0.0.1", "--log-dir", str(tmp_path / "logs"), TINY, *runs("two_agents")]
    agents = [launch(*common, env={"NODE_RANK": str(i)}) for i in range(2)]
    results = [finish(a) for a in agents]
    for rc, out in results:
        assert rc == 0, out[-3000:]
    assert "2 rank(s)" in results[0][1] + results[1][1]
    assert_same_losses(runs.root / "runs" / "two_agents", reference)
    for i in range(2):  # one log per node, with the node's own header
        assert f"node {i}/2: 1 process(es)" in (tmp_path / "logs" / f"node{i}.log").read_text()


def test_stop_signal_to_one_rank_checkpoints_and_resume_loses_nothing(runs, reference, tmp_path):
    """SIGUSR1 to rank 1 only: both ranks stop after the same step with a complete checkpoint and exit 75; running
    the same command again resumes there and reproduces the uninterrupted run."""
    args = ["--nproc-per-node", "2", "--log-dir", str(tmp_path / "logs"), TINY, *runs("signalled")]
    run_dir = runs.root / "runs" / "signalled"
    proc = launch(*args)
    wait_for_steps(run_dir, 10, lambda: proc.poll() is None)
    agent = next(p for p in children(proc.pid) if b"torch.distributed.run" in Path(f"/proc/{p}/cmdline").read_bytes())
    rank1 = next(p for p in children(agent) if process_env(p).get("RANK") == "1")
    os.kill(rank1, signal.SIGUSR1)
    rc, out = finish(proc)
    assert rc == EXIT_REQUEUE, out[-3000:]
    stopped = int(re.search(r"stopped by a signal after step (\d+)", out).group(1))
    assert 10 <= stopped < STEPS
    assert (run_dir / "checkpoints" / f"step_{stopped:08d}" / ".metadata").is_file()
    assert max(step_losses(run_dir)) == stopped  # no step trained past the checkpoint

    rc, out = finish(launch(*args))
    assert rc == 0, out[-3000:]
    assert f"at step {stopped}" in out  # "resumed from .../step_000000NN at step NN"
    assert_same_losses(run_dir, reference)


def test_sigterm_stops_a_single_process_run_with_a_checkpoint(runs):
    """Without any launcher: SIGTERM to `normtron train` -> checkpoint after the current step, exit code 75."""
    run_dir = runs.root / "runs" / "single_term"
    proc = subprocess.Popen([sys.executable, "-m", "normtron", "train", TINY, *runs("single_term")], cwd=REPO,
                            env={**os.environ, **LAUNCH_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for_steps(run_dir, 5, lambda: proc.poll() is None)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == EXIT_REQUEUE, out[-3000:]
    stopped = max(step_losses(run_dir))
    assert stopped < STEPS and f"stopped by a signal after step {stopped}" in out
    assert (run_dir / "checkpoints" / f"step_{stopped:08d}" / ".metadata").is_file()


def test_a_rank_killed_mid_run_is_restarted_in_place_and_the_run_ends_with_the_uninterrupted_losses(runs, reference,
                                                                                                   tmp_path):
    """SIGKILL to rank 1 (as the OOM killer does) of a launch/torchrun.sh job with --max-restarts and asynchronous
    checkpoints: torchrun restarts both workers, which resume from the newest complete checkpoint; the job ends by
    itself with exit code 0 and the uninterrupted run's losses, every step once."""
    args = ["--nproc-per-node", "2", "--max-restarts", "2", "--log-dir", str(tmp_path / "logs"), TINY,
            *runs("rank_killed"), "checkpoint.async=true"]
    run_dir = runs.root / "runs" / "rank_killed"
    proc = launch(*args)
    wait_for_steps(run_dir, 110, lambda: proc.poll() is None)  # past the checkpoint of step 100
    agent = next(p for p in children(proc.pid) if b"torch.distributed.run" in Path(f"/proc/{p}/cmdline").read_bytes())
    rank1 = next(p for p in children(agent) if process_env(p).get("RANK") == "1")
    os.kill(rank1, signal.SIGKILL)
    rc, out = finish(proc)
    assert rc == 0, out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000100'} at step 100" in out, out[-5000:]
    assert_same_losses(run_dir, reference)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


BIN = Path(sys.executable).parent  # the venv's console scripts: torchrun, normtron
AGENT_LAUNCHERS = {
    "launch/torchrun.sh": None,
    "torchrun --no-python normtron": ([str(BIN / "torchrun")], ["--no-python", "normtron"]),
    "torchrun -m normtron": ([sys.executable, "-m", "torch.distributed.run"], ["-m", "normtron"]),
}


@pytest.mark.parametrize("launcher", AGENT_LAUNCHERS)
def test_workers_exit_within_seconds_when_their_torchrun_agent_is_killed(launcher, runs, tmp_path):
    """SIGKILL to the torchrun agent (workers run in sessions of their own, so nothing else reaches them): within
    30 s no worker of the job is left, whether the workers are the console script, `python -m normtron` or
    launch/torchrun.sh's."""
    name = "agent_killed_" + re.sub(r"\W+", "_", launcher)
    run_dir = runs.root / "runs" / name
    if AGENT_LAUNCHERS[launcher] is None:
        proc = launch("--nproc-per-node", "2", "--log-dir", str(tmp_path / "logs"), TINY, *runs(name))
        is_agent = lambda p: b"torch.distributed.run" in Path(f"/proc/{p}/cmdline").read_bytes()  # noqa: E731
        find_agent = lambda: next(p for p in children(proc.pid) if is_agent(p))  # noqa: E731
    else:
        agent_cmd, worker_cmd = AGENT_LAUNCHERS[launcher]
        cmd = [*agent_cmd, "--standalone", "--nproc-per-node", "2", *worker_cmd, "train", TINY, *runs(name)]
        env = {**os.environ, **LAUNCH_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        find_agent = lambda: proc.pid  # noqa: E731
    wait_for_steps(run_dir, 5, lambda: proc.poll() is None)
    agent = find_agent()
    workers = children(agent)
    assert len(workers) == 2
    os.kill(agent, signal.SIGKILL)
    killed, deadline = time.time(), time.time() + 30
    while any(map(alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers)), f"workers {[p for p in workers if alive(p)]} outlived their agent"
    print(f"workers gone {time.time() - killed:.2f} s after the agent was killed")
    finish(proc)


def test_a_worker_started_after_its_agent_died_exits_at_once():
    """The agent may die before a worker has asked for the parent-death signal: the worker sees that its parent is
    not the agent launch/torchrun.sh named (here: init, pid 1) and exits before doing anything."""
    result = subprocess.run([sys.executable, "-m", "normtron", "train", TINY], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **LAUNCH_ENV, "TORCHELASTIC_RUN_ID": "t", "NORMTRON_AGENT_PID": "1"},
                            timeout=60)
    assert result.returncode == 1 and "torchrun agent of this worker (pid 1) is gone" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2", TINY], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nproc-per-node", "zero", TINY], "--nproc-per-node must be a positive whole number"),
    (["--bogus", TINY], "unknown option --bogus"),
    ([TINY, "training.stpes=3"], "training.stpes"),  # the trainer's own check, before torchrun starts
])
def test_launcher_rejects_bad_input_with_one_line(args, message, tmp_path):
    rc, out = finish(launch("--log-dir", str(tmp_path / "logs"), *args))
    assert rc == 2 and message in out and "Traceback" not in out, out
    assert out.count("normtron: error:") == 1


# --- Slurm --------------------------------------------------------------------------------------------------------



def slurm_env(tmp_path: Path) -> dict[str, str]:
    """Emulated nodes n1, n2 share this host and their names do not resolve: rendezvous on 127.0.0.1."""
    return {**LAUNCH_ENV, "NORMTRON_RDZV_HOST": "127.0.0.1", "NORMTRON_LOCAL_ADDR": "127.0.0.1",
            "NORMTRON_RDZV_PORT": str(free_ports(1)[0]), "NORMTRON_NPROC_PER_NODE": "1",
            "NORMTRON_LOGS": str(tmp_path / "logs")}


def wait_for_job(slurm: LocalSlurm, job: int, timeout: float = 240) -> dict[str, str]:
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
    return slurm.wait_for(lambda: (j := slurm.job(job)).get("JobState") in done and j, timeout, f"job {job}")


def test_slurm_two_node_job_matches_one_node_run(slurm, runs, reference, tmp_path):
    """launch/slurm/submit.sh -> train.sbatch on 2 nodes x 1 rank: same losses as the 1-node 2-rank reference."""
    env = slurm_env(tmp_path)
    out = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "submit.sh"), "--nodes", "2", "--job-name", "nt2",
                          "--", TINY, *runs("slurm_two_nodes")], env={**slurm.env, **env}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    job = int(re.search(r"submitted job (\d+)", out).group(1))
    info = wait_for_job(slurm, job)
    output = (tmp_path / "logs" / f"nt2-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output[-3000:]
    assert info["NodeList"] == "n[1-2]" and "2 node(s) n1 n2" in output
    run_dir = runs.root / "runs" / "slurm_two_nodes"
    assert_same_losses(run_dir, reference)
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / ".metadata").is_file()
    for node in range(2):  # one log per node under the run's log directory
        assert f"node {node}/2: 1 process(es)" in (tmp_path / "logs" / "slurm_two_nodes" / f"node{node}.log").read_text()


def test_slurm_preemption_checkpoints_requeues_and_resumes(slurm, runs, reference, tmp_path):
    """`scancel --signal=USR1` mid-run: the trainers checkpoint, the job requeues itself, and the second attempt
    resumes at that step; the losses equal the uninterrupted run's, every step once."""
    env = slurm_env(tmp_path)
    (tmp_path / "logs").mkdir()
    output = tmp_path / "logs" / "job.out"
    job = slurm.sbatch("--nodes", "2", "--output", str(output), str(REPO / "launch" / "slurm" / "train.sbatch"),
                       TINY, *runs("slurm_preempted"), env={**env, "NORMTRON_REPO": str(REPO)}, cwd=tmp_path)
    run_dir = runs.root / "runs" / "slurm_preempted"
    wait_for_steps(run_dir, 10, lambda: slurm.job(job).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"))
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=slurm.env, check=True, timeout=30)
    slurm.wait_for(lambda: slurm.job(job).get("Restarts") == "1", 120, "the job to requeue")
    info = wait_for_job(slurm, job)
    log = output.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    stopped = int(re.search(r"stopped by a signal after step (\d+)", log).group(1))
    assert 10 <= stopped < STEPS
    assert "requeueing it" in log and "attempt 2" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in log
    assert_same_losses(run_dir, reference)
