"""The training stall per checkpoint, synchronous vs asynchronous (checkpoint.async), for the 125m config.

    python bench/checkpoint.py --data DIR                 # DIR: a `normtron prepare-data` output
    python bench/checkpoint.py --data DIR --steps 13 --every 3 --batch-size 1 --seq-len 64

Three runs of `normtron train configs/125m.yaml` (the 125m model as configured, 134M parameters; batch and sequence
length shrunk to what the machine trains in seconds), identical but for checkpointing: none (checkpoint.every past
the end), synchronous, asynchronous. From each run's metrics.jsonl (elapsed seconds at every step, taken before
that step's save):

    blocking   the step right after a save took this much longer than the median step without a save: the time
               the save held training up (the whole write when synchronous; staging to host memory when async)
    overhead   (elapsed at the last step - the no-checkpoint run's) / saves: what each save cost the run's wall
               time, including a background write slowing the steps it overlaps

The final save (after the last logged step) is in neither. On CPU, model and optimizer state are already in host
memory and the background writer shares the cores with training; on GPU the state is staged into pinned host memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"none": [], "sync": ["checkpoint.async=false"], "async": ["checkpoint.async=true"]}


def run(mode: str, args, out: Path) -> list[float]:
    """elapsed_s at steps 1..N of one run."""
    every = args.steps + 1 if mode == "none" else args.every
    cmd = [sys.executable, "-m", "trainer", "train", str(REPO / "configs" / "125m.yaml"), f"data.dir={args.data}",
           f"run.output_dir={out}", f"run.name={mode}", f"training.steps={args.steps}",
           f"training.batch_size={args.batch_size}", f"training.micro_batch_size={args.batch_size}",
           f"data.seq_len={args.seq_len}", "training.warmup_steps=1", "training.precision=fp32",
           "logging.every=1", "logging.tensorboard=false", f"eval.every={args.steps}", "eval.steps=1",
           f"checkpoint.every={every}", "checkpoint.keep_last=1", "diagnostics.every=0", *MODES[mode]]
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                   stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
    return [r["elapsed_s"] for r in rows if "loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared data directory (any vocabulary up to 32000)")
    parser.add_argument("--steps", type=int, default=13)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", help="where the runs go (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        elapsed = {mode: run(mode, args, out) for mode in MODES}
    steps = lambda e: [b - a for a, b in zip(e, e[1:])]  # noqa: E731  durations of steps 2..N
    base = statistics.median(steps(elapsed["none"]))
    saves = [s for s in range(args.every, args.steps, args.every)]  # saves followed by a logged step
    import torch
    device = f"GPU ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"configs/125m.yaml on {device}: {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
          f"median step {base:.2f} s without checkpoints; {len(saves)} saves (steps {saves}) measured")
    print(f"{'mode':<6} {'blocking per save (s)':>22} {'overhead per save (s)':>22}")
    for mode in ("sync", "async"):
        e = elapsed[mode]
        blocking = statistics.mean((e[s] - e[s - 1]) - base for s in saves)  # e[s] is step s+1's elapsed
        overhead = (e[-1] - elapsed["none"][-1]) / len(saves)
        print(f"{mode:<6} {blocking:>22.2f} {overhead:>22.2f}")


if __name__ == "__main__":
    main()
