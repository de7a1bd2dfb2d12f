"""Tokenizers for prepared data: train or load a sentencepiece model, or (issue 14) load a Hugging Face
`tokenizer.json`. Both sit behind one small interface, so preparation, training and conversion never ask which.

A document is stored as `BOS ids EOS`, with BOS/EOS as the tokenizer defines them (a tokenizer without one writes
none).

The interface every tokenizer class offers (preparation, training and conversion use only this):
    kind: str                  "sentencepiece" | "huggingface"
    file_name: str             the file it is stored as in a prepared directory / checkpoint ("tokenizer.model" |
                               "tokenizer.json")
    vocab_size: int            ids are < vocab_size
    bos_id, eos_id: int|None   the ids framing each document (None: not added)
    encode_documents(docs, threads=1) -> list[list[int]]   each document's ids, framed
    info() -> dict             meta.json's "tokenizer" entry (file, type, source, sha256, bos_id, eos_id, ...)
    save(path)                 write the tokenizer file to `path`
`load_tokenizer(path)` returns the right class for a file (or a folder holding one).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from trainer.errors import UserError

DEFAULT_VOCAB_SIZE = 8192
MAX_TOKENIZER_SENTENCES = 2_000_000  # sentencepiece samples this many lines at most
ENCODE_CHUNK_CHARS = 1 << 20  # long documents are encoded in ~1 MB pieces split at line breaks


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class SentencePieceTokenizer:
    """A sentencepiece model (normtron's own, trained by prepare-data, or a Llama-2-style tokenizer.model)."""
    kind, file_name = "sentencepiece", "tokenizer.model"

    def __init__(self, model_bytes: bytes, source: str):
        import sentencepiece as spm

        self.model_bytes, self.source = model_bytes, source
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model_bytes)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def encode_documents(self, docs: list[str], threads: int = 1) -> list[list[int]]:
        """Each document's ids, framed as BOS ids EOS."""
        chunks = [list(document_chunks(doc)) for doc in docs]
        # One call for the whole batch: a call per document costs ~10% more (prepare-data's bench).
        encoded = iter(self.sp.encode([c for doc_chunks in chunks for c in doc_chunks], num_threads=threads))
        return [self._frame(next(encoded) if len(doc_chunks) == 1 else [t for _ in doc_chunks for t in next(encoded)])
                for doc_chunks in chunks]

    def _frame(self, ids: list[int]) -> list[int]:
        return ([self.bos_id] if self.bos_id is not None else []) + ids + ([self.eos_id] if self.eos_id is not None else [])

    def info(self) -> dict:
        return {"file": self.file_name, "type": self.kind, "source": self.source,
                "sha256": hashlib.sha256(self.model_bytes).hexdigest(),
                "bos_id": self.sp.bos_id(), "eos_id": self.sp.eos_id(), "unk_id": self.sp.unk_id(),
                "pad_id": self.sp.pad_id()}

    def save(self, path: Path) -> None:
        path.write_bytes(self.model_bytes)


def load_tokenizer(path: str | Path):
    """The tokenizer in `path`: a sentencepiece .model file (a tokenizer.json / HF folder: issue 14)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--tokenizer {path} does not exist; pass a sentencepiece .model file")
    model_bytes = path.read_bytes()
    try:
        return SentencePieceTokenizer(model_bytes, source=str(path.resolve()))
    except Exception:
        raise UserError(f"--tokenizer {path} is not a sentencepiece model") from None


def train_sentencepiece(documents: Iterable[str], vocab_size: int, n_files: int, log=print) -> SentencePieceTokenizer:
    """Train normtron's default tokenizer: byte-fallback BPE with Llama's special ids, on a sample of lines."""
    import sentencepiece as spm

    log(f"tokenizer: training sentencepiece BPE, vocab {vocab_size} ...")
    start = time.time()
    writer = io.BytesIO()
    spm.set_random_generator_seed(1234)
    sentences = _training_sentences(documents, n_files)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=writer, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # Llama's ids, so HF conversion needs no remapping
            max_sentence_length=16384, num_threads=os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1].split("] ")[-1]
        raise UserError(f"tokenizer training failed: {reason}; lower --vocab-size or add text") from None
    log(f"tokenizer: trained in {time.time() - start:.1f}s")
    return SentencePieceTokenizer(writer.getvalue(), source="trained")


def _training_sentences(documents: Iterable[str], n_files: int) -> list[str]:
    """A uniform sample (reservoir) of at most MAX_TOKENIZER_SENTENCES lines; read here, in Python, so that a bad
    file raises our error rather than one wrapped by sentencepiece."""
    rng = random.Random(0)
    sample: list[str] = []
    seen = 0
    for doc in documents:
        for line in doc.splitlines():
            line = line.rstrip()
            for start in range(0, len(line), 8192):
                seen += 1
                if len(sample) < MAX_TOKENIZER_SENTENCES:
                    sample.append(line[start:start + 8192])
                elif (j := rng.randrange(seen)) < MAX_TOKENIZER_SENTENCES:
                    sample[j] = line[start:start + 8192]
    if not sample:
        raise UserError(f"the corpus ({n_files} files) is empty; add text to it")
    return sample


def document_chunks(doc: str) -> Iterator[str]:
    """Split a long document at line breaks into pieces of about ENCODE_CHUNK_CHARS characters."""
    start = 0
    while len(doc) - start > ENCODE_CHUNK_CHARS:
        cut = doc.rfind("\n", start, start + ENCODE_CHUNK_CHARS) + 1 or start + ENCODE_CHUNK_CHARS
        cut = cut if cut > start else start + ENCODE_CHUNK_CHARS
        yield doc[start:cut]
        start = cut
    yield doc[start:]
