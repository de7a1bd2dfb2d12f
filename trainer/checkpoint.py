"""Checkpoints in `checkpoints/step_XXXXXXXX/`: model, optimizer and trainer state (step, scheduler, data position,
RNG). Single-process, DDP and FSDP2 runs write torch.distributed.checkpoint (DCP); DeepSpeed runs write DeepSpeed's
own format (its ZeRO partitions) into the same directory layout.

DCP state-dict keys are the plain model's parameter names (wrappers stripped by DCP's get_state_dict), so such a
checkpoint does not depend on the layout that wrote it: FSDP2 at 2 ranks resumes at 1 or 4, a pipeline's stages
(each rank saving the parameters and optimizer state of its stages, all keyed by name) resume in one process and back.
Each checkpoint is written into `step_XXXXXXXX.tmp` and renamed into place only when every rank has finished, so a
directory named `step_XXXXXXXX` is always complete; leftovers of an interrupted save are removed on the next start.
The resolved config and the tokenizer are copied in, so a checkpoint directory is self-contained for conversion.
Before the rename, checksums.json records every file's size and CRC32; each load checks them first
(trainer/checkpoint_verify.py) and, with `checkpoint.on_damaged: previous`, falls back to the newest intact one.

With checkpoint.async (DCP engines), a save copies the state to host memory (pinned on GPU) and returns; a background
thread writes it, over a gloo group of its own, into the same `.tmp` directory, and the rename happens only once
every rank's write has finished (a barrier on that group, in the background too). The next save, the end of training,
a preemption and `latest()` wait for a save in flight.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from normtron.parallel.distributed import DistInfo, barrier, broadcast_object
from normtron.trainer.checkpoint_verify import CHECKSUMS, damaged_files, write_checksums
from normtron.trainer.data.tokenizer import TOKENIZER_FILES
from normtron.trainer.errors import UserError
from normtron.trainer.metrics import LOG


SINGLE_PROCESS_WARNING = ".*assuming the intent is to (save|load) in a single process"


@contextlib.contextmanager
def single_process_ok():
    """DCP warns on every single-process save/load; that is a supported mode here, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        yield


# Fault injection for testing recovery: seconds a background save waits between its write and its publication,
# so that a test can kill the run while a written but incomplete checkpoint is on disk.
FAULT_SAVE_DELAY_ENV = "NORMTRON_FAULT_SAVE_DELAY"
STEP_DIR = re.compile(r"^step_(\d{8})$")
# The tokenizer a checkpoint carries: a sentencepiece model or a Hugging Face tokenizer.json (with, for the latter,
# the tokenizer_config.json holding its BOS/EOS rule); the first present is the one.


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_format(path: Path) -> str | None:
    """"dcp" (single process, DDP, FSDP2), "deepspeed" (DeepSpeed's engine), or None for an incomplete directory."""
    if (path / ".metadata").is_file():
        return "dcp"
    if any(path.glob("*model_states.pt")):
        return "deepspeed"
    return None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(f for f in found if checkpoint_format(f[1]) is not None)


@dataclass
class AsyncSave:
    """What a background DCP save needs: a gloo group of its own (its collectives run beside training's) and, on
    GPU, a stager that keeps pinned host buffers from one save to the next."""
    group: torch.distributed.ProcessGroup | None
    stager: Any = None

    @classmethod
    def create(cls) -> AsyncSave:
        """Collective: every rank calls it."""
        group = torch.distributed.new_group(backend="gloo") if torch.distributed.is_initialized() else None
        if group is None:  # the background thread warns outside single_process_ok()
            warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        stager = None
        if torch.cuda.is_available():
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
            stager = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                                  use_async_staging=False, use_non_blocking_copy=True))
        return cls(group, stager)


