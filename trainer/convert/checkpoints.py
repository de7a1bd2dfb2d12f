"""Reading training checkpoints without a process group: which checkpoint a path means, the run config saved in
it, and its `model.*` tensors by name, checked against that config (shapes, file sizes, chunk checksums)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from normtron.models.config import ModelConfig
from normtron.trainer.checkpoint import checkpoint_format, complete_checkpoints, load_failure_reason, single_process_ok
from normtron.trainer.checkpoint_verify import dcp_chunk_problems, dcp_size_problems
from normtron.trainer.config import Config, config_from_dict
from normtron.trainer.convert.hf import mapping
from normtron.trainer.convert.output import say
from normtron.trainer.errors import UserError


def find_checkpoint(path: Path) -> Path:
    """`path` itself when it is a checkpoint, the newest complete one when it is a run directory."""
    if not path.is_dir():
        raise UserError(f"{path} {'is not a directory' if path.exists() else 'does not exist'}; pass a checkpoint "
                        f"directory (RUN/checkpoints/step_XXXXXXXX) or a run directory")
    if checkpoint_format(path) is not None:
        return path
    found = complete_checkpoints(path / "checkpoints")
    if not found:
        raise UserError(f"{path} is not a training checkpoint (no .metadata or DeepSpeed files) nor a run directory "
                        f"with complete "
                        f"checkpoints; pass RUN/checkpoints/step_XXXXXXXX")
    say(f"using the newest checkpoint of the run: {found[-1][1]}")
    return found[-1][1]


def checkpoint_config(path: Path) -> Config:
    """The resolved run config saved inside a checkpoint directory."""
    import yaml

    try:
        return config_from_dict(yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise UserError(f"{path} has no config.yaml, so its model cannot be described; it was not written by "
                        f"`normtron train` or `normtron convert from-hf`") from None
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError, TypeError, UserError) as err:
        raise UserError(f"{path / 'config.yaml'} is damaged ({' '.join(str(err).split())[:160]})") from None


class CheckpointTensors:
    """The model tensors of a DCP checkpoint, checked against the model its config describes, loaded by name."""

    def __init__(self, path: Path, cfg: ModelConfig):
        self.path, self.cfg = path, cfg
        try:
            metadata = FileSystemReader(str(path)).read_metadata()
        except (OSError, EOFError, ValueError, RuntimeError, AttributeError, pickle.UnpicklingError) as err:
            raise UserError(f"{path}/.metadata cannot be read ({load_failure_reason(err)}); the checkpoint is "
                            f"damaged") from None
        stored = {k.removeprefix("model."): md for k, md in metadata.state_dict_metadata.items()
                  if k.startswith("model.") and hasattr(md, "size")}
        self.expected = mapping.expected_tensors(cfg)
        missing = sorted(set(self.expected) - set(stored))
        if missing:
            raise UserError(f"{path} lacks model tensors {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
                            f" that its config.yaml describes; the checkpoint is incomplete or damaged")
        for name, shape in self.expected.items():
            if tuple(stored[name].size) != tuple(shape):
                raise UserError(f"{path}: tensor {name} has shape {tuple(stored[name].size)} but config.yaml "
                                f"implies {tuple(shape)}; the checkpoint and its config disagree")
        self.dtypes = {name: stored[name].properties.dtype for name in self.expected}
        self._check_file_sizes(metadata)

    def _check_file_sizes(self, metadata) -> None:
        """Every byte range the model tensors need exists: a truncated or missing .distcp file fails here."""
        self.pieces: dict[str, list] = {}  # tensor name -> where its chunks are stored
        for index, info in metadata.storage_data.items():
            if index.fqn.startswith("model."):
                self.pieces.setdefault(index.fqn.removeprefix("model."), []).append(info)
        problems = dcp_size_problems(self.path, [info for infos in self.pieces.values() for info in infos])
        if problems:
            raise UserError(f"checkpoint file {problems[0]}; the checkpoint is damaged")

    def verify(self, names: list[str]) -> None:
        """Check the stored CRC32 of every chunk of `names` (trainer/checkpoint_verify.py)."""
        for name in names:
            if problems := dcp_chunk_problems(self.path, self.pieces.get(name, [])):
                raise UserError(f"checkpoint file {problems[0]} in tensor {name}; the checkpoint is damaged")

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        self.verify(names)
        state = {f"model.{n}": torch.empty(self.expected[n], dtype=self.dtypes[n]) for n in names}
        try:
            with single_process_ok():
                dcp.load(state, storage_reader=FileSystemReader(str(self.path)), no_dist=True)
        except BaseException as err:  # CheckpointException is a BaseException
            if isinstance(err, KeyboardInterrupt):
                raise
            raise UserError(f"checkpoint {self.path} cannot be read ({load_failure_reason(err)}); it is "
                            f"damaged") from None
        return {n: state[f"model.{n}"] for n in names}
