"""Token batches from one source's token stream (a prepared directory's files as one TokenStream); mixtures of
several sources draw from such streams in mixture.py.

The token stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets). Every
epoch visits the windows in a seeded random order; consecutive runs of `global_batch` windows form the global
batches, and each data-parallel rank takes its contiguous slice. The order depends only on the seed, so it is the
same for every world size, and resuming restores (epoch, position) to continue with the exact next batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from normtron.trainer.errors import UserError
from normtron.trainer.data.format import data_dir_problem, read_meta, split_files


def load_data_meta(data_dir: str | Path, key: str = "data.dir") -> dict:
    """meta.json of a prepared directory, after checking the directory is complete and consistent."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    problem = data_dir_problem(data_dir, meta) if data_dir.is_dir() else "does not exist"
    if problem is not None:
        raise UserError(f"{key}={data_dir} {problem}; (re)build it with `normtron prepare-data --input ... "
                        f"--output {data_dir}`")
    return meta


class TokenStream:
    """Token ranges of one or more arrays read as one flat stream: `stream[a:b]` may span range boundaries.

    Format 2's shard files, format 1's single file and a Megatron dataset's train (or validation) documents are all
    such streams. Ranges are (array, start, stop); empty ones are dropped (np.memmap cannot map a 0-byte file).
    The ranges are kept as numpy arrays, so millions of them (one per held-out document) stay cheap."""

    def __init__(self, ranges: list[tuple[np.ndarray, int, int]]):
        ranges = [(array, start, stop) for array, start, stop in ranges if stop > start]
        self.arrays = [array for array, _, _ in ranges]
        self._set_ranges(np.arange(len(ranges)), np.array([r[1] for r in ranges], dtype=np.int64),
                         np.array([r[2] for r in ranges], dtype=np.int64))

    @classmethod
    def of_ranges(cls, array: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> TokenStream:
        """Many [start, stop) ranges of one array, in order."""
        stream = cls([])
        keep = stops > starts
        stream.arrays = [array]
        stream._set_ranges(np.zeros(int(keep.sum()), dtype=np.int64), starts[keep].astype(np.int64),
                           stops[keep].astype(np.int64))
        return stream

    def _set_ranges(self, array_index: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> None:
        self.array_index, self.starts = array_index, starts
        self.offsets = np.concatenate([[0], np.cumsum(stops - starts)])  # where each range begins in the stream
        self.dtype = self.arrays[0].dtype if self.arrays else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        begin, end, step = key.indices(len(self))
        if step != 1:
            raise IndexError("TokenStream supports contiguous slices only")
        parts, position = [], begin
        piece = int(np.searchsorted(self.offsets, begin, side="right")) - 1
        while position < end:
            local = int(self.starts[piece]) + position - int(self.offsets[piece])
            take = min(int(self.offsets[piece + 1]) - position, end - position)
            parts.append(self.arrays[self.array_index[piece]][local:local + take])
            position += take
            piece += 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)


def open_tokens(data_dir: str | Path, split: str, meta: dict) -> TokenStream:
    """The token stream of `split` (its files concatenated in order); its first and last million ids are checked
    against the vocabulary."""
    dtype = np.dtype(meta["dtype"])
    arrays = [np.memmap(path, dtype=dtype, mode="r") for path in split_files(data_dir, meta, split)
              if path.stat().st_size > 0]
    tokens = TokenStream([(array, 0, len(array)) for array in arrays])
    check_token_ids(tokens, meta["vocab_size"], f"{data_dir} ({split} split)")
    return tokens


def check_token_ids(tokens: TokenStream, vocab_size: int, where: str) -> None:
    """Every id in the first and last million tokens lies in [0, vocab_size): a cheap test for damaged files."""
    if len(tokens) == 0:
        return
    head, tail = tokens[:1 << 20], tokens[max(0, len(tokens) - (1 << 20)):]
    high = max(int(head.max()), int(tail.max()))
    low = min(int(head.min()), int(tail.min()))
    if high >= vocab_size or low < 0:
        bad = high if high >= vocab_size else low
        raise UserError(f"{where} holds token id {bad}, outside the vocabulary of {vocab_size}; the file is damaged "
                        f"or was made with another tokenizer: re-run `normtron prepare-data`")


def num_windows(tokens: TokenStream, seq_len: int) -> int:
    return (len(tokens) - 1) // seq_len


class WindowOrder:
    """The order in which one source's windows are visited: epoch after epoch, each a permutation seeded by
    (seed, epoch) — and the source's index in a mixture, for sources after the first — so it is the same at every
    world size and restored exactly from (epoch, position)."""

    def __init__(self, n_windows: int, seed: int, source_index: int = 0):
        self.n_windows, self.seed, self.source_index = n_windows, seed, source_index
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        key = [self.seed, epoch] + ([self.source_index] if self.source_index else [])
        return np.random.default_rng(key).permutation(self.n_windows)

    def next(self) -> int:
        if self.position == self.n_windows:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        self.position += 1
        return int(self._order[self.position - 1])

    def restore(self, seed: int, epoch: int, position: int) -> None:
        self.seed, self.epoch, self.position = seed, epoch, position
        self._order = self._permutation(epoch)


def check_windows(tokens: TokenStream, seq_len: int, what: str = "the training data") -> int:
    n = num_windows(tokens, seq_len)
    if n < 1:
        raise UserError(f"data.seq_len={seq_len} is larger than {what} ({len(tokens)} tokens); "
                        f"use a shorter data.seq_len or more text")
    return n


class TrainBatches:
    """Endless shuffled global batches; `next_batch()` returns this rank's (inputs, targets) of shape (b, seq_len)."""

    def __init__(self, tokens: TokenStream, seq_len: int, global_batch: int, dp_rank: int, dp_size: int,
                 seed: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n_windows = check_windows(tokens, seq_len)
        self.local_batch = global_batch // dp_size
        self.local_slice = slice(dp_rank * self.local_batch, (dp_rank + 1) * self.local_batch)
        self.global_batch = global_batch
        self.order = WindowOrder(self.n_windows, seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = np.asarray([self.order.next() for _ in range(self.global_batch)])[self.local_slice]
        return stack_windows(self.tokens, windows, self.seq_len)

    def skip(self, n_batches: int) -> None:
        """Move the data position past the next `n_batches` global batches without reading them."""
        for _ in range(n_batches * self.global_batch):
            self.order.next()

    def state_dict(self) -> dict:
        return {"epoch": self.order.epoch, "position": self.order.position, "seed": self.order.seed,
                "n_windows": self.n_windows, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if "sources" in state:
            sources = len(json.loads(state["sources"]))
            raise UserError(f"the checkpoint's data position was saved for a mixture of {sources} sources, but this "
                            f"run reads one; resume with the same data.sources, or start a new run.name")
        if (state["n_windows"], state["seq_len"]) != (self.n_windows, self.seq_len):
            raise UserError(f"the checkpoint's data position was saved for {state['n_windows']} windows of "
                            f"{state['seq_len']} tokens, but data.dir now has {self.n_windows} of {self.seq_len}; "
                            f"resume with the same data and data.seq_len, or start a new run.name")
        self.order.restore(int(state["seed"]), int(state["epoch"]), int(state["position"]))


def stack_windows(tokens: TokenStream, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([tokens[w * seq_len: w * seq_len + seq_len + 1] for w in windows]).astype(np.int64)
    batch = torch.from_numpy(rows)
    return batch[:, :-1], batch[:, 1:]


def eval_windows(tokens: TokenStream, seq_len: int, max_windows: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """The first `max_windows` validation windows (a fixed set, so evaluations are comparable), this rank's share.

    Rounded down to a multiple of the rank count so every rank runs the same number of forward passes (sharded
    models run collectives inside the forward)."""
    available = num_windows(tokens, seq_len)
    if available < 1:
        raise UserError(f"data.seq_len={seq_len} is larger than the validation data ({len(tokens)} tokens); "
                        f"use a shorter data.seq_len or prepare data with a larger --val-fraction")
    n = min(available, max_windows) // dp_size * dp_size
    if n < 1:
        raise UserError(f"the validation data holds {available} sequence(s) of data.seq_len={seq_len} tokens, "
                        f"fewer than the {dp_size} ranks; use a shorter data.seq_len or a larger --val-fraction")
    return np.arange(dp_rank, n, dp_size)
