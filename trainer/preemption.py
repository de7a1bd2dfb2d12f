"""Preemption: on SIGTERM or SIGUSR1 the trainer finishes its step, writes a complete checkpoint and exits with
EXIT_REQUEUE, which tells a launcher (launch/torchrun.sh, launch/slurm/train.sbatch) to requeue the job.

A signal may reach only some ranks (a user signals one process, or a scheduler's signal arrives at different
times), so every rank reports its flag each step and all stop after the same step: one tiny all-reduce per step,
on the CPU (a gloo group beside NCCL), so that it never waits for the GPU.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from normtron.trainer.metrics import LOG

EXIT_REQUEUE = 75  # EX_TEMPFAIL from sysexits.h: "temporary failure, try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Set by launch/torchrun.sh: torchrun reports any failing worker as exit code 1, so the workers leave this file to say
# that they stopped for a requeue, and exit 0: with --max-restarts torchrun would restart workers that exit non-zero.
MARKER_ENV = "NORMTRON_PREEMPTED_FILE"


class PreemptionWatch:
    """Catches the stop signals from construction on; `stop_requested()` is the ranks' common decision."""

    def __init__(self):
        self.received, self.stopping = None, False
        self.group = None  # the default group when it is gloo already
        if dist.is_initialized() and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # collective: every rank constructs its watch
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.siginterrupt(sig, False)  # restart interrupted system calls (collectives, file writes)

    def _on_signal(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def stop_requested(self) -> bool:
        """True on every rank once any rank has received a stop signal. Call on all ranks at the same point."""
        flag = torch.tensor([1 if self.received else 0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.stopping = bool(flag.item())
        return self.stopping

    def close(self) -> None:
        """Restore the earlier handlers; once stopping, ignore repeats (a launcher may pass the signal on again), so
        that they cannot kill the process while it exits with the requeue code."""
        for sig, previous in self.previous.items():
            signal.signal(sig, signal.SIG_IGN if self.stopping else previous)


def requeue_exit(step: int, checkpoint: Path) -> int:
    """The exit code for a run stopped by a signal; under a launcher that asked for a marker file: the file, and 0
    (the launcher exits with EXIT_REQUEUE)."""
    LOG.info(f"stopped by a signal after step {step}; checkpoint {checkpoint} holds the run; exit code "
             f"{EXIT_REQUEUE}: requeue the job (or re-run the command) to resume")
    if marker := os.environ.get(MARKER_ENV):
        Path(marker).touch()
        return 0
    return EXIT_REQUEUE
