"""Token batches from the memmaps written by `normtron prepare-data`.

The token stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets). Every
epoch visits the windows in a seeded random order; consecutive runs of `global_batch` windows form the global
batches, and each data-parallel rank takes its contiguous slice. The order depends only on the seed, so it is the
same for every world size, and resuming restores (epoch, position) to continue with the exact next batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError
from trainer.data.format import data_dir_problem, read_meta, split_files


def load_data_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared directory, after checking the directory is complete and consistent."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    problem = data_dir_problem(data_dir, meta) if data_dir.is_dir() else "does not exist"
    if problem is not None:
        raise UserError(f"data.dir={data_dir} {problem}; (re)build it with `normtron prepare-data --input ... "
                        f"--output {data_dir}`")
    return meta


def open_tokens(data_dir: str | Path, split: str, meta: dict) -> np.ndarray:
    """The token stream of `split`; each file's first and last million ids are checked against the vocabulary.
    (A format-2 directory's shard files are concatenated in memory here: a stopgap until the reader indexes them.)"""
    parts = []
    for path in split_files(data_dir, meta, split):
        if path.stat().st_size == 0:  # a shard may hold no validation documents
            continue
        tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
        sample = max(int(tokens[:1 << 20].max()), int(tokens[-(1 << 20):].max()))
        if sample >= meta["vocab_size"]:
            raise UserError(f"{path} holds token id {sample}, outside the vocabulary of {meta['vocab_size']}; the "
                            f"file is damaged: re-run `normtron prepare-data`")
        parts.append(tokens)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def num_windows(tokens: np.ndarray, seq_len: int) -> int:
    return (len(tokens) - 1) // seq_len


class TrainBatches:
    """Endless shuffled global batches; `next_batch()` returns this rank's (inputs, targets) of shape (b, seq_len)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, dp_rank: int, dp_size: int,
                 seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = num_windows(tokens, seq_len)
        if self.n_windows < 1:
            raise UserError(f"data.seq_len={seq_len} is larger than the training data ({len(tokens)} tokens); "
                            f"use a shorter data.seq_len or more text")
        self.local_batch = global_batch // dp_size
        self.local_slice = slice(dp_rank * self.local_batch, (dp_rank + 1) * self.local_batch)
        self.global_batch = global_batch
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def _next_global_indices(self) -> np.ndarray:
        picked = []
        for _ in range(self.global_batch):
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            picked.append(self._order[self.position])
            self.position += 1
        return np.asarray(picked)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self._next_global_indices()[self.local_slice]
        return stack_windows(self.tokens, windows, self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_windows": self.n_windows,
                "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if (state["n_windows"], state["seq_len"]) != (self.n_windows, self.seq_len):
            raise UserError(f"the checkpoint's data position was saved for {state['n_windows']} windows of "
                            f"{state['seq_len']} tokens, but data.dir now has {self.n_windows} of {self.seq_len}; "
                            f"resume with the same data and data.seq_len, or start a new run.name")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)


def stack_windows(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([tokens[w * seq_len: w * seq_len + seq_len + 1] for w in windows]).astype(np.int64)
    batch = torch.from_numpy(rows)
    return batch[:, :-1], batch[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int, dp_rank: int, dp_size: int) -> np.ndarray:
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
