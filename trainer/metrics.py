"""One metrics interface, several sinks: the progress line (stdout and train.log), metrics.jsonl, TensorBoard,
Weights & Biases (logging.wandb).

Only rank 0 writes. On resume, rows past the resumed step (from the interrupted attempt) are dropped from
metrics.jsonl and TensorBoard, so each step appears once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import torch

LOG = logging.getLogger("normtron")


def setup_logging(is_main: bool, log_file: Path | None = None) -> None:
    """Rank 0 logs INFO to stdout (and `log_file`); other ranks only warnings, so output is not duplicated."""
    LOG.handlers.clear()
    LOG.propagate = False
    LOG.setLevel(logging.INFO if is_main else logging.WARNING)
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(formatter)
    LOG.addHandler(stream)
    if log_file is not None and is_main:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(formatter)
        LOG.addHandler(handler)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(row: dict, total_steps: int) -> str:
    if "val_loss" in row:
        per_source = [f"{key.split('/', 1)[1]} {value:.4f}" for key, value in row.items()
                      if key.startswith("val_loss/")]
        return (f"eval  step {row['step']} | val_loss {row['val_loss']:.4f} | val_ppl {row['val_ppl']:.2f}"
                + (f" | by source: {', '.join(per_source)}" if per_source else ""))
    width = len(str(total_steps))
    parts = [f"step {row['step']:>{width}}/{total_steps}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}",
             f"grad {row['grad_norm']:.3f}", f"{row['tokens_per_sec']:,.0f} tok/s"]
    if "mfu" in row:
        parts.append(f"mfu {100 * row['mfu']:.1f}%")
    shares = [f"{key.split('/', 1)[1]} {100 * value:.1f}%" for key, value in row.items()
              if key.startswith("data_share/")]
    if shares:
        parts.append(f"data {' '.join(shares)}")
    parts.append(f"ETA {format_duration(row['eta_s'])}")
    return " | ".join(parts)


class JsonlSink:
    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():  # keep only what the resumed checkpoint already covers
            self._keep(lambda line: _step(line) <= resume_step)
        self.file = open(path, "a", buffering=1)

    def _keep(self, keep) -> None:
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and keep(line)]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def rewind(self, step: int) -> None:
        """After a rollback to `step`: drop the rows of the steps past it, keeping the event rows (the history)."""
        self.file.close()
        self._keep(lambda line: _step(line) <= step or '"event":' in line)
        self.file = open(self.path, "a", buffering=1)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.file.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, ValueError):
        return 1 << 62  # a torn last line from a crash: drop it


class TensorBoardSink:
    def __init__(self, log_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # Drops events past the checkpoint we resume from (including a crashed attempt's before any checkpoint).
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1)

    def rewind(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.writer.log_dir
        self.writer.close()
        self.writer = SummaryWriter(log_dir, purge_step=step + 1)

    def write(self, row: dict) -> None:
        for key, value in row.items():
            group = "eval" if key.startswith("val_") else "train"
            if key != "step" and _is_number(value):
                self.writer.add_scalar(f"{group}/{key}", value, row["step"])
            elif isinstance(value, list):  # per-layer diagnostics: one series per layer
                for i, item in enumerate(value):
                    if _is_number(item):
                        self.writer.add_scalar(f"layers/{key}/{i}", item, row["step"])

    def close(self) -> None:
        self.writer.close()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MetricsLogger:
    """Fans each metrics row out to the progress line, metrics.jsonl, TensorBoard and W&B (rank 0 only)."""

    def __init__(self, run_dir: Path, total_steps: int, resume_step: int, is_main: bool, tensorboard: bool,
                 wandb=None, config: dict | None = None):
        """`wandb`: the logging section when logging.wandb is on (with the resolved `config` to record), else None."""
        self.total_steps = total_steps
        self.sinks = []
        if is_main:
            self.sinks.append(JsonlSink(run_dir / "metrics.jsonl", resume_step))
            if tensorboard:
                self.sinks.append(TensorBoardSink(run_dir / "tensorboard", resume_step))
            if wandb is not None:
                from normtron.trainer.wandb_sink import WandbSink

                self.sinks.append(WandbSink(run_dir, wandb, config or {}))

    def recorded_events(self) -> list[str]:
        """The "event" of every row already in metrics.jsonl (after the resume truncation); empty off rank 0."""
        return [row["event"] for row in self._event_rows()]

    def recorded_event_steps(self, event: str) -> list[int]:
        """The steps of the recorded rows of one event; empty off rank 0."""
        return [int(row["step"]) for row in self._event_rows() if row["event"] == event]

    def _event_rows(self) -> list[dict]:
        sink = next((s for s in self.sinks if isinstance(s, JsonlSink)), None)
        if sink is None:
            return []
        rows = (json.loads(line) for line in sink.path.read_text().splitlines() if line.strip())
        return [row for row in rows if isinstance(row, dict) and "event" in row]

    def rewind(self, step: int) -> None:
        """Forget the rows of steps past `step` (a rollback returned there); event rows stay."""
        for sink in self.sinks:
            sink.rewind(step)

    def log(self, row: dict, quiet: bool = False) -> None:
        """Record a row everywhere; `quiet` rows (not training progress) skip the progress line."""
        if not quiet:
            LOG.info(progress_line(row, self.total_steps))
        row = {k: v for k, v in row.items() if k != "eta_s"}
        for sink in self.sinks:
            sink.write(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


# Dense bf16 peak FLOP/s of common accelerators, matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0,
                    "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
                    "RTX 4090": 165.0}


def device_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device for MFU, or None when unknown (e.g. CPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "L40S" before "L40" before "L4"
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None
