"""Shared test helpers: run the real CLI (single process or under torchrun), read what a run wrote (losses, state
sizes, diagnostics), compare runs, and load converted models. Test modules import from here, never from each other."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from normtron.trainer.data.format import split_files

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")

# A model small enough that a training step takes milliseconds on one CPU core.
MICRO_MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
               "model.ffn_hidden_dim=128", "model.max_seq_len=64", "data.seq_len=32", "training.batch_size=8",
               "training.warmup_steps=2", "training.lr=3e-3", "logging.every=1", "logging.tensorboard=false",
               "eval.steps=2"]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    """`normtron ARGS` in a subprocess, as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "normtron", *args], cwd=cwd or REPO, env=_env(env),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"normtron {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def run_torchrun(nproc: int, *args: str, env: dict | None = None, timeout: float = 600,
                 check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m normtron ARGS`: the one launcher every multi-process test uses."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "normtron", *args]
    result = subprocess.run(cmd, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun x{nproc} {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


class TrainedRuns:
    """`runs(name, nproc, *overrides)`: the run directory of a micro-model run on `data`, trained on first use
    (in one process, or under torchrun for nproc > 1) and shared by every later test that asks for it by name.
    `common` overrides (steps, checkpoint and eval intervals) come after MICRO_MODEL; `output(name)` is its stdout."""

    def __init__(self, data: Path, root: Path, *common: str):
        self.data, self.root, self.common = data, root, common
        self.results: dict[str, subprocess.CompletedProcess] = {}

    def __call__(self, name: str, nproc: int, *overrides: str, common: tuple[str, ...] | None = None) -> Path:
        if name not in self.results:
            args = ("train", TINY, f"data.dir={self.data}", f"run.output_dir={self.root}", f"run.name={name}",
                    *MICRO_MODEL, *(self.common if common is None else common), *overrides)
            self.results[name] = run_cli(*args) if nproc == 1 else run_torchrun(nproc, *args)
        return self.root / name

    def output(self, name: str) -> str:
        return self.results[name].stdout


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, eval rows) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, after checking that each step was logged once and in order (nothing redone)."""
    train, _ = read_metrics(run_dir)
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in train}


def eval_losses(run_dir: Path) -> dict[int, float]:
    """step -> validation loss."""
    _, evals = read_metrics(run_dir)
    return {r["step"]: r["val_loss"] for r in evals}


def loss_curve(run_dir: Path) -> list[float]:
    """The training losses of steps 1, 2, ..., N, every step present."""
    losses = step_losses(run_dir)
    assert list(losses) == list(range(1, len(losses) + 1)), f"steps missing: {list(losses)}"
    return list(losses.values())


def assert_same_losses(run_dir: Path, reference_dir: Path, rel: float = 1e-5, steps=None) -> None:
    """The run's training losses equal the reference run's, within `rel`: at `steps`, or else at every step, with
    the same steps logged and the same validation losses."""
    got, want = step_losses(run_dir), step_losses(reference_dir)
    for step in steps or want:
        assert got[step] == pytest.approx(want[step], rel=rel), (step, got[step], want[step])
    if steps is None:
        assert set(got) == set(want)
        got_val, want_val = eval_losses(run_dir), eval_losses(reference_dir)
        for step in want_val:
            assert got_val[step] == pytest.approx(want_val[step], rel=rel), (step, got_val[step], want_val[step])


def state_counts(run_dir: Path) -> tuple[list[int], list[int]]:
    """Parameter and optimizer-state elements per rank, as the run recorded them after its first step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if "param_elements" in r)
    return row["param_elements"], row["optimizer_elements"]


def resume_copy(run_dir: Path, name: str, drop_step: int = 8) -> Path:
    """A copy of a finished run without its last checkpoint, so that re-running resumes at the one before."""
    copy = run_dir.with_name(name)
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / f"step_{drop_step:08d}")
    return copy


def diagnostic_rows(run_dir: Path) -> list[dict]:
    """The per-layer diagnostics rows of a run's metrics.jsonl (every one has the activation statistics; DeepSpeed's
    have no gradient norms)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "resid_rms" in r]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below root, to prove a failed command left it untouched."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- Prepared data -----------------------------------------------------------------------------------------------

def read_split(data_dir, split):
    """The split's token stream: its files (one in format 1, one per shard in format 2) concatenated."""
    meta = json.loads((data_dir / "meta.json").read_text())
    return np.concatenate([np.fromfile(p, dtype=meta["dtype"]) for p in split_files(data_dir, meta, split)])


def split_segments(data_dir, split):
    """The split's stored documents (or held-out pieces of long ones), from the .docs.npy end offsets."""
    meta = json.loads((data_dir / "meta.json").read_text())
    out = []
    for path in split_files(data_dir, meta, split):
        tokens = np.fromfile(path, dtype=meta["dtype"])
        ends = np.load(path.with_name(path.name.replace(".bin", ".docs.npy"))) if meta.get("format") == 2 else []
        out.extend(np.split(tokens, ends[:-1]) if len(ends) else [])
    return [s.tolist() for s in out]


def reassemble(train_segments, val_segments, expected_docs):
    """Walk the expected documents in order, taking each next stored segment from train or val: every token must
    be accounted for, in order, and every segment used."""
    train, val = list(train_segments), list(val_segments)
    for doc in expected_docs:
        pos = 0
        while pos < len(doc):
            for source in (train, val):
                if source and source[0] and doc[pos:pos + len(source[0])] == source[0]:
                    pos += len(source.pop(0))
                    break
            else:
                raise AssertionError(f"no stored segment continues a document at token {pos}")
    assert not train and not val


# --- Converted models ------------------------------------------------------------------------------------------

def native_model(checkpoint: Path):
    """Our model with the checkpoint's weights, loaded by DCP directly (not by the converter)."""
    import torch.distributed.checkpoint as dcp

    from normtron.models.transformer import Transformer
    from normtron.trainer.checkpoint import single_process_ok
    from normtron.trainer.convert.checkpoints import checkpoint_config

    cfg = checkpoint_config(checkpoint).model
    model = Transformer(cfg)
    model.init_weights(seed=123)
    state = {"model": model.state_dict()}
    with single_process_ok():
        dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    model.load_state_dict(state["model"])
    return model.eval()


def all_tensors(folder: Path) -> dict:
    """Every tensor of a Hugging Face folder's safetensors files, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def comparable_config(folder: Path) -> dict:
    """A Hugging Face folder's config as transformers reads it, minus the fields that name the writer."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder).to_dict()
    return {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}


# --- Fault injection -----------------------------------------------------------------------------------------------

def run_with_kills(cmd: list[str], run_dir: Path, steps: int, kills: int, seed: int, log_dir: Path,
                   env: dict | None = None, timeout: float = 300) -> list[dict]:
    """Run the training command `cmd` and SIGKILL it at `kills` random moments, re-running it after each, then let
    the last run finish. Every other kill lands while a checkpoint is being written (a step_*.tmp directory exists,
    after this attempt has trained; NORMTRON_FAULT_SAVE_DELAY in `env` widens that window); the others at a random
    step. Under torchrun (`cmd` runs torch.distributed.run) the process killed alternates
    between the agent and a random worker. Returns one record per attempt: the kill ("mid-save" / "step N" / None
    for the finishing run), the complete checkpoints at the moment of the kill, and the attempt's output."""
    rng, attempts = random.Random(seed), []
    checkpoints, metrics = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    for attempt in range(kills + 1):
        log = log_dir / f"attempt{attempt}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=out, stderr=subprocess.STDOUT)
        kill, complete, deadline = None, [], time.time() + timeout
        if attempt < kills:
            mid_save = attempt % 2 == 0
            rows = lambda: len(metrics.read_text().splitlines()) if metrics.is_file() else 0  # noqa: E731
            done, target = rows(), rng.randint(1, max(1, steps // 10))  # metric rows past the last attempt's
            while proc.poll() is None and time.time() < deadline:
                saving = checkpoints.is_dir() and any(p.name.endswith(".tmp") for p in checkpoints.iterdir())
                if mid_save and saving and rows() > done:
                    kill = "mid-save"
                elif not mid_save and rows() >= done + target:
                    kill = f"after {target} new rows"
                if kill:
                    complete = sorted(p.name for p in checkpoints.iterdir() if (p / ".metadata").is_file()
                                      and not p.name.endswith(".tmp"))
                    victim = proc.pid
                    if b"torch.distributed.run" in b" ".join(c.encode() for c in cmd):
                        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                 text=True).stdout.split()
                        victim = int(rng.choice(workers)) if attempt % 4 >= 2 and workers else proc.pid
                    os.kill(victim, signal.SIGKILL)
                    break
                time.sleep(0.002)
        proc.wait(timeout=max(1.0, deadline - time.time()))
        if kill:  # the workers of a killed agent die with it (trainer/supervision.py); a killed worker's agent
            time.sleep(0.5)  # stops the others: let them go before the re-run
        attempts.append({"kill": kill, "complete": complete, "returncode": proc.returncode, "output": log.read_text()})
        if kill is None:
            break
    return attempts


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64; NaN (an unwritten element) fails any bound."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def flip_model_tensor_bytes(ckpt: Path, count: int = 16, mask: int = 0xFF,
                            fqn: str = "model.layers.1.feed_forward.up_proj.weight") -> Path:
    """XOR `count` bytes in the middle of one model tensor of a DCP checkpoint, in place; returns the file touched."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(ckpt)).read_metadata().storage_data
    info = next(v for k, v in storage.items() if k.fqn == fqn)
    with open(ckpt / info.relative_path, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        chunk = f.read(count)
        f.seek(info.offset + info.length // 2)
        f.write(bytes(b ^ mask for b in chunk))
    return ckpt / info.relative_path


def write_lm_eval_tasks(out: Path, items: list[dict]) -> Path:
    """Local lm-eval tasks over `items` ({context, choices, label, text}) in `out`, read with `dataset_path: json`
    (no hub): shakespeare_mc (multiple choice: which ending follows the context) and shakespeare_ppl (rolling
    log-likelihood of each text)."""
    out.mkdir()
    (out / "lines.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {out / 'lines.jsonl'}\ntest_split: test\n"
    (out / "mc.yaml").write_text(
        "task: shakespeare_mc\n" + data + "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n")
    (out / "ppl.yaml").write_text(
        "task: shakespeare_ppl\n" + data + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n"
        "  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n")
    return out
