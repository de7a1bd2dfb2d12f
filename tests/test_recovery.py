"""Recovery from divergence and from damaged checkpoints: stability.nonfinite / on_spike = rollback (with the
debug.nan_at_step and debug.spike_at_step fault injection), checksums.json written at save time, verified on load
(checkpoint.on_damaged), and `normtron checkpoint verify`.

The reference for a rollback is the run it claims to be: a plain resume from the checkpoint it reloaded, whose data
position the test moves on by the skipped batches itself (windows = batches x global batch size) and rewrites with
DCP's own format_utils, trained with the same config and no faults."""

from __future__ import annotations

import binascii
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, flip_model_tensor_bytes, run_torchrun, step_losses, tree_digest

from normtron.trainer.cli import main

BATCH = 8  # MICRO_MODEL's training.batch_size: windows per global batch
ROLLBACK = ("training.steps=12", "checkpoint.every=3", "checkpoint.keep_last=0", "eval.every=12",
            "stability.nonfinite=rollback", "stability.on_spike=rollback", "stability.spike_window=4",
            "stability.rollback_skip_batches=2")
FAULTS = ("debug.nan_at_step=5", "debug.spike_at_step=8")


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread, as run_cli's subprocesses (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def events(run_dir: Path, name: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == name]


def skipped_copy(checkpoint: Path, run_dir: Path, batches: int, scratch: Path) -> None:
    """run_dir/checkpoints/<checkpoint's name>: the checkpoint with its data position `batches` global batches on."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    dcp_to_torch_save(checkpoint, scratch / "full.pt")
    state = torch.load(scratch / "full.pt", weights_only=False)
    data = state["train"]["data"]
    assert data["position"] + batches * BATCH <= data["n_windows"]  # no epoch boundary in between
    data["position"] += batches * BATCH
    torch.save(state, scratch / "skipped.pt")
    torch_save_to_dcp(scratch / "skipped.pt", run_dir / "checkpoints" / checkpoint.name)


def train(micro_args, name: str, *extra: str) -> int:
    return main(["train", TINY, *micro_args(name, *ROLLBACK, *extra)])


def check_rollbacks(run_dir: Path) -> None:
    """The NaN at step 5 went back to step 3, the spike at step 8 to step 6 (written after the first rollback),
    each skipping 2 batches; the run finished with each step logged once."""
    got = [(r["step"], r["reason"], r["rollback_to"], r["skipped_batches"]) for r in events(run_dir, "rollback")]
    assert got == [(5, "nonfinite", 3, 2), (8, "loss_spike", 6, 2)]
    losses = step_losses(run_dir)
    assert list(losses) == list(range(1, 13))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollbacks"] for r in rows if "loss" in r] == [0] * 3 + [1] * 3 + [2] * 6


def test_rollback_equals_a_run_started_from_the_checkpoint_with_the_batches_skipped(micro_args, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert train(micro_args, "faulty", *FAULTS) == 0
    faulty = runs / "faulty"
    check_rollbacks(faulty)
    assert "rollback 2: loss spike at step 8" in capsys.readouterr().out
    # References: a fault-free resume from step 3 (for steps 4-6) and from step 6 (for 7-12), 2 batches on.
    for start, name in ((3, "from3"), (6, "from6")):
        skipped_copy(faulty / "checkpoints" / f"step_{start:08d}", runs / name, 2, tmp_path)
        assert train(micro_args, name) == 0
        reference = step_losses(runs / name)
        compared = range(start + 1, 7) if start == 3 else range(7, 13)
        assert [step_losses(faulty)[s] for s in compared] == [reference[s] for s in compared]  # bitwise (fp32)

    # One rollback more than stability.max_rollbacks within the window stops the run with one line.
    assert train(micro_args, "limited", *FAULTS, "stability.max_rollbacks=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normtron: error: training diverged again at step 8 after 1 rollback(s)") and \
        "\n" not in err, err


def test_rollback_under_two_rank_fsdp2(micro_args, tmp_path):
    """The same faults under 2-rank FSDP2: the reload goes through the sharded DCP load; after the second rollback
    the losses equal (1e-5) a resume from the reloaded checkpoint with the 2 batches skipped, in one process (the
    same global batches: FSDP2 matches a single process to rounding)."""
    runs = tmp_path / "runs"
    run_torchrun(2, "train", TINY, *micro_args("faulty", *ROLLBACK, *FAULTS, "parallel.backend=fsdp"))
    check_rollbacks(runs / "faulty")
    skipped_copy(runs / "faulty" / "checkpoints" / "step_00000006", runs / "from6", 2, tmp_path)
    assert train(micro_args, "from6") == 0
    got, want = step_losses(runs / "faulty"), step_losses(runs / "from6")
    for step in range(7, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def test_damaged_checkpoint_is_refused_or_skipped_and_verify_reports_it(micro_args, tmp_path, capsys):
    """A flipped byte in the model/optimizer file and a truncated .metadata in the newest checkpoint: verify names
    both, resume refuses with one line naming the previous intact checkpoint and touches nothing, and with
    checkpoint.on_damaged=previous it resumes from that one and trains the same losses."""
    args = ("training.steps=9", "checkpoint.every=3", "checkpoint.keep_last=0", "eval.every=9")
    assert main(["train", TINY, *micro_args("run", *args)]) == 0
    run = tmp_path / "runs" / "run"
    losses = step_losses(run)
    assert main(["checkpoint", "verify", str(run)]) == 0
    assert "3 of 3 checkpoint(s) intact" in capsys.readouterr().out
    # checksums.json lists every other file of the checkpoint with its size and CRC32 (binascii, independently)
    first = run / "checkpoints" / "step_00000003"
    recorded = json.loads((first / "checksums.json").read_text())["files"]
    assert set(recorded) == {p.name for p in first.iterdir()} - {"checksums.json"} >= {".metadata", "config.yaml"}
    for name, entry in recorded.items():
        data = (first / name).read_bytes()
        assert entry == {"size": len(data), "crc32": f"{binascii.crc32(data):08x}"}, name

    newest, previous = run / "checkpoints" / "step_00000009", run / "checkpoints" / "step_00000006"
    distcp = next(newest.glob("*.distcp"))
    flip_byte(distcp)
    (newest / ".metadata").write_bytes((newest / ".metadata").read_bytes()[:-10])
    assert main(["checkpoint", "verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED  {newest}" in out and f"ok  {previous}" in out
    assert f"{distcp} fails its checksum" in out and f"{newest / '.metadata'} is truncated" in out

    before = tree_digest(run)
    assert main(["train", TINY, *micro_args("run", *args[1:], "training.steps=12")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"normtron: error: checkpoint {newest} is damaged: ") and "\n" not in err, err
    assert f"the previous intact checkpoint is {previous}" in err and "checkpoint.on_damaged=previous" in err
    assert tree_digest(run) == before

    assert main(["train", TINY, *micro_args("run", *args, "checkpoint.on_damaged=previous")]) == 0
    assert "falling back to" in capsys.readouterr().out
    assert (run / "checkpoints" / "step_00000009.damaged").is_dir()
    assert step_losses(run) == losses  # steps 7-9 trained again from step 6: the same losses, bitwise

    # A checkpoint from before checksums.json: the flipped byte is found by the CRC32s inside DCP's chunks.
    legacy = tmp_path / "legacy"
    shutil.copytree(previous, legacy)
    (legacy / "checksums.json").unlink()
    assert main(["checkpoint", "verify", str(legacy)]) == 0
    flipped = flip_model_tensor_bytes(legacy, count=1, mask=0x01)
    capsys.readouterr()
    assert main(["checkpoint", "verify", str(legacy)]) == 1
    assert f"{flipped} fails its checksum" in capsys.readouterr().out


def test_study_report_counts_rollbacks_per_cell(shakespeare_data, tmp_path):
    """Two seeds of one cell, each rolled back once (NaN at step 5): runs.csv says 1 per run, cells.csv and
    report.md 2 for the cell."""
    import csv

    import yaml
    from helpers import MICRO_MODEL, run_cli

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in MICRO_MODEL)}
    overrides.update({"data.dir": str(shakespeare_data), "training.steps": 6, "eval.every": 6, "checkpoint.every": 3,
                      "stability.nonfinite": "rollback", "debug.nan_at_step": 5})
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"base": TINY, "output_dir": str(tmp_path / "out"), "max_parallel": 2,
                                     "overrides": overrides, "grid": {"run.seed": [0, 1]}}))
    run_cli("study", str(study))
    report = tmp_path / "out" / "report"
    with open(report / "runs.csv", newline="") as f:
        assert [row["rollbacks"] for row in csv.DictReader(f)] == ["1", "1"]
    with open(report / "cells.csv", newline="") as f:
        assert [row["rollbacks"] for row in csv.DictReader(f)] == ["2"]
    assert "| runs done | diverged | rollbacks |" in (report / "report.md").read_text()
    assert "| 2/2 | 0 of 2 seeds | 2 |" in (report / "report.md").read_text()
    # rollback_skip_batches unset: the batches from the checkpoint (step 3) through the event (step 5) are skipped
    for run_dir in (tmp_path / "out" / "runs").iterdir():
        assert [(r["rollback_to"], r["skipped_batches"]) for r in events(run_dir, "rollback")] == [(3, 2)]
