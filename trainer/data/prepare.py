"""`normtron prepare-data`: corpus files -> sentencepiece tokenizer + train/val token memmaps + meta.json.

Output directory contract: tokenizer.model, train.bin, val.bin (flat uint16/uint32 token ids, each document as
BOS ids EOS), meta.json. Everything is written to temporary names first and renamed into place at the end, meta.json
last, so a failed or interrupted run leaves an existing prepared directory as it was (or, interrupted in the final
renames, without meta.json, which the trainer reports as not prepared).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from trainer.data.corpus import file_sha256, find_corpus_files, read_documents
from trainer.data.format import FORMAT1_FILES, FORMAT_VERSION, data_dir_problem, read_meta
from trainer.data.tokenizer import DEFAULT_VOCAB_SIZE, load_tokenizer, token_dtype, train_sentencepiece
from trainer.errors import UserError

MAX_SPLIT_BLOCK = 4096  # train/val split granularity in tokens


def prepare_data(inputs: list[str], output: str | Path, vocab_size: int | None = None,
                 tokenizer: str | None = None, val_fraction: float = 0.02, log=print) -> dict:
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; pass a directory path")
    if not 0.0 < val_fraction < 0.5:
        raise UserError(f"--val-fraction={val_fraction} must lie in (0, 0.5)")
    if vocab_size is not None and vocab_size < 1:
        raise UserError(f"--vocab-size={vocab_size} must be positive")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise UserError(f"--tokenizer {tokenizer} does not exist; pass a sentencepiece .model file")
    files = find_corpus_files(inputs)
    sources = [{"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files]
    options = {"format": FORMAT_VERSION, "val_fraction": val_fraction,
               "vocab_size": vocab_size if tokenizer else (vocab_size or DEFAULT_VOCAB_SIZE),
               "tokenizer_sha256": file_sha256(Path(tokenizer)) if tokenizer else None,
               "sources_sha256": sorted(s["sha256"] for s in sources)}
    existing = read_meta(output)
    if existing and existing.get("options") == options and data_dir_problem(output, existing) is None:
        log(f"{output} is up to date ({existing['train_tokens']:,} train / {existing['val_tokens']:,} val tokens); "
            f"nothing to do")
        return existing

    total_mb = sum(s["bytes"] for s in sources) / 1e6
    log(f"corpus: {len(files)} files, {total_mb:.1f} MB")
    created = next((p for p in (*reversed(output.parents), output) if not p.exists()), None)
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(".*.tmp-*"):  # left by a run that was killed
        stale.unlink(missing_ok=True)
    staged = {name: output / f".{name}.tmp-{os.getpid()}" for name in (*FORMAT1_FILES, "all.bin")}
    try:
        meta = _tokenize_and_split(files, tokenizer, options, sources, staged, total_mb, log)
        (output / "meta.json").unlink(missing_ok=True)  # from here until the end, the directory reads as incomplete
        for name in FORMAT1_FILES:
            os.replace(staged[name], output / name)
    except BaseException:
        for path in staged.values():
            path.unlink(missing_ok=True)
        if created is not None and not any(p.is_file() for p in created.rglob("*")):
            shutil.rmtree(created, ignore_errors=True)  # leave no empty directories behind
        raise
    finally:
        staged["all.bin"].unlink(missing_ok=True)
    log(f"wrote {output}: vocab {meta['vocab_size']}, {meta['train_tokens']:,} train tokens, "
        f"{meta['val_tokens']:,} val tokens ({meta['dtype']}); val unigram entropy "
        f"{meta['val_unigram_entropy']:.3f} nats")
    return meta


def _tokenize_and_split(files, tokenizer, options, sources, staged, total_mb, log) -> dict:
    """Write every output under its staged name; return meta.json's contents."""
    tok = _load_or_train_tokenizer(files, tokenizer, options["vocab_size"], log)
    tok.save(staged["tokenizer.model"])
    dtype = token_dtype(tok.vocab_size)
    n_docs, n_tokens = _encode_corpus(files, tok, dtype, staged["all.bin"], total_mb, log)
    if n_tokens < 4:
        raise UserError(f"the corpus ({len(files)} files) is empty; add text to it")
    split = _split_train_val(staged["all.bin"], dtype, options["val_fraction"], staged["train.bin"],
                             staged["val.bin"])
    meta = {
        "format": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "documents": n_docs,
        "train_tokens": split["train_tokens"],
        "val_tokens": split["val_tokens"],
        "split_block_tokens": split["block"],
        "val_unigram_entropy": split["val_unigram_entropy"],
        "tokenizer": tok.info(),
        "sources": sources,
        "options": options,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    staged["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _load_or_train_tokenizer(files, tokenizer, vocab_size, log):
    if tokenizer is None:
        return train_sentencepiece((doc for path in files for doc in read_documents(path)), vocab_size, len(files),
                                   log)
    tok = load_tokenizer(tokenizer)
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise UserError(f"--vocab-size={vocab_size} disagrees with --tokenizer {tokenizer} "
                        f"({tok.vocab_size} pieces); drop --vocab-size")
    log(f"tokenizer: {tokenizer} ({tok.vocab_size} pieces)")
    return tok


def _encode_corpus(files, tok, dtype, out_path: Path, total_mb: float, log) -> tuple[int, int]:
    n_docs = n_tokens = 0
    done_bytes, last_report, start = 0, time.time(), time.time()
    threads = os.cpu_count() or 1
    with open(out_path, "wb") as out:
        for path in files:
            for doc in read_documents(path):
                if not doc.strip():
                    continue
                ids = tok.encode_documents([doc], threads)[0]
                out.write(np.asarray(ids, dtype=dtype).tobytes())
                n_docs += 1
                n_tokens += len(ids)
            done_bytes += path.stat().st_size
            if time.time() - last_report > 5:
                last_report = time.time()
                log(f"encoding: {done_bytes / 1e6:.1f}/{total_mb:.1f} MB, {n_tokens:,} tokens, "
                    f"{done_bytes / 1e6 / (last_report - start):.1f} MB/s")
    return n_docs, n_tokens


def _split_train_val(all_path: Path, dtype, val_fraction: float, train_path: Path, val_path: Path) -> dict:
    """Every k-th block of tokens (k = 1/val_fraction) goes to validation, so val samples the whole corpus."""
    tokens = np.memmap(all_path, dtype=dtype, mode="r")
    k = max(2, round(1 / val_fraction))
    block = min(MAX_SPLIT_BLOCK, max(1, len(tokens) // (4 * k)))
    counts = None
    n_train = n_val = 0
    with open(train_path, "wb") as train, open(val_path, "wb") as val:
        for i, start in enumerate(range(0, len(tokens), block)):
            chunk = np.asarray(tokens[start:start + block])
            if i % k == k // 2:
                val.write(chunk.tobytes())
                n_val += len(chunk)
                c = np.bincount(chunk.astype(np.int64))
                counts = c if counts is None else _add_counts(counts, c)
            else:
                train.write(chunk.tobytes())
                n_train += len(chunk)
    del tokens
    if n_val == 0 or n_train == 0:
        raise UserError(f"the corpus has only {n_train + n_val} tokens, too few to hold out a validation split; "
                        f"add text")
    p = counts[counts > 0] / counts.sum()
    return {"train_tokens": n_train, "val_tokens": n_val, "block": block,
            "val_unigram_entropy": float(-(p * np.log(p)).sum())}


def _add_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) < len(b):
        a, b = b, a
    a = a.copy()
    a[:len(b)] += b
    return a
