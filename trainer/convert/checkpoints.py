"""Reading training checkpoints without a process group: which checkpoint a path means, the run config saved in
it, and its `model.*` tensors by name, checked against that config (shapes, file sizes, chunk checksums)."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from models.config import ModelConfig
from trainer.checkpoint import checkpoint_format, complete_checkpoints, load_failure_reason, single_process_ok
from trainer.config import Config, config_from_dict
from trainer.convert.hf import mapping
from trainer.convert.output import say
from trainer.errors import UserError


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
        needed: dict[str, int] = {}
        self.pieces: dict[str, list] = {}  # tensor name -> where its chunks are stored
        for index, info in metadata.storage_data.items():
            if index.fqn.startswith("model."):
                needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
                self.pieces.setdefault(index.fqn.removeprefix("model."), []).append(info)
        for name, size in needed.items():
            file = self.path / name
            actual = file.stat().st_size if file.is_file() else -1
            if actual < size:
                problem = "is missing" if actual < 0 else f"is truncated ({actual:,} of at least {size:,} bytes)"
                raise UserError(f"checkpoint file {file} {problem}; the checkpoint is damaged")

    def verify(self, names: list[str]) -> None:
        """Check the stored CRC32 of every chunk of `names`: DCP writes each chunk with torch.save, a zip archive
        whose records carry checksums that torch.load itself never checks, so flipped bits would load silently."""
        for name in names:
            for info in self.pieces.get(name, []):
                with open(self.path / info.relative_path, "rb") as f:
                    f.seek(info.offset)
                    chunk = io.BytesIO(f.read(info.length))
                if not zipfile.is_zipfile(chunk):
                    continue  # another serialization format: no checksums to check
                try:
                    bad = zipfile.ZipFile(chunk).testzip()
                except (zipfile.BadZipFile, OSError, EOFError) as err:
                    bad = str(err)
                if bad is not None:
                    raise UserError(f"checkpoint file {self.path / info.relative_path} is corrupted: tensor {name} "
                                    f"fails its checksum ({bad}); the checkpoint is damaged")

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