def save_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, train_state: Stateful,
             async_with: AsyncSave | None = None) -> Future | None:
    """Model and optimizer under their plain (layout-independent) names, plus the trainer state; all ranks call.
    With `async_with`: returns once the state is staged in host memory, with the write's future."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=FLAT_OPTIMIZER)
    state = {"model": model_sd, "optimizer": optim_sd, "train": train_state}
    no_dist = not torch.distributed.is_initialized()
    with single_process_ok():
        if async_with is None:
            dcp.save(state, checkpoint_id=path, no_dist=no_dist)
            return None
        return dcp.async_save(state, checkpoint_id=path, no_dist=no_dist, process_group=async_with.group,
                              async_stager=async_with.stager)


def load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, train_state: Stateful) -> None:
    """Load into whatever layout the model and optimizer have now (DCP reshards)."""
    options = FLAT_OPTIMIZER if flat_optimizer_state(path) else None
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd, "train": train_state}
    with single_process_ok():
        dcp.load(state, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)


# The optimizer state keyed by parameter name, hyperparameters included ("param_groups.<name>.lr"), not by
# param-group index: a pipeline stage's optimizer holds only some parameters, so group lists differ between ranks.
FLAT_OPTIMIZER = StateDictOptions(flatten_optimizer_state_dict=True)


def flat_optimizer_state(path: Path) -> bool:
    """Whether the checkpoint at `path` holds the flat optimizer layout (written since pipeline parallelism; older
    ones list param groups by index)."""
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return not any(re.match(r"optimizer\.param_groups\.\d", key) for key in keys)


class TrainingEngine(Protocol):
    """What the checkpointer needs from a parallel backend (see trainer/engine.py)."""
    checkpoint_format: str

    def save_checkpoint(self, path: Path, train_state: Stateful, async_with: AsyncSave | None = None) -> Any: ...

    def load_checkpoint(self, path: Path, train_state: Stateful) -> None: ...


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int, dist_info: DistInfo, on_damaged: str = "fail",
                 async_save: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.dist = dist_info
        self.on_damaged = on_damaged  # checkpoint.on_damaged: fail | previous
        self.async_with = AsyncSave.create() if async_save else None
        # The background save's last part: once this rank's write is done, wait for every rank's (a barrier on the
        # save's own group) and publish; at most one save in flight.
        self.finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if async_save else None
        self.pending: tuple[Future, Path] | None = None  # (the finisher's future, the step directory)
        self.stalls: list[float] = []  # seconds each save held training up (staging, or the whole synchronous save)
        self.noted_sync = False

    def latest(self) -> Path | None:
        """The newest complete checkpoint, as rank 0 sees it (a shared file system may lag on other nodes); a save
        in flight is finished first."""
        self.wait()
        found = complete_checkpoints(self.root) if self.dist.is_main else None
        found = broadcast_object(found)
        return found[-1][1] if found else None

    def remove_partial(self) -> None:
        """Delete what an interrupted save left: `*.tmp` directories and incomplete step directories (rank 0; call
        before any save)."""
        if self.dist.is_main and self.root.is_dir():
            complete = {path for _, path in complete_checkpoints(self.root)}
            for path in self.root.iterdir():
                if path.is_dir() and (path.name.endswith(".tmp") or STEP_DIR.match(path.name)) and path not in complete:
                    shutil.rmtree(path, ignore_errors=True)
        barrier()

    def save(self, step: int, engine: TrainingEngine, train_state: Stateful, extra_files: dict[str, Path],
             wait: bool = True) -> Path | None:
        """Write the checkpoint of `step`; returns the newest complete checkpoint. Asynchronous (checkpoint.async
        with a DCP engine) unless `wait`: then the returned one is the previous save's (or None), and `step`'s
        becomes visible in the background once every rank has written it."""
        started = time.perf_counter()
        newest = self.wait()  # at most one save in flight
        final = self.root / checkpoint_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        if self.async_with is not None and engine.checkpoint_format == "dcp":
            written = engine.save_checkpoint(tmp, train_state, async_with=self.async_with)
            group = self.async_with.group
            self.pending = (self.finisher.submit(self._publish, tmp, final, extra_files, written, group), final)
            self.stalls.append(time.perf_counter() - started)
            if not wait:
                LOG.info(f"checkpoint {final}: training waited {self.stalls[-1]:.2f} s (staging), writing in the "
                         f"background")
                return newest
            return self.wait()
        if self.async_with is not None and not self.noted_sync:  # DeepSpeed writes its own format, synchronously
            LOG.info(f"checkpoint.async: {engine.checkpoint_format} checkpoints are saved synchronously")
            self.noted_sync = True
        engine.save_checkpoint(tmp, train_state)
        self._publish(tmp, final, extra_files, quiet=True)
        self.stalls.append(time.perf_counter() - started)
        LOG.info(f"checkpoint {final}: training waited {self.stalls[-1]:.2f} s")
        return final

    def wait(self) -> Path | None:
        """Finish the save in flight, if any: returns its (now visible) directory, or None when nothing was in
        flight; raises what its write raised."""
        if self.pending is None:
            return None
        (finishing, final), self.pending = self.pending, None
        finishing.result()
        return final

    def _publish(self, tmp: Path, final: Path, extra_files: dict[str, Path], written: Future | None = None,
                 group: torch.distributed.ProcessGroup | None = None, quiet: bool = False) -> None:
        """Once every rank has written its part into `tmp` (this rank's background `written`, if any): add the
        extra files and rename it into place."""
        if written is not None:
            written.result()
            time.sleep(float(os.environ.get(FAULT_SAVE_DELAY_ENV, "0")))
        barrier(group)
        if self.dist.is_main:
            for name, src in extra_files.items():
                shutil.copy2(src, tmp / name)
            write_checksums(tmp)
            tmp.rename(final)
            self._prune()
        barrier(group)
        if not quiet:
            LOG.info(f"checkpoint {final}")

    def before(self, step: int) -> Path | None:
        """The newest complete checkpoint written before `step` (as rank 0 sees it); a save in flight is finished
        first (a rollback may want it)."""
        self.wait()
        found = complete_checkpoints(self.root) if self.dist.is_main else None
        found = [path for s, path in broadcast_object(found) if s < step]
        return found[-1] if found else None

    def intact(self, path: Path) -> Path:
        """`path` when its files pass their checksums; else, under on_damaged=previous, the newest intact checkpoint
        before it (the damaged one is moved aside to `step_XXXXXXXX.damaged`); else a one-line UserError."""
        problems = damaged_files(path) if self.dist.is_main else None
        problems = broadcast_object(problems)
        if not problems:
            return path
        step = int(STEP_DIR.match(path.name).group(1)) if STEP_DIR.match(path.name) else None
        previous = broadcast_object(find_intact(self.root, step) if self.dist.is_main else None)
        more = f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
        if self.on_damaged != "previous":
            fallback = (f"the previous intact checkpoint is {previous}: set checkpoint.on_damaged=previous to resume "
                        f"from it" if previous else "no earlier checkpoint is intact: choose another run.name")
            raise UserError(f"checkpoint {path} is damaged: {problems[0]}{more}; {fallback}")
        if previous is None:
            raise UserError(f"checkpoint {path} is damaged: {problems[0]}{more}; no earlier checkpoint is intact "
                            f"to fall back to: choose another run.name")
        if self.dist.is_main:
            path.rename(path.with_name(path.name + ".damaged"))  # kept for inspection, no longer a checkpoint
        barrier()
        LOG.warning(f"checkpoint {path} is damaged ({problems[0]}{more}); moved aside to {path.name}.damaged, "
                    f"falling back to {previous} (checkpoint.on_damaged=previous)")
        return previous

    def load(self, path: Path, engine: TrainingEngine, train_state: Stateful) -> Path:
        """Load the checkpoint at `path`, or the one intact() falls back to; returns the path loaded."""
        path = self.intact(path)
        written_by = checkpoint_format(path)
        if written_by != engine.checkpoint_format:
            backends = {"dcp": "ddp or fsdp", "deepspeed": "deepspeed"}
            raise UserError(f"checkpoint {path} was written by parallel.backend={backends[written_by]}; resume it "
                            f"with that backend, or choose another run.name to start a new run")
        try:
            engine.load_checkpoint(path, train_state)
        except UserError:
            raise
        except (Exception, CheckpointException) as err:  # damage surfaces as many types
            reason = load_failure_reason(err)
            if "Missing key" in reason and "train.data." in reason:  # saved for one source, resumed with several
                raise UserError(f"checkpoint {path} holds the data position of other data ({reason}); resume with "
                                f"the data.dir / data.sources it was saved with, or choose another run.name") from None
            raise UserError(f"checkpoint {path} cannot be loaded ({reason}); remove it to resume "
                            f"from the one before, or choose another run.name") from None
        return path

    def _prune(self) -> None:
        if self.keep_last > 0:
            for _, path in complete_checkpoints(self.root)[:-self.keep_last]:
                shutil.rmtree(path, ignore_errors=True)


def load_failure_reason(err: BaseException) -> str:
    """One line saying why DCP could not load; CheckpointException is a BaseException wrapping each rank's error."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]  # (exception, traceback) of the first failing rank
    return " ".join(str(err).split())[:200] or type(err).__name__


# --- Verification: the fallback on load, `normtron checkpoint verify DIR` ------------------------------------

def find_intact(root: Path, before_step: int | None = None) -> Path | None:
    """The newest complete checkpoint under `root` (RUN/checkpoints) older than `before_step` whose files pass
    their checksums, or None."""
    for step, path in reversed(complete_checkpoints(root)):
        if (before_step is None or step < before_step) and not damaged_files(path):
            return path
    return None


def verify_command(directory: str) -> int:
    """Check a checkpoint directory, or every complete checkpoint of a run directory; print each damaged file.
    Returns 0 when all are intact, 1 otherwise."""
    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"{path} {'is not a directory' if path.exists() else 'does not exist'}; pass a checkpoint "
                        f"directory (RUN/checkpoints/step_XXXXXXXX) or a run directory")
    targets = [path] if checkpoint_format(path) else [p for _, p in complete_checkpoints(path / "checkpoints")]
    if not targets:
        raise UserError(f"{path} is neither a checkpoint (no .metadata or DeepSpeed files) nor a run directory with "
                        f"complete checkpoints; pass RUN or RUN/checkpoints/step_XXXXXXXX")
    damaged = 0
    for target in targets:
        problems = damaged_files(target)
        how = "checksums.json" if (target / CHECKSUMS).is_file() else "format records (no checksums.json)"
        print(f"{'DAMAGED' if problems else 'ok'}  {target}  ({how})")
        for problem in problems:
            print(f"    {problem}")
        damaged += bool(problems)
    print(f"{len(targets) - damaged} of {len(targets)} checkpoint(s) intact")
    return 1 if damaged else 0


