"""SIGKILL at 20 random moments, each followed by a re-run, for one process and for 2-rank FSDP2 (torchrun), with
asynchronous checkpoints every 3 steps: the suite's tests/test_faults.py with more kills (it runs 3 and 2).

    python bench/faults.py --data DIR                      # DIR: a `normtron prepare-data` output
    python bench/faults.py --data DIR --kills 20 --layouts fsdp2

Per layout: an uninterrupted run with synchronous checkpoints (the reference), then the same run with
checkpoint.async=true killed `--kills` times (every other kill while a checkpoint is written but not yet published,
NORMTRON_FAULT_SAVE_DELAY=0.2; the others after a random number of steps; under torchrun alternately the agent and
a random worker) and re-run until it finishes. Prints, per layout: kills landed (mid-save / other), resumes and
from which checkpoints, whether every resume loaded a checkpoint that was complete at the kill, whether the per-step
losses, gradient norms and learning rates equal the reference's bit for bit, and whether any worker outlived a
killed agent.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from helpers import MICRO_MODEL, TINY, read_metrics, run_with_kills  # noqa: E402

LAYOUTS = {"single": (1, []), "fsdp2": (2, ["parallel.backend=fsdp"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for layout in args.layouts:
        nproc, extra = LAYOUTS[layout]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            common = [f"data.dir={args.data}", f"run.output_dir={tmp / 'runs'}", *MICRO_MODEL,
                      f"training.steps={args.steps}", "checkpoint.every=3", "eval.every=50", *extra]
            launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                        if nproc > 1 else [sys.executable])
            cmd = lambda name, *more: [*launcher, "-m", "normtron", "train", TINY, f"run.name={name}",  # noqa: E731
                                       *common, *more]
            subprocess.run(cmd("reference"), cwd=REPO, check=True, capture_output=True)
            (tmp / "logs").mkdir()
            started = time.time()
            attempts = run_with_kills(cmd("killed", "checkpoint.async=true"), tmp / "runs" / "killed", args.steps,
                                      args.kills, seed=args.seed, log_dir=tmp / "logs",
                                      env={"NORMTRON_FAULT_SAVE_DELAY": "0.2"}, timeout=600)
            seconds = time.time() - started
            kills = [a["kill"] for a in attempts if a["kill"]]
            resumed, sound = [], True
            for before, after in zip(attempts, attempts[1:]):
                found = re.search(r"resumed from \S+/step_(\d{8}) at step", after["output"])
                resumed.append(int(found.group(1)) if found else 0)
                sound &= (f"step_{found.group(1)}" in before["complete"]) if found else not before["complete"]
            rows = lambda run: [(r["step"], r["loss"], r["grad_norm"], r["lr"])  # noqa: E731
                                for r in read_metrics(tmp / "runs" / run)[0]]
            same = rows("killed") == rows("reference")
            leftover = subprocess.run(["pgrep", "-f", f"run.output_dir={tmp / 'runs'}"], capture_output=True,
                                      text=True).stdout.split()
            print(f"{layout}: {len(kills)} kills ({kills.count('mid-save')} mid-save, "
                  f"{len(kills) - kills.count('mid-save')} after a random number of steps) in {seconds:.0f} s; "
                  f"final run exit code {attempts[-1]['returncode']}; resumed from steps {resumed} "
                  f"(0 = started over); every resume from a checkpoint complete at the kill: {sound}; per-step "
                  f"losses/grad norms/lr bit-identical to the uninterrupted run: {same}; processes left: "
                  f"{len(leftover)}", flush=True)


if __name__ == "__main__":
    main()
