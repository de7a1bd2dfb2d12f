"""The training data of a run: one or more sources (prepared directories or Megatron indexed datasets), opened
and checked up front, and the batches drawn from them.

A mixture fills each global batch slot by slot with Megatron's blending rule: slot n (counted over the whole run)
goes to the source with the largest deficit `weight * (n + 1) - windows drawn from it so far` (ties: the first
source), so the realized shares track the weights exactly at every step. Within a source, windows are visited in
that source's own shuffled order (`WindowOrder`), as a single-source run visits them. Nothing depends on the world
size, and the checkpointed state (windows drawn per source, each source's epoch and position) resumes with the
exact next batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from normtron.trainer.config import DataConfig, DataSourceSpec, data_sources
from normtron.trainer.data.batches import (TokenStream, TrainBatches, WindowOrder, check_windows, load_data_meta,
                                  open_tokens)
from normtron.trainer.data.indexed import is_megatron_prefix, open_megatron
from normtron.trainer.data.tokenizer import load_tokenizer
from normtron.trainer.errors import UserError


@dataclass
class Source:
    """One opened source: its streams, meta.json (or the equivalent for a Megatron dataset) and tokenizer file."""
    name: str
    weight: float  # normalized: the weights of a run's sources add up to 1
    key: str  # the config key that names it, for messages
    path: str
    meta: dict
    train: TokenStream
    val: TokenStream
    tokenizer_file: Path  # copied into checkpoints

    @property
    def megatron(self) -> bool:
        return self.meta.get("format") == "megatron"


def open_sources(data: DataConfig) -> list[Source]:
    """Every source of data.dir / data.sources, opened and checked: complete, readable, one shared tokenizer."""
    specs = data_sources(data)
    tokenizer = load_config_tokenizer(data.tokenizer) if data.tokenizer else None
    total_weight = sum(spec.weight for spec in specs)
    sources = [open_source(spec, spec.weight / total_weight, tokenizer, data) for spec in specs]
    check_shared_tokenizer(sources, data.tokenizer, tokenizer)
    return sources


def load_config_tokenizer(path: str):
    if not Path(path).exists():
        raise UserError(f"data.tokenizer={path} does not exist; name the sentencepiece .model or tokenizer.json "
                        f"the data was tokenized with")
    try:
        return load_tokenizer(path)
    except UserError as err:
        raise UserError(f"data.tokenizer={path}: {err}") from None


def open_source(spec: DataSourceSpec, weight: float, tokenizer, data: DataConfig) -> Source:
    if is_megatron_prefix(spec.dir):
        if tokenizer is None:
            raise UserError(f"{spec.key}={spec.dir} is a Megatron indexed dataset, which carries no tokenizer; set "
                            f"data.tokenizer=PATH (the sentencepiece .model or tokenizer.json it was made with)")
        meta, train, val = open_megatron(spec.dir, tokenizer, data.val_fraction, spec.key)
        return Source(spec.name, weight, spec.key, spec.dir, meta, train, val, Path(data.tokenizer))
    halves = [Path(f"{spec.dir}{suffix}") for suffix in (".bin", ".idx")]
    if any(p.is_file() for p in halves) and not Path(spec.dir).is_dir():
        missing = next(p for p in halves if not p.is_file())
        raise UserError(f"{spec.key}={spec.dir} looks like a Megatron indexed dataset but {missing} is missing; "
                        f"a Megatron dataset needs both PREFIX.bin and PREFIX.idx")
    meta = load_data_meta(spec.dir, spec.key)
    return Source(spec.name, weight, spec.key, spec.dir, meta, open_tokens(spec.dir, "train", meta),
                  open_tokens(spec.dir, "val", meta),
                  Path(spec.dir) / meta["tokenizer"].get("file", "tokenizer.model"))


def check_shared_tokenizer(sources: list[Source], tokenizer_path: str | None, tokenizer) -> None:
    """All sources' token ids mean the same: one tokenizer (by sha256), and data.tokenizer, if set, is that one."""
    reference_key, reference = ((f"data.tokenizer={tokenizer_path}", tokenizer.info()["sha256"]) if tokenizer
                                else (f"{sources[0].key}={sources[0].path}", sources[0].meta["tokenizer"]["sha256"]))
    for source in sources:
        if source.meta["tokenizer"]["sha256"] != reference:
            raise UserError(f"{source.key}={source.path} was tokenized with another tokenizer than {reference_key}; "
                            f"every source of a run needs the same tokenizer (prepare it with "
                            f"`normtron prepare-data --tokenizer ...`)")