# --- Starting a new run from another model's weights (checkpoint.init_from) --------------------------------------

# Keys that only decide how a fresh model is initialized, so they may differ from the model being loaded.
_INIT_ONLY_KEYS = ("init_std", "depth_scaled_init")


def check_init_from(path: Path, model_cfg: Any, data_meta: dict) -> None:
    """`checkpoint.init_from` names a checkpoint (a training step or `normtron convert from-hf` output) with the
    run's model and the data's tokenizer."""
    import dataclasses
    import hashlib

    import yaml

    if not (path / ".metadata").is_file():
        raise UserError(f"checkpoint.init_from={path} is not a checkpoint (no .metadata); pass a "
                        f"checkpoints/step_XXXXXXXX directory or the output of `normtron convert from-hf`")
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))["model"]
        saved_vocab = saved["vocab_size"]
    except (OSError, yaml.YAMLError, UnicodeDecodeError, TypeError, KeyError):
        raise UserError(f"checkpoint.init_from={path} has no readable config.yaml with a model section") from None
    current = dataclasses.asdict(model_cfg)
    changed = [f"model.{k}: {saved.get(k)!r} there, {v!r} here" for k, v in current.items()
               if k not in _INIT_ONLY_KEYS and k not in model_cfg.COMPUTE_ONLY_KEYS and saved.get(k) != v]
    if changed:
        raise UserError(f"checkpoint.init_from={path} holds a different model ({'; '.join(changed)}); start from "
                        f"its config.yaml, e.g. `normtron train {path / 'config.yaml'} data.dir=...`")
    tokenizer = next((path / name for name in TOKENIZER_FILES if (path / name).is_file()), None)
    if tokenizer and hashlib.sha256(tokenizer.read_bytes()).hexdigest() != data_meta["tokenizer"]["sha256"]:
        raise UserError(f"data.dir was tokenized with another tokenizer than checkpoint.init_from={path} (vocab "
                        f"{saved_vocab}); prepare it with `normtron prepare-data --tokenizer {tokenizer} ...`")


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Only the model tensors of the checkpoint at `path` into `model` (any parallel layout), for a fresh run."""
    model_sd = get_model_state_dict(model)
    try:
        with single_process_ok():
            dcp.load({"model": model_sd}, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
    except (Exception, CheckpointException) as err:
        raise UserError(f"checkpoint.init_from={path} cannot be loaded ({load_failure_reason(err)})") from None
    set_model_state_dict(model, model_sd)
