"""The prepared-data directory written by `normtron prepare-data` and read by the trainer: its files, meta.json,
and the checks that it is complete and consistent.

Format 1 (every directory prepared before format 2 existed; still read):
    tokenizer.model, train.bin, val.bin (flat uint16/uint32 token ids, each document as BOS ids EOS), meta.json.
Format 2 (sharded; see issue 14): meta.json lists `shards`; each shard's tokens are in shards/<name>.train.bin
    and shards/<name>.val.bin (a val file may be empty), and the split's token stream is the concatenation of its
    shards in meta.json's order; shards/<name>.{train,val}.docs.npy hold the int64 end offset of each document
    (or held-out piece of a long one) in that file. The tokenizer file is named by meta["tokenizer"]["file"]
    (tokenizer.model or tokenizer.json); meta["shards"] records each shard's counts and sha256 per split.
meta.json is always written last: it marks the directory complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from normtron.trainer.data.corpus import file_sha256

FORMAT_VERSION = 2  # what prepare-data writes; format 1 directories are still read


def read_meta(data_dir: str | Path) -> dict | None:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def split_files(data_dir: str | Path, meta: dict, split: str) -> list[Path]:
    """The token files of `split` ("train" or "val"), in the order their tokens form the split's stream."""
    data_dir = Path(data_dir)
    if meta.get("format", 1) == 1:
        return [data_dir / f"{split}.bin"]
    return [data_dir / "shards" / f"{shard['name']}.{split}.bin" for shard in meta["shards"]]


FORMAT1_FILES = ("tokenizer.model", "train.bin", "val.bin", "meta.json")  # meta.json last: it marks completion


def data_dir_problem(data_dir: Path, meta: dict | None) -> str | None:
    """Why `data_dir` is not a complete, consistent prepared directory (None when it is). Cheap: file sizes and
    the tokenizer's checksum, never the token files' contents."""
    if meta is None:
        return "has no readable meta.json"
    try:
        version = meta.get("format", 1)
        if version not in (1, 2):
            return f"has a meta.json of format {version!r}, which this normtron does not know (it reads 1 and 2)"
        tok_file = meta["tokenizer"].get("file", "tokenizer.model") if isinstance(meta["tokenizer"], dict) else None
        needed = FORMAT1_FILES if version == 1 else (tok_file, "meta.json")
        missing = [name for name in needed if not name or not (data_dir / name).is_file()]
        if missing:
            return f"lacks {', '.join(map(str, missing))}"
        if meta["dtype"] not in ("uint16", "uint32") or not isinstance(meta["vocab_size"], int):
            return "has a meta.json with an invalid dtype or vocab_size"
        if not isinstance(meta["val_unigram_entropy"], float):
            return "has a meta.json without val_unigram_entropy"
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            count = meta[f"{split}_tokens"]
            if not isinstance(count, int) or count < 1:
                return f"has a meta.json with {count!r} {split} tokens"
            counts = [count] if version == 1 else [shard[f"{split}_tokens"] for shard in meta["shards"]]
            if sum(counts) != count:
                return f"has a meta.json whose shards do not add up to its {count} {split} tokens"
            for path, n in zip(split_files(data_dir, meta, split), counts):
                size = path.stat().st_size if path.is_file() else None
                if size != n * itemsize:
                    shown = path.relative_to(data_dir)
                    return (f"has a {shown} of {size} bytes where meta.json says {n} {meta['dtype']} tokens"
                            if size is not None else f"lacks {shown}")
        if file_sha256(data_dir / tok_file) != meta["tokenizer"]["sha256"]:
            return f"has a {tok_file} that is not the one its token files were made with"
        from normtron.trainer.data.tokenizer import load_tokenizer

        pieces = load_tokenizer(data_dir / tok_file).vocab_size
        if pieces != meta["vocab_size"]:
            return f"has a meta.json vocab_size of {meta['vocab_size']} but its tokenizer has {pieces} pieces"
    except (KeyError, TypeError, AttributeError):
        return "has an incomplete meta.json"
    return None