def sources_tokenizer(sources: list[Source]) -> Path:
    """The tokenizer a checkpoint carries (the sources share it)."""
    return sources[0].tokenizer_file


def make_batches(sources: list[Source], seq_len: int, global_batch: int, dp_rank: int, dp_size: int,
                 seed: int) -> TrainBatches | MixtureBatches:
    """A single source reads exactly as data.dir always has; several are mixed."""
    if len(sources) == 1:
        return TrainBatches(sources[0].train, seq_len, global_batch, dp_rank, dp_size, seed)
    return MixtureBatches(sources, seq_len, global_batch, dp_rank, dp_size, seed)


class MixtureBatches:
    """Endless global batches drawn from several sources by weight; `next_batch()` returns this rank's
    (inputs, targets) of shape (b, seq_len), as TrainBatches does."""

    def __init__(self, sources: list[Source], seq_len: int, global_batch: int, dp_rank: int, dp_size: int,
                 seed: int):
        self.names = [s.name for s in sources]
        self.streams = [s.train for s in sources]
        self.weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.seq_len, self.global_batch = seq_len, global_batch
        self.orders = [WindowOrder(check_windows(s.train, seq_len, f"the training data of {s.key}={s.path}"),
                                   seed, i) for i, s in enumerate(sources)]
        self.drawn = np.zeros(len(sources), dtype=np.int64)  # windows taken from each source since the run began
        local = global_batch // dp_size
        self.local_slice = slice(dp_rank * local, (dp_rank + 1) * local)

    def _next_global_slots(self) -> list[tuple[int, int]]:
        """(source, window) for each slot of the next global batch."""
        slots = []
        for _ in range(self.global_batch):
            deficit = self.weights * (self.drawn.sum() + 1) - self.drawn
            source = int(np.argmax(deficit))
            self.drawn[source] += 1
            slots.append((source, self.orders[source].next()))
        return slots

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.seq_len
        rows = [self.streams[s][w * n: w * n + n + 1] for s, w in self._next_global_slots()[self.local_slice]]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]

    def skip(self, n_batches: int) -> None:
        """Move the data position past the next `n_batches` global batches without reading them."""
        for _ in range(n_batches):
            self._next_global_slots()

    def shares(self) -> dict[str, float]:
        """Each source's share of the training tokens drawn so far in this run (resumes included)."""
        total = max(1, int(self.drawn.sum()))
        return {name: int(count) / total for name, count in zip(self.names, self.drawn)}

    def state_dict(self) -> dict:
        # The sources as one JSON string: the checkpoint's keys stay the same whatever the number of sources, so a
        # changed data.sources reaches the check in load_state_dict.
        return {"seq_len": self.seq_len, "sources": json.dumps([
            {"name": name, "n_windows": order.n_windows, "seed": order.seed, "epoch": order.epoch,
             "position": order.position, "drawn": int(drawn)}
            for name, order, drawn in zip(self.names, self.orders, self.drawn)])}

    def load_state_dict(self, state: dict) -> None:
        saved = json.loads(state["sources"]) if "sources" in state else None
        now = [(name, order.n_windows) for name, order in zip(self.names, self.orders)]
        if saved is None or [(s["name"], int(s["n_windows"])) for s in saved] != now \
                or int(state["seq_len"]) != self.seq_len:
            was = ("one source" if saved is None else
                   ", ".join(f"{s['name']} ({s['n_windows']} windows)" for s in saved))
            raise UserError(f"the checkpoint's data position was saved for {was} with data.seq_len="
                            f"{state['seq_len']}, but data.sources now gives "
                            f"{', '.join(f'{n} ({w} windows)' for n, w in now)} with data.seq_len={self.seq_len}; "
                            f"resume with the same data.sources and data.seq_len, or start a new run.name")
        for order, s in zip(self.orders, saved):
            order.restore(int(s["seed"]), int(s["epoch"]), int(s["position"]))
        self.drawn = np.array([int(s["drawn"]) for s in saved], dtype=np.int64)
