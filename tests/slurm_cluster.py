"""A real Slurm cluster on this machine for the launch tests: Debian's slurm-wlm and munge (installed with apt-get
when missing), one slurmctld and one slurmd per emulated node (all on 127.0.0.1 with their own ports), and a
private munged, all configured in a temporary directory and all stopped again by `stop()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["slurmctld", "slurmd", "munged", "mungekey", "sbatch", "scontrol", "squeue", "scancel"]


class SlurmUnavailable(Exception):
    """Slurm is missing and cannot be installed here (no apt-get, or not root)."""


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt-get when a binary is missing (CI machines start without them)."""
    if all(shutil.which(b) for b in DAEMONS):
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm/munge are not installed and apt-get (as root) is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    missing = [b for b in DAEMONS if not shutil.which(b)]
    if missing:
        raise RuntimeError(f"apt-get installed {PACKAGES} but {missing} are still not on PATH")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalSlurm:
    """`with LocalSlurm(nodes=2) as cluster:` — nodes n1..nN with `cpus` CPUs each, one partition `debug`."""

    def __init__(self, nodes: int = 2, cpus: int = 2):
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus
        # Short path: munge's unix socket must fit in 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="nt-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- daemons -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        ensure_installed()
        for d in ("state", "log", "run", "munge"):
            (self.root / d).mkdir(mode=0o700)
        self._start_munge()
        self._write_conf()
        self._daemon(["slurmctld", "-c"], self.root / "run" / "slurmctld.pid")  # -c: no state from earlier runs
        for name in self.node_names:
            (self.root / "state" / name).mkdir()
            self._daemon(["slurmd", "-N", name], self.root / "run" / f"slurmd_{name}.pid")
        self.wait_for(lambda: self.idle_nodes() == len(self.node_names), 60, "the nodes to come up idle")

    def _start_munge(self) -> None:
        m = self.root / "munge"
        self.munge_socket = m / "munge.socket"
        subprocess.run(["mungekey", "--create", f"--keyfile={m / 'munge.key'}"], check=True, capture_output=True)
        # --force: munged refuses to run as root, and root is who runs slurmd here.
        self._daemon(["munged", "--force", f"--socket={self.munge_socket}", f"--key-file={m / 'munge.key'}",
                      f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                      f"--seed-file={m / 'munged.seed'}"], m / "munged.pid")

    def _write_conf(self) -> None:
        r, host = self.root, socket.gethostname().split(".")[0]
        ctld_port, *node_ports = free_ports(1 + len(self.node_names))
        nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
                          f"RealMemory=2000 State=UNKNOWN" for name, port in zip(self.node_names, node_ports))
        self.conf.write_text(f"""\
ClusterName=normtron-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r}/state/ctld
SlurmdSpoolDir={r}/state/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd_%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd_%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, cmd: list[str], pid_file: Path) -> None:
        """Start a daemon that forks itself into the background and writes `pid_file`."""
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}\n{self.logs()}")
        self.wait_for(pid_file.is_file, 30, f"{cmd[0]} to write {pid_file}")

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then end whatever is left of this cluster (slurmstepd, job
        processes, munged): every process whose environment names this cluster's slurm.conf."""
        if self.conf.is_file():
            self._run(["scancel", "--full", "--user", "root"])
            try:
                self.wait_for(lambda: not self.squeue(), 30, "the jobs to end")
            except TimeoutError:
                pass
            self._run(["scontrol", "shutdown"])
            for _ in range(50):  # the daemons take a moment to go
                if not self.processes():
                    break
                time.sleep(0.1)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                _signal(pid, sig)
            deadline = time.time() + 10
            while self.processes() and time.time() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)

    def processes(self) -> list[int]:
        """Live processes started by or for this cluster (daemons, job steps, jobs): SLURM_CONF is in their
        environment, as every daemon and job inherits it from `self.env`."""
        marker, found = f"SLURM_CONF={self.conf}".encode(), []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0") and _alive(int(proc.name)):
                    found.append(int(proc.name))
            except OSError:
                continue
        return found

    # --- client commands ------------------------------------------------------------------------------------------

    def _run(self, cmd: list[str], env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> int:
        result = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                                capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def squeue(self) -> list[str]:
        return self._run(["squeue", "-h", "-o", "%i"]).stdout.split()

    def idle_nodes(self) -> int:
        return self._run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split().count("idle")

    def wait_for(self, condition, timeout: float, what: str, poll: float = 0.1):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if value := condition():
                return value
            time.sleep(poll)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")) + [self.root / "munge" / "munged.log"]:
            if log.is_file():
                parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    """Running (a zombie has exited: it only waits for its parent to collect it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":  # `python3 tests/slurm_cluster.py`: install Slurm and munge up front (.ci/run)
    ensure_installed()
