"""The training stall per checkpoint, synchronous vs asynchronous (checkpoint.async), for the 125m config.

    python bench/checkpoint.py --data DIR                 # DIR: a `normtron prepare-data` output
    python bench/checkpoint.py --data DIR --steps 5 --batch-size 1 --seq-len 64

Two runs of `normtron train configs/125m.yaml` (the 125m model as configured, 134M parameters, fp32 with AdamW: a
1.6 GB checkpoint; batch and sequence length shrunk to what the machine trains in seconds), identical but for
checkpoint.async, saving after every step. The stall of a save is the time training waited for it, as the trainer
logs it ("checkpoint ...: training waited X s"): the whole write when synchronous; when asynchronous the copy of the
state into host memory plus any wait for the previous save still in flight. The final save (always waited for) is
not counted. On CPU the model and optimizer state are already in host memory and the background writer shares the
cores with training; on GPU the state is staged into pinned host memory.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stalls(mode: str, args, out: Path) -> list[float]:
    """Seconds training waited for each periodic save of one run."""
    cmd = [sys.executable, "-m", "normtron", "train", str(REPO / "configs" / "125m.yaml"), f"data.dir={args.data}",
           f"run.output_dir={out}", f"run.name={mode}", f"training.steps={args.steps}",
           f"training.batch_size={args.batch_size}", f"training.micro_batch_size={args.batch_size}",
           f"data.seq_len={args.seq_len}", "training.warmup_steps=1", "training.precision=fp32",
           "logging.tensorboard=false", f"eval.every={args.steps}", "eval.steps=1", "checkpoint.every=1",
           "checkpoint.keep_last=2", "diagnostics.every=0", f"checkpoint.async={mode == 'async'}"]
    log = subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True).stdout
    waited = [float(s) for s in re.findall(r"checkpoint \S+: training waited ([0-9.]+) s", log)]
    return waited[:args.steps - 1]  # the last step's save is waited for in full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared data directory (any vocabulary up to 32000)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", help="where the runs go (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: stalls(mode, args, Path(args.out or tmp)) for mode in ("sync", "async")}
    import torch
    device = f"GPU ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"configs/125m.yaml on {device}: a save after each of {args.steps} steps of {args.batch_size} x "
          f"{args.seq_len} tokens; the first {args.steps - 1} saves measured")
    print(f"{'mode':<6} {'stall per save, median (s)':>27} {'min (s)':>8} {'max (s)':>8}")
    for mode, waited in results.items():
        print(f"{mode:<6} {statistics.median(waited):>27.2f} {min(waited):>8.2f} {max(waited):>8.2f}")


if __name__ == "__main__":
    main()
