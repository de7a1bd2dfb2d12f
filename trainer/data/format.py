"""The prepared-data directory written by `normtron prepare-data` and read by the trainer: its files, meta.json,
and the checks that it is complete and consistent.

Format 1 (every directory prepared before format 2 existed; still read):
    tokenizer.model, train.bin, val.bin (flat uint16/uint32 token ids, each document as BOS ids EOS), meta.json.
Format 2 (sharded; see issue 14): meta.json lists `shards`; each shard's tokens are in shards/<name>.train.bin
    and shards/<name>.val.bin, and the split's token stream is the concatenation of its shards in meta.json's order.
meta.json is always written last: it marks the directory complete.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from trainer.data.corpus import file_sha256

FORMAT_VERSION = 1


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
    """Why `data_dir` is not a complete, consistent prepared directory (None when it is)."""
    if meta is None:
        return "has no readable meta.json"
    missing = [name for name in FORMAT1_FILES if not (data_dir / name).is_file()]
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


# --- Encoding and split ----------------------------------------------------------------------------------------------

def unigram_baseline(meta: dict) -> tuple[float, float]:
    """(entropy in nats, perplexity) of the validation tokens' own frequency distribution."""
    h = meta["val_unigram_entropy"]
    return h, math.exp(h)
