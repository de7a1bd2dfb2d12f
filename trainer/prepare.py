"""`normtron prepare-data`: corpus files -> sentencepiece tokenizer + train/val token memmaps + meta.json.

Output directory contract: tokenizer.model, train.bin, val.bin (flat uint16/uint32 token ids, each document as
BOS ids EOS), meta.json. Everything is written to temporary names first and renamed into place at the end, meta.json
last, so a failed or interrupted run leaves an existing prepared directory as it was (or, interrupted in the final
renames, without meta.json, which the trainer reports as not prepared).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer.corpus import file_sha256, find_corpus_files, read_documents
from trainer.errors import UserError

FORMAT_VERSION = 1
DEFAULT_VOCAB_SIZE = 8192
MAX_TOKENIZER_SENTENCES = 2_000_000  # sentencepiece samples this many lines at most
ENCODE_CHUNK_CHARS = 1 << 20  # long documents are encoded in ~1 MB pieces split at line breaks
MAX_SPLIT_BLOCK = 4096  # train/val split granularity in tokens


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_meta(data_dir: str | Path) -> dict | None:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


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
    staged = {name: output / f".{name}.tmp-{os.getpid()}" for name in (*_OUTPUTS, "all.bin")}
    try:
        meta = _tokenize_and_split(files, tokenizer, options, sources, staged, total_mb, log)
        (output / "meta.json").unlink(missing_ok=True)  # from here until the end, the directory reads as incomplete
        for name in _OUTPUTS:
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
    sp, model_bytes, tok_info = _load_or_train_tokenizer(files, tokenizer, options["vocab_size"], log)
    staged["tokenizer.model"].write_bytes(model_bytes)
    dtype = token_dtype(sp.get_piece_size())
    n_docs, n_tokens = _encode_corpus(files, sp, dtype, staged["all.bin"], total_mb, log)
    if n_tokens < 4:
        raise UserError(f"the corpus ({len(files)} files) is empty; add text to it")
    split = _split_train_val(staged["all.bin"], dtype, options["val_fraction"], staged["train.bin"],
                             staged["val.bin"])
    meta = {
        "format": FORMAT_VERSION,
        "vocab_size": sp.get_piece_size(),
        "dtype": dtype.name,
        "documents": n_docs,
        "train_tokens": split["train_tokens"],
        "val_tokens": split["val_tokens"],
        "split_block_tokens": split["block"],
        "val_unigram_entropy": split["val_unigram_entropy"],
        "tokenizer": tok_info,
        "sources": sources,
        "options": options,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    staged["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
    return meta


_OUTPUTS = ("tokenizer.model", "train.bin", "val.bin", "meta.json")  # meta.json last: it marks completion


def data_dir_problem(data_dir: Path, meta: dict | None) -> str | None:
    """Why `data_dir` is not a complete, consistent prepared directory (None when it is)."""
    if meta is None:
        return "has no readable meta.json"
    missing = [name for name in _OUTPUTS if not (data_dir / name).is_file()]
    if missing:
        return f"lacks {', '.join(missing)}"
    try:
        if meta["dtype"] not in ("uint16", "uint32") or not isinstance(meta["vocab_size"], int):
            return "has a meta.json with an invalid dtype or vocab_size"
        if not isinstance(meta["val_unigram_entropy"], float):
            return "has a meta.json without val_unigram_entropy"
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            size, count = (data_dir / f"{split}.bin").stat().st_size, meta[f"{split}_tokens"]
            if not isinstance(count, int) or count < 1 or size != count * itemsize:
                return f"has a {split}.bin of {size} bytes where meta.json says {count} {meta['dtype']} tokens"
        if file_sha256(data_dir / "tokenizer.model") != meta["tokenizer"]["sha256"]:
            return "has a tokenizer.model that is not the one its token files were made with"
        import sentencepiece as spm

        pieces = spm.SentencePieceProcessor(model_file=str(data_dir / "tokenizer.model")).get_piece_size()
        if pieces != meta["vocab_size"]:
            return f"has a meta.json vocab_size of {meta['vocab_size']} but its tokenizer has {pieces} pieces"
    except (KeyError, TypeError):
        return "has an incomplete meta.json"
    return None


# --- Tokenizer -----------------------------------------------------------------------------------------------------

def _load_or_train_tokenizer(files, tokenizer, vocab_size, log):
    import sentencepiece as spm

    if tokenizer:
        model_bytes = Path(tokenizer).read_bytes()
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_bytes)
        except Exception:
            raise UserError(f"--tokenizer {tokenizer} is not a sentencepiece model") from None
        if vocab_size is not None and vocab_size != sp.get_piece_size():
            raise UserError(f"--vocab-size={vocab_size} disagrees with --tokenizer {tokenizer} "
                            f"({sp.get_piece_size()} pieces); drop --vocab-size")
        log(f"tokenizer: {tokenizer} ({sp.get_piece_size()} pieces)")
        return sp, model_bytes, _tokenizer_info(sp, model_bytes, source=str(Path(tokenizer).resolve()))

    log(f"tokenizer: training sentencepiece BPE, vocab {vocab_size} ...")
    start = time.time()
    writer = io.BytesIO()
    spm.set_random_generator_seed(1234)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_sentences(files)), model_writer=writer, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # Llama's ids, so HF conversion needs no remapping
            max_sentence_length=16384, num_threads=os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1].split("] ")[-1]
        raise UserError(f"tokenizer training failed: {reason}; lower --vocab-size or add text") from None
    model_bytes = writer.getvalue()
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    log(f"tokenizer: trained in {time.time() - start:.1f}s")
    return sp, model_bytes, _tokenizer_info(sp, model_bytes, source="trained")


def _tokenizer_info(sp, model_bytes: bytes, source: str) -> dict:
    import hashlib

    return {"file": "tokenizer.model", "type": "sentencepiece", "source": source,
            "sha256": hashlib.sha256(model_bytes).hexdigest(),
            "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(), "pad_id": sp.pad_id()}


def _training_sentences(files) -> list[str]:
    """A uniform sample (reservoir) of at most MAX_TOKENIZER_SENTENCES lines; read here, in Python, so that a bad
    file raises our error rather than one wrapped by sentencepiece."""
    rng = random.Random(0)
    sample: list[str] = []
    seen = 0
    for path in files:
        for doc in read_documents(path):
            for line in doc.splitlines():
                line = line.rstrip()
                for start in range(0, len(line), 8192):
                    seen += 1
                    if len(sample) < MAX_TOKENIZER_SENTENCES:
                        sample.append(line[start:start + 8192])
                    elif (j := rng.randrange(seen)) < MAX_TOKENIZER_SENTENCES:
                        sample[j] = line[start:start + 8192]
    if not sample:
        raise UserError(f"the corpus ({len(files)} files) is empty; add text to it")
    return sample


# --- Encoding and split ----------------------------------------------------------------------------------------------

def _document_chunks(doc: str) -> Iterator[str]:
    """Split a long document at line breaks into pieces of about ENCODE_CHUNK_CHARS characters."""
    start = 0
    while len(doc) - start > ENCODE_CHUNK_CHARS:
        cut = doc.rfind("\n", start, start + ENCODE_CHUNK_CHARS) + 1 or start + ENCODE_CHUNK_CHARS
        cut = cut if cut > start else start + ENCODE_CHUNK_CHARS
        yield doc[start:cut]
        start = cut
    yield doc[start:]


def _encode_corpus(files, sp, dtype, out_path: Path, total_mb: float, log) -> tuple[int, int]:
    bos, eos = sp.bos_id(), sp.eos_id()
    n_docs = n_tokens = 0
    done_bytes, last_report, start = 0, time.time(), time.time()
    threads = os.cpu_count() or 1
    with open(out_path, "wb") as out:
        for path in files:
            for doc in read_documents(path):
                if not doc.strip():
                    continue
                pieces = sp.encode(list(_document_chunks(doc)), num_threads=threads)
                ids = ([bos] if bos >= 0 else []) + [t for piece in pieces for t in piece] + ([eos] if eos >= 0 else [])
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


def unigram_baseline(meta: dict) -> tuple[float, float]:
    """(entropy in nats, perplexity) of the validation tokens' own frequency distribution."""
    h = meta["val_unigram_entropy"]
    return h, math.exp(h)
