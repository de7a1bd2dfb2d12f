"""`normtron convert`: training checkpoints to Hugging Face folders and back.

to-hf reads only the `model.*` tensors of a DCP checkpoint, by key, without a process group, so any layout that
saved through `get_state_dict` (one process, DDP, FSDP2) converts alike. Tensors stream one output shard at a time:
memory holds one shard, never the whole model twice. from-hf reads safetensors tensor by tensor into a DCP
checkpoint that `checkpoint.init_from` starts a run from. Outputs are written under a temporary name and renamed
into place at the end, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from models.config import ModelConfig
from trainer.checkpoint import checkpoint_format, complete_checkpoints, load_failure_reason, single_process_ok
from trainer.config import Config, config_from_dict, dump_config
from trainer.data.tokenizer import TOKENIZER_FILES
from trainer.errors import UserError
from trainer.hf import mapping

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SHARD_SIZE = 5 * 2**30  # Hugging Face's default for save_pretrained


def _require_hf_libraries() -> None:
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise UserError(f"normtron convert needs the Hugging Face libraries ({err.name} is missing): "
                        f"pip install 'normtron[hf]'") from None


def _say(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def _output_dir(out: Path) -> Iterator[Path]:
    """A fresh temporary directory next to `out`, renamed to `out` only if the block succeeds."""
    if out.exists():
        raise UserError(f"{out} already exists; choose a new output directory (nothing is overwritten)")
    existing = next(p for p in out.parents if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot create {out}: {existing} is not a writable directory")
    created = [p for p in out.parents if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():  # a failure leaves no empty parent directories either
            for parent in created:
                with contextlib.suppress(OSError):
                    parent.rmdir()


# --- Reading training checkpoints -----------------------------------------------------------------------------------

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
    _say(f"using the newest checkpoint of the run: {found[-1][1]}")
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


# --- to-hf ---------------------------------------------------------------------------------------------------------

def to_hf(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32",
          max_shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    _require_hf_libraries()
    from safetensors.torch import save_file

    from trainer.hf.codegen import write_remote_code
    from trainer.hf.tokenizer import special_token_ids, write_hf_tokenizer

    path, out, torch_dtype = find_checkpoint(Path(checkpoint)), Path(out_dir), DTYPES[dtype]
    if checkpoint_format(path) == "deepspeed":  # gather its ZeRO partitions first, then convert as usual
        with tempfile.TemporaryDirectory(prefix="normtron-consolidated-") as tmp:
            return to_hf(consolidate(path, Path(tmp) / path.name), out, dtype, max_shard_size)
    cfg = checkpoint_config(path).model
    tokenizer = next((path / name for name in TOKENIZER_FILES if (path / name).is_file()), None)
    if tokenizer is None:
        raise UserError(f"{path} has no tokenizer.model or tokenizer.json; copy the one in the run's data.dir into it")
    tok = _checked_tokenizer(tokenizer, cfg.vocab_size, f"{path}/config.yaml (model.vocab_size)")
    bos_id, eos_id = special_token_ids(tok)
    tensors = CheckpointTensors(path, cfg)
    arch = mapping.architecture(cfg)
    shards = _plan_shards(list(tensors.expected), tensors.expected, torch_dtype, max_shard_size)
    with _output_dir(out) as tmp:
        weight_map, total = {}, 0
        for i, names in enumerate(shards):
            file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            shard = {mapping.hf_name(n, arch): t.to(torch_dtype).contiguous() for n, t in tensors.load(names).items()}
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            size = sum(t.numel() * t.element_size() for t in shard.values())
            weight_map.update(dict.fromkeys(shard, file))
            total += size
            _say(f"wrote {file}: {len(shard)} tensors, {size / 2**20:,.1f} MiB")
            del shard
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = mapping.hf_config(cfg, torch_dtype, bos_id, eos_id)
        if arch == mapping.NORMTRON:
            config["auto_map"] = write_remote_code(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": arch == mapping.LLAMA}, indent=2) + "\n")
        write_hf_tokenizer(tok, tmp, cfg.max_seq_len)
    _say(f"{out}: {arch} ({'no custom code' if arch == mapping.LLAMA else 'load with trust_remote_code=True'}), "
         f"{total / 2**20:,.1f} MiB in {len(shards)} file(s)")
    return out


def _plan_shards(names: list[str], shapes: dict, dtype: torch.dtype, limit: int) -> list[list[str]]:
    """Consecutive groups of tensors, each group below `limit` bytes (a larger tensor gets a group of its own)."""
    shards, current, size = [], [], 0
    for name in names:
        nbytes = shapes[name].numel() * dtype.itemsize
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current] if current else shards


def _checked_tokenizer(tokenizer: Path, vocab_size: int, where: str):
    """The tokenizer in `tokenizer` (sentencepiece or tokenizer.json), after checking the model can embed its ids."""
    from trainer.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > vocab_size:
        raise UserError(f"the tokenizer {tokenizer} has {tok.vocab_size} tokens but {where} has only {vocab_size} "
                        f"embedding rows; the model and tokenizer do not belong together")
    return tok


# --- from-hf -------------------------------------------------------------------------------------------------------

def from_hf(hf_dir: str | Path, out_checkpoint: str | Path) -> Path:
    _require_hf_libraries()
    hf, out = Path(hf_dir), Path(out_checkpoint)
    if not (hf / "config.json").is_file():
        raise UserError(f"{hf} is not a Hugging Face model folder (no config.json); download it first, e.g. "
                        f"`huggingface-cli download MODEL --local-dir DIR`")
    try:
        hf_config = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{hf / 'config.json'} is not valid JSON ({err})") from None
    cfg = mapping.model_config_from_hf(hf_config, str(hf))
    # A Llama 2 style folder has both files: its sentencepiece model stays what normtron uses (as before).
    tokenizer = next((hf / name for name in TOKENIZER_FILES if (hf / name).is_file()), None)
    if tokenizer is None:
        raise UserError(f"{hf} has no sentencepiece tokenizer.model and no tokenizer.json; download the model's "
                        f"tokenizer files too")
    tok = _checked_tokenizer(tokenizer, cfg.vocab_size, f"{hf / 'config.json'} (vocab_size)")
    names = mapping.hf_names(cfg)  # Hugging Face name -> ours
    expected = mapping.expected_tensors(cfg)
    state: dict[str, torch.Tensor] = {}
    for file, keys in _safetensors_files(hf).items():
        with _open_safetensors(file) as reader:
            for key in keys:
                if key not in names:
                    if key == "lm_head.weight" and cfg.tie_embeddings or key.endswith("rotary_emb.inv_freq"):
                        continue
                    raise UserError(f"{file} holds {key}, which a {mapping.architecture(cfg)} with this config does "
                                    f"not have; the folder is not a supported model")
                ours = names[key]
                tensor = reader.get_tensor(key)
                if tensor.shape != expected[ours]:
                    raise UserError(f"{file}: {key} has shape {tuple(tensor.shape)}, config.json implies "
                                    f"{tuple(expected[ours])}; check vocab_size and the sizes in config.json")
                state[f"model.{ours}"] = tensor.float()  # training keeps fp32 master weights
        _say(f"read {file.name}: {len(keys)} tensors")
    missing = sorted(f"{h}" for h, ours in names.items() if f"model.{ours}" not in state)
    if missing:
        raise UserError(f"{hf} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; the weights are "
                        f"incomplete")
    run_cfg = Config(model=cfg)
    run_cfg.data.seq_len = min(run_cfg.data.seq_len, cfg.max_seq_len)
    run_cfg.checkpoint.init_from = str(out.resolve())
    with _output_dir(out) as tmp:
        with single_process_ok():
            dcp.save(state, checkpoint_id=tmp, no_dist=True)
        tok.save(tmp / tok.file_name)  # a tokenizer.json comes with the tokenizer_config.json of its BOS/EOS rule
        (tmp / "config.yaml").write_text(dump_config(run_cfg))
    _say(f"{out}: {sum(t.numel() for t in state.values()) / 1e6:.2f}M parameters from {hf}. Continue pretraining "
         f"with: normtron prepare-data --tokenizer {out}/{tok.file_name} ... && normtron train {out}/config.yaml "
         f"data.dir=DATA (checkpoint.init_from={out.resolve()})")
    return out


def _safetensors_files(hf: Path) -> dict[Path, list[str]]:
    """Each weight file and the tensor names to read from it (all of them, or those the index assigns it)."""
    index = hf / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise UserError(f"{index} is damaged (no weight_map)") from None
        files: dict[Path, list[str]] = {}
        for key, file in weight_map.items():
            files.setdefault(hf / file, []).append(key)
        return files
    single = hf / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{hf} has no model.safetensors (or index); only safetensors weights are supported")
    with _open_safetensors(single) as reader:
        return {single: list(reader.keys())}


@contextlib.contextmanager
def _open_safetensors(file: Path):
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise UserError(f"{file} is missing; the download is incomplete")
    try:
        with safe_open(str(file), framework="pt") as reader:
            yield reader
    except (SafetensorError, OSError) as err:
        raise UserError(f"{file} is damaged or truncated ({' '.join(str(err).split())[:160]})") from None



# --- consolidate (DeepSpeed) -----------------------------------------------------------------------------------------

def consolidate(src: Path, dst: Path) -> Path:
    """Write the full fp32 model of a DeepSpeed checkpoint as a DCP checkpoint with `model.*` keys (plus its
    config.yaml and tokenizer files): layout-free, readable by to-hf, `checkpoint.init_from` or any DCP reader."""
    src, dst = Path(src), Path(dst)
    written_by = checkpoint_format(src) if src.is_dir() else None
    if written_by is None:
        raise UserError(f"{src} is not a checkpoint directory (expected RUN/checkpoints/step_XXXXXXXX)")
    if written_by == "dcp":
        raise UserError(f"{src} is a DCP checkpoint, which is already layout-independent; use it as it is")
    from parallel.zero import consolidated_state_dict

    with _output_dir(dst) as tmp:
        try:
            state = consolidated_state_dict(src)
        except (Exception, SystemExit) as err:  # DeepSpeed reports damage with asserts, ValueErrors, pickling errors
            raise UserError(f"cannot read the DeepSpeed checkpoint {src} ({load_failure_reason(err)})") from None
        with single_process_ok():
            dcp.save({"model": state}, checkpoint_id=tmp, no_dist=True)
        for name in ("config.yaml", *TOKENIZER_FILES, "tokenizer_config.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    _say(f"{dst}: {len(state)} tensors, {sum(t.numel() for t in state.values()) / 1e6:.2f}M parameters (fp32)")
    return dst
