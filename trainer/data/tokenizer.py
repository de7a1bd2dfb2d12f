"""Tokenizers for prepared data: train or load a sentencepiece model, or load a Hugging Face
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
    save(path)                 write the tokenizer file to `path` (a Hugging Face tokenizer also writes the
                               tokenizer_config.json that holds its EOS rule beside it)
`load_tokenizer(path)` returns the right class for a file (or a folder holding one).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from normtron.trainer.errors import UserError

DEFAULT_VOCAB_SIZE = 8192
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # the two kinds, in the order a folder is searched
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


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizer.json` (Llama 3, Mistral, GPT-NeoX, OLMo, Qwen ...), run by the `tokenizers` library.

    A document's ids are exactly `Tokenizer.encode(doc).ids`: its post-processor adds BOS where the tokenizer does
    (Llama 3's <|begin_of_text|>; GPT-NeoX adds none). EOS is appended unless the ids already end with it. The EOS
    token is the `eos_token` of the tokenizer_config.json beside the file if that names one (null there: no EOS);
    without that key, the first special token of the tokenizer.json among KNOWN_EOS_TOKENS; otherwise none.
    `save` writes tokenizer_config.json beside the copy, so a saved tokenizer loads with the same rule.
    """
    kind, file_name = "huggingface", "tokenizer.json"
    CONFIG_NAME = "tokenizer_config.json"
    KNOWN_EOS_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")  # Llama 3; NeoX/OLMo/Qwen; Llama 2; Gemma

    def __init__(self, json_bytes: bytes, source: str, config: dict | None = None):
        from tokenizers import Tokenizer

        self.json_bytes, self.source = json_bytes, source
        try:
            self.tokenizer = Tokenizer.from_str(json_bytes.decode("utf-8"))
        except Exception as err:  # tokenizers raises a plain Exception for malformed files
            raise UserError(f"{source} is not a Hugging Face tokenizer.json ({' '.join(str(err).split())[:160]})") \
                from None
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self.tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=0) + 1)
        config = config or {}
        # BOS: the token the post-processor puts in front of every text, if any.
        empty, one = self.tokenizer.encode("").ids, self.tokenizer.encode("a").ids
        self.bos_id = empty[0] if empty and one and one[0] == empty[0] else None
        self.bos_token = self.tokenizer.id_to_token(self.bos_id) if self.bos_id is not None else \
            _token_content(config.get("bos_token"))
        if "eos_token" in config:
            self.eos_token, self.eos_source = _token_content(config["eos_token"]), self.CONFIG_NAME
        else:
            special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
            self.eos_token = next((t for t in self.KNOWN_EOS_TOKENS if t in special), None)
            self.eos_source = "tokenizer.json special tokens"
        self.eos_id = self._token_id(self.eos_token, "eos_token")
        if self.bos_id is None and self.bos_token is not None and self.tokenizer.token_to_id(self.bos_token) is None:
            self.bos_token = None  # a config naming a token the vocabulary lacks: not used for framing anyway

    def _token_id(self, token: str | None, key: str) -> int | None:
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(f"the {self.CONFIG_NAME} beside {self.source} names {key} {token!r}, which its "
                            f"tokenizer.json does not have; fix {key} there")
        return token_id

    def encode_documents(self, docs: list[str], threads: int = 1) -> list[list[int]]:
        """Each document's ids, as `Tokenizer.encode` gives them, then EOS (see the class docstring)."""
        if threads > 1:  # the tokenizers library spreads a batch over its own threads
            encodings = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)(docs)
        else:
            encodings = [self.tokenizer.encode(doc) for doc in docs]
        out = []
        for encoding in encodings:
            ids = encoding.ids
            if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
                ids.append(self.eos_id)
            out.append(ids)
        return out

    def info(self) -> dict:
        return {"file": self.file_name, "type": self.kind, "source": self.source,
                "sha256": hashlib.sha256(self.json_bytes).hexdigest(),
                "bos_id": self.bos_id, "eos_id": self.eos_id, "bos_token": self.bos_token,
                "eos_token": self.eos_token, "eos_from": self.eos_source,
                "framing": "Tokenizer.encode(doc).ids (its post-processor adds BOS), then eos_id unless already last"}

    def save(self, path: Path) -> None:
        path.write_bytes(self.json_bytes)
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        (path.parent / self.CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def _token_content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken mapping."""
    return token.get("content") if isinstance(token, dict) else token


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file `path` stands for: itself, or in a folder its tokenizer.model if it has one (a Llama 2
    style folder has both; normtron has always used the sentencepiece model of such models, and `convert from-hf`
    keeps it), else its tokenizer.json."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in TOKENIZER_FILES if (path / name).is_file()), None)
        if found is None:
            raise UserError(f"tokenizer folder {path} holds neither tokenizer.model nor tokenizer.json; pass a "
                            f"sentencepiece .model, a tokenizer.json or a folder holding one")
        return found
    if not path.is_file():
        raise UserError(f"tokenizer {path} does not exist; pass a sentencepiece .model file, a Hugging Face "
                        f"tokenizer.json or a folder holding one")
    return path


def load_tokenizer(path: str | Path):
    """The tokenizer in `path` (see `tokenizer_file`): a sentencepiece .model file, or a Hugging Face tokenizer.json
    with the tokenizer_config.json beside it, if any (see HuggingFaceTokenizer)."""
    path = tokenizer_file(path)
    data = path.read_bytes()
    if data.lstrip()[:1] == b"{":  # JSON: a Hugging Face tokenizer
        return HuggingFaceTokenizer(data, source=str(path.resolve()), config=_read_tokenizer_config(path))
    try:
        return SentencePieceTokenizer(data, source=str(path.resolve()))
    except Exception:
        raise UserError(f"tokenizer {path} is neither a sentencepiece model nor a Hugging Face tokenizer.json") \
            from None


def _read_tokenizer_config(tokenizer_json: Path) -> dict | None:
    config = tokenizer_json.parent / HuggingFaceTokenizer.CONFIG_NAME
    if not config.is_file():
        return None
    try:
        loaded = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config} is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{config} is not a JSON object; fix or remove it")
    return loaded


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
