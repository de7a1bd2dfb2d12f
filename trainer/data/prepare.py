"""`normtron prepare-data`: corpus files -> tokenizer + sharded train/val token files + meta.json (format 2).

1. Plan: the input files (sorted) are grouped into shards of about --shard-size bytes; the plan and the options are
   fixed by the file list, each file's (path, size, mtime) and the flags, never by reading the text (O(files)).
2. Tokenizer: loaded from --tokenizer, or trained (sentencepiece) on a sample of the corpus, once, before any shard.
3. Shards: --workers processes tokenize whole shards in parallel (see shards.py) into DIR/.partial-<key>/, where
   <key> is a hash of the plan and options. A shard is done once its record is written; a killed run, re-run with
   the same command, finds the same .partial directory and redoes only the shards without a record.
4. Finalize: every shard's files are checked against its record (sizes, sha256), meta.json is written, and the new
   shards, tokenizer and meta.json are renamed into DIR (meta.json last). Until then an existing prepared DIR is
   left as it was; a bad input removes the .partial directory again.

On a Slurm cluster the same steps run as a job array (`--task-index I --num-tasks N`: every N-th shard from the
I-th) and a dependent `--finalize` job; `--slurm` trains the tokenizer in the submitting command and submits both.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from normtron.trainer.data.corpus import TEXT_FIELD, file_sha256, find_corpus_files, read_documents
from normtron.trainer.data.format import FORMAT_VERSION, data_dir_problem, read_meta
from normtron.trainer.data.shards import Shard, ShardJob, init_worker, plan_shards, prepare_shard
from normtron.trainer.data.tokenizer import (DEFAULT_VOCAB_SIZE, TOKENIZER_FILES, load_tokenizer, token_dtype,
                                    tokenizer_file, train_sentencepiece)
from normtron.trainer.errors import UserError
from normtron.trainer.resources import launch_script

MAX_AUTO_SHARD_BYTES = 256 * 10**6  # --shard-size by default: about AUTO_SHARDS shards, each within these bounds
MIN_AUTO_SHARD_BYTES = 10**6
AUTO_SHARDS = 64  # enough to keep the cores of a node (or the tasks of an array) busy on a small corpus
MAX_PIECE_TOKENS = 2048  # long documents are split train/val in pieces of at most this many tokens
PROGRESS_SECONDS = 5.0
DEFAULT_SLURM_TASKS = 100  # array tasks for --slurm (below Slurm's default MaxArraySize of 1001)


class WorkerLost(UserError):
    """A worker process was killed: the finished shards are kept for the re-run."""


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_data(inputs: list[str], output: str | Path, vocab_size: int | None = None,
                 tokenizer: str | None = None, val_fraction: float = 0.02, workers: int | None = None,
                 shard_size: int | None = None, text_key: str = TEXT_FIELD, task_index: int | None = None,
                 num_tasks: int | None = None, finalize: bool = False, slurm: dict | None = None,
                 log=print) -> dict | None:
    """Prepare `output` (all steps); or, on a cluster, one array task's shards / the final step / the submission.
    Returns meta.json's contents when the directory is complete."""
    output = Path(output).absolute()
    _check_arguments(output, vocab_size, tokenizer, val_fraction, workers, shard_size, task_index, num_tasks)
    files = find_corpus_files(inputs)
    shard_size = shard_size or auto_shard_size(files)
    plan = plan_shards(files, shard_size)
    options = _options(files, plan, vocab_size, tokenizer, val_fraction, shard_size, text_key)
    existing = read_meta(output)
    if existing and existing.get("options") == options and data_dir_problem(output, existing) is None:
        log(f"{output} is up to date ({existing['train_tokens']:,} train / {existing['val_tokens']:,} val tokens); "
            f"nothing to do")
        return existing

    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    work = output / f".partial-{key}"
    local = task_index is None and not finalize and slurm is None
    created = next((p for p in (*reversed(output.parents), output) if not p.exists()), None)
    total_mb = sum(s.bytes for s in plan) / 1e6
    log(f"corpus: {len(files)} files, {total_mb:.1f} MB in {len(plan)} shard(s) of up to {shard_size / 1e6:g} MB; "
        f"work directory {work}")
    for sub in ("shards", "records"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    try:
        tok, tok_path, trained = _tokenizer(files, tokenizer, options["vocab_size"], work, text_key,
                                            may_train=task_index is None and not finalize, log=log)
        if slurm is not None:
            tok_args = (["--tokenizer", str(Path(tokenizer).absolute())] if tokenizer else
                        ["--vocab-size", str(options["vocab_size"])])  # the array tasks find it in `work`
            return submit_slurm(inputs, output, tok_args, val_fraction, shard_size, text_key, workers, plan, slurm,
                                log)
        if not finalize:
            mine = plan if task_index is None else plan[task_index::num_tasks]
            job = ShardJob(str(work), str(Path(tokenizer).absolute() if tokenizer else tok_path),
                           token_dtype(tok.vocab_size).name, val_fraction, options["split_piece_tokens"], text_key)
            _prepare_shards(mine, job, workers or default_workers(), log)
            if task_index is not None:
                log(f"task {task_index}/{num_tasks}: {len(mine)} shard(s) done; the --finalize step writes meta.json")
                return None
        meta = _finalize(output, work, plan, tok, trained, options, log)
    except UserError as err:
        if local and not isinstance(err, WorkerLost):  # a bad input: leave the output directory as it was
            shutil.rmtree(work, ignore_errors=True)
            if created is not None and not any(p.is_file() for p in created.rglob("*")):
                shutil.rmtree(created, ignore_errors=True)
        raise
    log(f"wrote {output}: vocab {meta['vocab_size']}, {len(meta['shards'])} shard(s), {meta['documents']:,} documents, "
        f"{meta['train_tokens']:,} train tokens, {meta['val_tokens']:,} val tokens ({meta['dtype']}); "
        f"val unigram entropy {meta['val_unigram_entropy']:.3f} nats")
    return meta


def auto_shard_size(files: list[Path]) -> int:
    """The default --shard-size: the corpus in about AUTO_SHARDS shards (from file sizes only, so every process
    that plans the same corpus gets the same plan, whatever its --workers)."""
    total = sum(path.stat().st_size for path in files)
    return int(min(MAX_AUTO_SHARD_BYTES, max(MIN_AUTO_SHARD_BYTES, -(-total // AUTO_SHARDS))))


def _check_arguments(output, vocab_size, tokenizer, val_fraction, workers, shard_size, task_index, num_tasks):
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; pass a directory path")
    if not 0.0 < val_fraction < 0.5:
        raise UserError(f"--val-fraction={val_fraction} must lie in (0, 0.5)")
    if vocab_size is not None and vocab_size < 1:
        raise UserError(f"--vocab-size={vocab_size} must be positive")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise UserError(f"--tokenizer {tokenizer} does not exist; pass a sentencepiece .model, a tokenizer.json "
                        f"or a folder holding one")
    if workers is not None and workers < 1:
        raise UserError(f"--workers={workers} must be at least 1")
    if shard_size is not None and shard_size < 1:
        raise UserError(f"--shard-size={shard_size} must be positive")
    if (task_index is None) != (num_tasks is None):
        raise UserError("--task-index and --num-tasks go together (a Slurm array task sets both)")
    if task_index is not None and not 0 <= task_index < num_tasks:
        raise UserError(f"--task-index={task_index} must lie in [0, --num-tasks={num_tasks})")


def _options(files, plan, vocab_size, tokenizer, val_fraction, shard_size, text_key) -> dict:
    """What the prepared data depends on; an output with other options is rebuilt. Inputs are fingerprinted by
    (path, size, mtime), not by their contents, so this is O(files)."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    tok_file = tokenizer_file(tokenizer) if tokenizer else None
    # Pieces small enough that even a small corpus gets ~4 held-out pieces (about 4 characters per token).
    est_tokens = sum(s.bytes for s in plan) / 4
    piece = int(min(MAX_PIECE_TOKENS, max(1, est_tokens * val_fraction / 4)))
    return {"format": FORMAT_VERSION, "val_fraction": val_fraction,
            "vocab_size": vocab_size if tokenizer else (vocab_size or DEFAULT_VOCAB_SIZE),
            "tokenizer_sha256": file_sha256(tok_file) if tok_file else None, "text_key": text_key,
            "shard_bytes": shard_size, "split_piece_tokens": piece,
            "sources_fingerprint": hashlib.sha256(json.dumps(stats).encode()).hexdigest()}


def _tokenizer(files, tokenizer, vocab_size, work: Path, text_key: str, may_train: bool, log):
    """(tokenizer, its file in the work directory, trained here?). A trained one is kept in the work directory so
    that a resumed run and every array task use the very same model."""
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if vocab_size is not None and vocab_size != tok.vocab_size:
            raise UserError(f"--vocab-size={vocab_size} disagrees with --tokenizer {tokenizer} "
                            f"({tok.vocab_size} tokens); drop --vocab-size")
        path = work / tok.file_name
        if not path.is_file():
            _write_atomically(path, tok.save)
        log(f"tokenizer: {tokenizer} ({tok.vocab_size} tokens)")
        return tok, path, False
    path = work / "tokenizer.model"
    if path.is_file():
        tok = load_tokenizer(path)
        log(f"tokenizer: {path} ({tok.vocab_size} tokens), trained earlier")
        return tok, path, True
    if not may_train:
        raise UserError(f"no tokenizer in {work}: train it before the array tasks start (`normtron prepare-data "
                        f"... --slurm` does) or pass --tokenizer")
    docs = (doc for path in files for doc in read_documents(path, text_key=text_key))
    tok = train_sentencepiece(docs, vocab_size, len(files), log)
    _write_atomically(work / tok.file_name, tok.save)
    return tok, work / tok.file_name, True


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _shard_done(work: Path, shard: Shard, itemsize: int) -> dict | None:
    """The shard's record when it is complete (record written, token files of the recorded sizes)."""
    try:
        record = json.loads((work / "records" / f"{shard.name}.json").read_text())
        for split in ("train", "val"):
            if (work / "shards" / f"{shard.name}.{split}.bin").stat().st_size != record[f"{split}_tokens"] * itemsize:
                return None
        return record
    except (OSError, ValueError, KeyError):
        return None


def _prepare_shards(shards: list[Shard], job: ShardJob, workers: int, log) -> None:
    itemsize = np.dtype(job.dtype).itemsize
    todo = [s for s in shards if _shard_done(Path(job.work_dir), s, itemsize) is None]
    if len(todo) < len(shards):
        log(f"resuming: {len(shards) - len(todo)} of {len(shards)} shard(s) already done; preparing {len(todo)}")
    if not todo:
        return
    workers = min(workers, len(todo))
    ctx = mp.get_context("spawn")  # fresh workers: no inherited tokenizer threads or locks
    # Lock-free progress counters (a lock held by a killed worker would hang everyone); a lost update only
    # makes a progress line a little low.
    chars, tokens = ctx.RawValue("q", 0), ctx.RawValue("q", 0)
    progress = Progress(todo, workers, chars, tokens, log)
    with ctx.Pool(workers, initializer=init_worker, initargs=(job, chars, tokens)) as pool:
        pids = {p.pid for p in pool._pool}
        results = pool.imap_unordered(prepare_shard, todo)
        for _ in todo:
            while True:
                try:
                    record = results.next(timeout=0.5)
                    break
                except mp.TimeoutError:
                    progress.maybe_log()
                    if {p.pid for p in pool._pool} != pids:  # the pool replaced a worker: its shard is lost
                        raise WorkerLost("a prepare-data worker process died (killed, or out of memory?); re-run "
                                        "the same command to resume (fewer --workers or a smaller --shard-size "
                                        "need less memory)")
            progress.shard_done(record)
    progress.maybe_log(final=True)


class Progress:
    """Every few seconds: shards done, MB of input (estimated inside running shards), MB/s, tokens, ETA."""

    def __init__(self, todo: list[Shard], workers: int, chars, tokens, log):
        self.total_bytes, self.n_shards, self.workers = sum(s.bytes for s in todo), len(todo), workers
        self.chars, self.tokens, self.log = chars, tokens, log
        self.done_shards = self.done_bytes = self.done_chars = 0
        self.start = self.last = time.time()

    def shard_done(self, record: dict) -> None:
        self.done_shards += 1
        self.done_bytes += record["input_bytes"]
        self.done_chars += record["characters"]

    def maybe_log(self, final: bool = False) -> None:
        now = time.time()
        if not final and now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        bytes_per_char = self.done_bytes / self.done_chars if self.done_chars else 1.0
        running = (self.chars.value - self.done_chars) * bytes_per_char
        done = min(self.total_bytes, self.done_bytes + running)
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total_bytes - done) / rate if rate > 0 else float("inf")
        self.log(f"prepare: {self.done_shards}/{self.n_shards} shards, {done / 1e6:.1f}/{self.total_bytes / 1e6:.1f} "
                 f"MB, {rate / 1e6:.2f} MB/s ({rate / 1e6 / self.workers:.2f} per worker), "
                 f"{self.tokens.value:,} tokens, {'done in' if final else 'ETA'} "
                 f"{_duration(now - self.start if final else eta)}")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _finalize(output: Path, work: Path, plan: list[Shard], tok, trained: bool, options: dict, log) -> dict:
    """Check every shard against its record, write meta.json and move the result into `output`."""
    dtype = token_dtype(tok.vocab_size)
    missing = [s.name for s in plan if _shard_done(work, s, dtype.itemsize) is None]
    if missing:
        raise UserError(f"{len(missing)} of {len(plan)} shard(s) are not prepared yet (first: {missing[0]}); run "
                        f"the array tasks (or the same command without --finalize) first")
    shards, sources, counts = [], [], np.zeros(tok.vocab_size, np.int64)
    for shard in plan:
        record = json.loads((work / "records" / f"{shard.name}.json").read_text())
        for split in ("train", "val"):
            path = work / "shards" / f"{shard.name}.{split}.bin"
            ends = np.load(work / "shards" / f"{shard.name}.{split}.docs.npy")
            if file_sha256(path) != record["sha256"][split] or int(ends[-1] if len(ends) else 0) != \
                    record[f"{split}_tokens"]:
                (work / "records" / f"{shard.name}.json").unlink()
                raise UserError(f"{path} changed after it was written; re-run the same command to redo that shard")
        counts += np.load(work / "records" / f"{shard.name}.val_counts.npy")
        shards.append({k: record[k] for k in ("name", "documents", "train_tokens", "val_tokens", "sha256")})
        sources.extend(record["sources"])
    train_tokens, val_tokens = sum(s["train_tokens"] for s in shards), sum(s["val_tokens"] for s in shards)
    if sum(s["documents"] for s in shards) == 0:
        raise UserError(f"the corpus ({len(sources)} files) is empty; add text to it")
    if train_tokens == 0 or val_tokens == 0:
        raise UserError(f"the corpus has only {train_tokens + val_tokens} tokens, too few to hold out a validation "
                        f"split; add text")
    p = counts[counts > 0] / counts.sum()
    info = tok.info()
    meta = {
        "format": FORMAT_VERSION, "vocab_size": tok.vocab_size, "dtype": dtype.name,
        "documents": sum(s["documents"] for s in shards), "train_tokens": train_tokens, "val_tokens": val_tokens,
        "val_unigram_entropy": float(-(p * np.log(p)).sum()),
        "tokenizer": {**info, "source": "trained"} if trained else info,
        "split_piece_tokens": options["split_piece_tokens"],
        "shards": shards, "sources": sources, "options": options,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    _install(work, output, tok.file_name)
    return meta


def _install(work: Path, output: Path, tok_file: str) -> None:
    """Replace whatever `output` held by the finished work directory; meta.json goes last and marks completion."""
    (output / "meta.json").unlink(missing_ok=True)  # from here until the end, the directory reads as incomplete
    for name in ("train.bin", "val.bin", *TOKENIZER_FILES, "tokenizer_config.json"):  # format 1 and older tokenizers
        (output / name).unlink(missing_ok=True)
    if (output / "shards").exists():
        shutil.rmtree(output / "shards")
    os.replace(work / "shards", output / "shards")
    os.replace(work / tok_file, output / tok_file)
    if (work / "tokenizer_config.json").is_file():  # a tokenizer.json's BOS/EOS rule travels with it
        os.replace(work / "tokenizer_config.json", output / "tokenizer_config.json")
    os.replace(work / "meta.json", output / "meta.json")
    for stale in output.glob(".partial-*"):  # this run's, and those of runs with other options
        shutil.rmtree(stale, ignore_errors=True)


# --- Slurm ------------------------------------------------------------------------------------------------------------

def submit_slurm(inputs, output: Path, tok_args: list[str], val_fraction, shard_size, text_key, workers,
                 plan: list[Shard], slurm: dict, log) -> None:
    """Submit the array (one task per --slurm-tasks, each every N-th shard) and the dependent --finalize job."""
    if shutil.which("sbatch") is None:
        raise UserError("--slurm needs Slurm's sbatch on PATH; run on a login node of the cluster")
    n_tasks = min(slurm.get("tasks") or DEFAULT_SLURM_TASKS, len(plan))
    args = ["--input", *(str(Path(p).absolute()) for p in inputs), "--output", str(output),
            *tok_args, "--val-fraction", repr(val_fraction), "--shard-size", str(shard_size),
            "--text-key", text_key]
    logs = Path(slurm.get("logs") or "logs").absolute()
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--parsable"] + (["--partition", slurm["partition"]] if slurm.get("partition") else [])
    common += list(slurm.get("sbatch_args") or [])
    script = str(launch_script("slurm", "prepare.sbatch"))
    env = {**os.environ, "NORMTRON_PYTHON": os.environ.get("NORMTRON_PYTHON", sys.executable)}
    per_task = ["--cpus-per-task", str(workers)] if workers else []
    array = _sbatch([*common, *per_task, "--job-name", "normtron-prepare", f"--array=0-{n_tasks - 1}", "--output",
                     str(logs / "%x-%A_%a.out"), script, *args, *(["--workers", str(workers)] if workers else [])],
                    env)
    final = _sbatch([*common, "--job-name", "normtron-prepare-finalize", f"--dependency=afterok:{array}",
                     "--output", str(logs / "%x-%j.out"), script, *args, "--finalize"], env)
    log(f"submitted array job {array} ({n_tasks} task(s) for {len(plan)} shard(s)) and finalize job {final} "
        f"(runs after the array succeeds); logs in {logs}")


def _sbatch(args: list[str], env: dict) -> str:
    result = subprocess.run(["sbatch", *args], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"sbatch refused the preparation job: {reason}")
    return result.stdout.strip().split(";")[0]
