"""`normtron convert to-hf`: a training checkpoint to a Hugging Face folder, one output shard in memory at a time."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from normtron.trainer.checkpoint import checkpoint_format
from normtron.trainer.convert.checkpoints import CheckpointTensors, checkpoint_config, find_checkpoint
from normtron.trainer.convert.consolidate import consolidate
from normtron.trainer.convert.hf import mapping
from normtron.trainer.convert.output import checked_tokenizer, output_dir, require_hf_libraries, say
from normtron.trainer.data.tokenizer import TOKENIZER_FILES
from normtron.trainer.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SHARD_SIZE = 5 * 2**30  # Hugging Face's default for save_pretrained


def to_hf(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32",
          max_shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    path, out, torch_dtype = find_checkpoint(Path(checkpoint)), Path(out_dir), DTYPES[dtype]
    require_hf_libraries()
    from safetensors.torch import save_file

    from normtron.trainer.convert.hf.codegen import write_remote_code
    from normtron.trainer.convert.hf.tokenizer import special_token_ids, write_hf_tokenizer

    if checkpoint_format(path) == "deepspeed":  # gather its ZeRO partitions first, then convert as usual
        with tempfile.TemporaryDirectory(prefix="normtron-consolidated-") as tmp:
            return to_hf(consolidate(path, Path(tmp) / path.name), out, dtype, max_shard_size)
    cfg = checkpoint_config(path).model
    tokenizer = next((path / name for name in TOKENIZER_FILES if (path / name).is_file()), None)
    if tokenizer is None:
        raise UserError(f"{path} has no tokenizer.model or tokenizer.json; copy the one in the run's data.dir into it")
    tok = checked_tokenizer(tokenizer, cfg.vocab_size, f"{path}/config.yaml (model.vocab_size)")
    bos_id, eos_id = special_token_ids(tok)
    tensors = CheckpointTensors(path, cfg)
    arch = mapping.architecture(cfg)
    shards = _plan_shards(list(tensors.expected), tensors.expected, torch_dtype, max_shard_size)
    with output_dir(out) as tmp:
        weight_map, total = {}, 0
        for i, names in enumerate(shards):
            file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            shard = {mapping.hf_name(n, arch): t.to(torch_dtype).contiguous() for n, t in tensors.load(names).items()}
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            size = sum(t.numel() * t.element_size() for t in shard.values())
            weight_map.update(dict.fromkeys(shard, file))
            total += size
            say(f"wrote {file}: {len(shard)} tensors, {size / 2**20:,.1f} MiB")
            del shard
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = mapping.hf_config(cfg, torch_dtype, bos_id, eos_id)
        if arch == mapping.NORMTRON:
            config["auto_map"] = write_remote_code(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": True}, indent=2) + "\n")
        write_hf_tokenizer(tok, tmp, cfg.max_seq_len)
    say(f"{out}: {arch} ({'no custom code' if arch != mapping.NORMTRON else 'load with trust_remote_code=True'}), "
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
