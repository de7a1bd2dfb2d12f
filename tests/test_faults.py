"""SIGKILL at random moments, some while an asynchronous checkpoint is being written, each followed by a re-run: the
run ends with the per-step losses of an uninterrupted run with synchronous checkpoints, bit for bit (fp32), and
every resume loaded a checkpoint that was complete when the process died.

Here a few kills per layout keep the suite fast; bench/faults.py runs the same driver (tests/helpers.py
run_with_kills) with 20 kills per layout (its measured result is in README.md, "Faults and recovery").
"""

from __future__ import annotations

import re
import sys

import pytest
from helpers import MICRO_MODEL, TINY, read_metrics, run_cli, run_torchrun, run_with_kills

STEPS = 60
COMMON = [*MICRO_MODEL, f"training.steps={STEPS}", "checkpoint.every=3", "eval.every=30"]


def train_cmd(nproc: int, *args: str) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [sys.executable])
    return [*launcher, "-m", "normtron", "train", TINY, *args]


def per_step(run_dir) -> list[tuple]:
    """(step, loss, grad norm, lr) of every logged step, in order; a step logged twice would show here."""
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(run_dir)[0]]


def check_kills(attempts: list[dict], run_dir, reference, kills: int) -> None:
    assert [a["kill"] is not None for a in attempts] == [True] * kills + [False], [a["kill"] for a in attempts]
    assert attempts[-1]["returncode"] == 0, attempts[-1]["output"][-3000:]
    assert any(a["kill"] == "mid-save" for a in attempts)
    for before, after in zip(attempts, attempts[1:]):
        resumed = re.search(r"resumed from \S+/(step_\d{8}) at step", after["output"])
        # A resume only ever starts from a checkpoint that was complete when the process was killed (the save in
        # flight then is discarded); without one the run starts over.
        assert (resumed.group(1) in before["complete"]) if resumed else not before["complete"], (before, after)
    assert per_step(run_dir) == per_step(reference)  # bit for bit, every step once
    val = lambda run: [(r["step"], r["val_loss"]) for r in read_metrics(run)[1]]  # noqa: E731
    assert val(run_dir) == val(reference)


@pytest.mark.parametrize("nproc, layout", [(1, []), (2, ["parallel.backend=fsdp"])], ids=["single", "fsdp2"])
def test_sigkill_at_random_moments_with_async_checkpoints_resumes_bit_for_bit(nproc, layout, shakespeare_data,
                                                                               tmp_path):
    args = lambda name, *extra: [f"data.dir={shakespeare_data}", f"run.output_dir={tmp_path / 'runs'}",  # noqa: E731
                                 f"run.name={name}", *COMMON, *layout, *extra]
    (run_cli if nproc == 1 else lambda *a: run_torchrun(nproc, *a))("train", TINY, *args("reference"))
    kills = 3 if nproc == 1 else 2
    (tmp_path / "logs").mkdir()
    # Each background save holds its written files 0.2 s before publishing them: a window for the mid-save kills.
    attempts = run_with_kills(train_cmd(nproc, *args("killed", "checkpoint.async=true")), tmp_path / "runs" / "killed",
                              STEPS, kills, seed=nproc, log_dir=tmp_path / "logs",
                              env={"NORMTRON_FAULT_SAVE_DELAY": "0.2"})
    check_kills(attempts, tmp_path / "runs" / "killed", tmp_path / "runs" / "reference", kills)
