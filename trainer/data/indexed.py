"""Megatron-LM / GPT-NeoX indexed datasets (`PREFIX.bin` + `PREFIX.idx`), read with numpy.

The .idx file ("MMIDIDX" index, version 1), all little-endian:
    9 bytes  b"MMIDIDX\\x00\\x00"       8 bytes  version (1)          1 byte  dtype code of the tokens in .bin
    8 bytes  sequence count S           8 bytes  document-index count D
    S x int32   sequence lengths (tokens)
    S x int64   sequence pointers (byte offsets into .bin)
    D x int64   document indices: document d is sequences [doc[d], doc[d+1]); doc[0] = 0, so D - 1 documents
    (S x int8 sequence modes follow in multimodal datasets; not read)
The .bin file holds the token ids, sequence after sequence.

Such data carries no tokenizer (the config names it with data.tokenizer) and no validation split: every k-th
document (indices k-1, 2k-1, ...; k = round(1 / data.val_fraction)) is held out for validation, the rest trains.
Each split's token stream is its documents concatenated in index order, as Megatron's GPT dataset reads them.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from normtron.trainer.data.batches import TokenStream, check_token_ids
from normtron.trainer.errors import UserError

INDEX_HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py)
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
UNIGRAM_SAMPLE_TOKENS = 1 << 24  # the unigram baseline of a Megatron validation split is measured on these
CHECK_CHUNK = 1 << 24


def is_megatron_prefix(path: str | Path) -> bool:
    return Path(f"{path}.idx").is_file() and Path(f"{path}.bin").is_file()


class MegatronIndex:
    """The .idx of an indexed dataset: token dtype and each document's [start, stop) token range in the .bin."""

    def __init__(self, prefix: str | Path, key: str):
        idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")

        def damaged(why: str) -> UserError:
            return UserError(f"{key}={prefix}: {idx_path} {why}; it is not a Megatron indexed dataset index "
                             f"(rebuild it with Megatron's tools/preprocess_data.py)")

        raw = np.memmap(idx_path, dtype=np.uint8, mode="r") if idx_path.stat().st_size else np.zeros(0, np.uint8)
        if bytes(raw[:9]) != INDEX_HEADER:
            raise damaged("does not start with the MMIDIDX header")
        if len(raw) < 34:
            raise damaged("is truncated")
        version, code = struct.unpack("<QB", bytes(raw[9:18]))
        sequences, doc_count = struct.unpack("<QQ", bytes(raw[18:34]))
        if version != 1:
            raise damaged(f"has index version {version}, not 1")
        if code not in DTYPE_CODES or np.dtype(DTYPE_CODES[code]).kind not in "iu":
            raise damaged(f"has token dtype code {code}, not an integer type")
        self.dtype = np.dtype(DTYPE_CODES[code])
        if len(raw) < 34 + sequences * 12 + doc_count * 8 or doc_count < 1:
            raise damaged(f"is shorter than its {sequences} sequences and {doc_count} document indices need")
        lengths = np.frombuffer(raw, np.int32, sequences, 34)
        pointers = np.frombuffer(raw, np.int64, sequences, 34 + 4 * sequences)
        doc_index = np.frombuffer(raw, np.int64, doc_count, 34 + 12 * sequences)
        if doc_index[0] != 0 or doc_index[-1] != sequences or np.any(np.diff(doc_index) < 0):
            raise damaged("has document indices that do not cover its sequences in order")
        itemsize = self.dtype.itemsize
        for a in range(0, sequences, CHECK_CHUNK):  # sequences back to back (checked in chunks: bounded memory)
            p, n = pointers[a:a + CHECK_CHUNK + 1], lengths[a:a + CHECK_CHUNK].astype(np.int64)
            if (a == 0 and p[0] != 0) or not np.array_equal(np.diff(p), n[:len(p) - 1] * itemsize):
                raise damaged("has sequence pointers that are not back to back (not supported)")
        total = int(pointers[-1]) // itemsize + int(lengths[-1]) if sequences else 0
        if bin_path.stat().st_size != total * self.dtype.itemsize:
            raise UserError(f"{key}={prefix}: {bin_path} holds {bin_path.stat().st_size} bytes where {idx_path} "
                            f"says {total} {self.dtype} tokens; the pair is damaged or mismatched")
        # The token offset where each document begins, and the end.
        begins = pointers[doc_index[:-1]] // itemsize if sequences else np.zeros(doc_count - 1, np.int64)
        self.doc_starts = np.append(begins, total)
        self.bin_path, self.total_tokens = bin_path, total

    @property
    def documents(self) -> int:
        return len(self.doc_starts) - 1

    def tokens(self) -> np.ndarray:
        return (np.memmap(self.bin_path, dtype=self.dtype, mode="r") if self.total_tokens
                else np.zeros(0, self.dtype))


def holdout_every(val_fraction: float) -> int:
    """k: every k-th document is a validation document."""
    return max(2, round(1 / val_fraction))


def megatron_split(index: MegatronIndex, every: int, split: str) -> TokenStream:
    """The train or val documents as one stream: val is documents k-1, 2k-1, ...; train the others, in order."""
    tokens, bounds = index.tokens(), index.doc_starts
    held_out = np.arange(every - 1, index.documents, every)
    if split == "val":
        return TokenStream.of_ranges(tokens, bounds[held_out], bounds[held_out + 1])
    # Between two held-out documents the training documents are contiguous in the .bin: one range each.
    first = np.concatenate([[0], held_out + 1])  # the first training document of each run
    after = np.concatenate([held_out, [index.documents]])  # the document after its last
    return TokenStream.of_ranges(tokens, bounds[first], bounds[after])


def open_megatron(prefix: str | Path, tokenizer, val_fraction: float, key: str) -> tuple[dict, TokenStream,
                                                                                          TokenStream]:
    """(meta, train stream, val stream) of a Megatron dataset; meta has the keys of a prepared directory's
    meta.json that training reads (vocab_size, dtype, token counts, val_unigram_entropy, tokenizer)."""
    index = MegatronIndex(prefix, key)
    every = holdout_every(val_fraction)
    if index.documents < every:
        raise UserError(f"{key}={prefix} holds {index.documents} documents; holding out every {every}th for "
                        f"validation (data.val_fraction={val_fraction}) leaves none: raise data.val_fraction")
    train, val = megatron_split(index, every, "train"), megatron_split(index, every, "val")
    for split, stream in (("train", train), ("val", val)):
        check_token_ids(stream, tokenizer.vocab_size, f"{key}={prefix} ({split} documents)")
    sample = val[:UNIGRAM_SAMPLE_TOKENS].astype(np.int64)
    counts = np.bincount(sample, minlength=tokenizer.vocab_size)
    p = counts[counts > 0] / max(1, len(sample))
    meta = {"format": "megatron", "vocab_size": tokenizer.vocab_size, "dtype": str(index.dtype),
            "documents": index.documents, "train_tokens": len(train), "val_tokens": len(val),
            "val_documents": index.documents // every,
            "val_unigram_entropy": float(-(p * np.log(p)).sum()), "tokenizer": tokenizer.info()}
    return meta, train, val
