"""One shard of `normtron prepare-data`: read its input files, tokenize, split train/val, write the shard's files.

A shard is a fixed group of input files (the plan depends only on the file list and their sizes), so any process —
a local worker or a Slurm array task — can prepare any shard, and the result does not depend on who did it.

Train/val split. Each document is framed (BOS ids EOS) and cut into pieces of `piece_tokens` tokens (most
documents are a single piece). Piece j of a document goes to validation when (u + j * f) mod 1 < f, where f is
--val-fraction and u in [0, 1) is a hash of the document's text. So a short document is held out with probability
f, a long one has exactly every (1/f)-th piece held out, identical documents always land on the same side, and the
split depends neither on the number of workers nor on the order in which shards are done.

A shard is done when its files are renamed into place and then its record (records/<name>.json) is written: a
killed run leaves at worst temporary files, which the next run overwrites.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normtron.trainer.data.corpus import file_sha256, read_documents

FLUSH_TOKENS = 1 << 22  # tokens buffered per split before a write
ENCODE_BATCH_CHARS = 1 << 20  # characters of text handed to the tokenizer at once


@dataclass(frozen=True)
class Shard:
    name: str
    files: tuple[str, ...]
    bytes: int


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs besides the shard (picklable: sent once to every worker)."""
    work_dir: str
    tokenizer_path: str
    dtype: str
    val_fraction: float
    piece_tokens: int
    text_key: str


def plan_shards(files: list[Path], shard_bytes: int) -> list[Shard]:
    """Consecutive input files grouped up to `shard_bytes` each (a larger file is a shard of its own)."""
    groups: list[list[Path]] = []
    size = 0
    for path in files:
        file_size = path.stat().st_size
        if not groups or size + file_size > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += file_size
    return [Shard(f"{i:05d}", tuple(str(p) for p in group), sum(p.stat().st_size for p in group))
            for i, group in enumerate(groups)]


def document_hash(text: str) -> float:
    """A number in [0, 1) fixed by the document's text."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


class SplitWriter:
    """One split's token file of a shard, written through a temporary name, with its sha256 and document ends."""

    def __init__(self, path: Path, dtype: np.dtype, vocab_size: int | None):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.dtype, self.sha = dtype, hashlib.sha256()
        self.tokens, self.ends, self.buffer, self.buffered = 0, [], [], 0
        self.counts = np.zeros(vocab_size, np.int64) if vocab_size else None  # token frequencies (val only)

    def add(self, ids: np.ndarray) -> None:
        self.buffer.append(ids)
        self.buffered += len(ids)
        self.tokens += len(ids)
        self.ends.append(self.tokens)
        if self.buffered >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        chunk = np.concatenate(self.buffer)
        data = chunk.tobytes()
        self.file.write(data)
        self.sha.update(data)
        if self.counts is not None:
            self.counts += np.bincount(chunk, minlength=len(self.counts))[:len(self.counts)]
        self.buffer, self.buffered = [], 0

    def finish(self) -> None:
        """Flush, close and rename the token file and its document ends into place."""
        self.flush()
        self.file.close()
        docs = self.path.with_name(self.path.name[:-len(".bin")] + ".docs.npy")
        docs_tmp = docs.with_name(docs.name + ".tmp")
        with open(docs_tmp, "wb") as f:
            np.save(f, np.asarray(self.ends, dtype=np.int64))
        os.replace(self.tmp, self.path)
        os.replace(docs_tmp, docs)


# --- Worker process state: the tokenizer is loaded once per worker --------------------------------------------------

_worker: dict = {}


def init_worker(job: ShardJob, chars_done=None, tokens_done=None) -> None:
    """Pool initializer (also called in-process for one worker): load the tokenizer, keep the progress counters."""
    from normtron.trainer.data.tokenizer import load_tokenizer

    _worker.update(job=job, tok=load_tokenizer(job.tokenizer_path), chars=chars_done, tokens=tokens_done)


def prepare_shard(shard: Shard) -> dict:
    """Tokenize and write one shard; return its record (also written to records/<name>.json, last)."""
    job, tok = _worker["job"], _worker["tok"]
    work = Path(job.work_dir)
    dtype = np.dtype(job.dtype)
    train = SplitWriter(work / "shards" / f"{shard.name}.train.bin", dtype, None)
    val = SplitWriter(work / "shards" / f"{shard.name}.val.bin", dtype, tok.vocab_size)
    documents, characters, sources = 0, 0, []
    for file in shard.files:
        batch: list[str] = []
        batch_chars = 0
        for doc in read_documents(Path(file), text_key=job.text_key):
            if not doc.strip():
                continue
            batch.append(doc)
            batch_chars += len(doc)
            characters += len(doc)
            if batch_chars >= ENCODE_BATCH_CHARS:
                _encode_and_split(batch, batch_chars, tok, dtype, job, train, val)
                documents += len(batch)
                batch, batch_chars = [], 0
        if batch:
            _encode_and_split(batch, batch_chars, tok, dtype, job, train, val)
            documents += len(batch)
        path = Path(file)
        sources.append({"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    train.finish()
    val.finish()
    record = {"name": shard.name, "documents": documents, "train_tokens": train.tokens, "val_tokens": val.tokens,
              "sha256": {"train": train.sha.hexdigest(), "val": val.sha.hexdigest()}, "sources": sources,
              "input_bytes": shard.bytes, "characters": characters}
    records = work / "records"
    np.save(records / f"{shard.name}.val_counts.npy", val.counts)
    tmp = records / f"{shard.name}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, records / f"{shard.name}.json")  # last: the shard is done
    return record


def _encode_and_split(docs: list[str], chars: int, tok, dtype: np.dtype, job: ShardJob, train: SplitWriter,
                      val: SplitWriter) -> None:
    f, piece = job.val_fraction, job.piece_tokens
    n_tokens = 0
    for doc, ids in zip(docs, tok.encode_documents(docs, 1)):
        ids = np.asarray(ids, dtype=dtype)
        n_tokens += len(ids)
        u = document_hash(doc)
        # Consecutive pieces bound for the same split are written as one contiguous segment.
        start, n_pieces = 0, -(-len(ids) // piece)
        for j in range(n_pieces):
            to_val = (u + j * f) % 1.0 < f
            last = j == n_pieces - 1
            if last or ((u + (j + 1) * f) % 1.0 < f) != to_val:
                end = min(len(ids), (j + 1) * piece)
                (val if to_val else train).add(ids[start:end])
                start = end
    if _worker.get("chars") is not None:
        _worker["chars"].value += chars
        _worker["tokens"].value += n_tokens

