"""`normtron convert from-hf`: a Hugging Face folder (safetensors, read tensor by tensor) to a DCP checkpoint with
the config.yaml and tokenizer that `checkpoint.init_from` starts a run from."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from normtron.trainer.checkpoint import single_process_ok
from normtron.trainer.config import Config, dump_config
from normtron.trainer.convert.hf import mapping
from normtron.trainer.convert.output import checked_tokenizer, output_dir, require_hf_libraries, say
from normtron.trainer.data.tokenizer import TOKENIZER_FILES
from normtron.trainer.errors import UserError


def from_hf(hf_dir: str | Path, out_checkpoint: str | Path) -> Path:
    require_hf_libraries()
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
    tok = checked_tokenizer(tokenizer, cfg.vocab_size, f"{hf / 'config.json'} (vocab_size)")
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
        say(f"read {file.name}: {len(keys)} tensors")
    missing = sorted(f"{h}" for h, ours in names.items() if f"model.{ours}" not in state)
    if missing:
        raise UserError(f"{hf} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; the weights are "
                        f"incomplete")
    run_cfg = Config(model=cfg)
    run_cfg.data.seq_len = min(run_cfg.data.seq_len, cfg.max_seq_len)
    run_cfg.checkpoint.init_from = str(out.resolve())
    with output_dir(out) as tmp:
        with single_process_ok():
            dcp.save(state, checkpoint_id=tmp, no_dist=True)
        tok.save(tmp / tok.file_name)  # a tokenizer.json comes with the tokenizer_config.json of its BOS/EOS rule
        (tmp / "config.yaml").write_text(dump_config(run_cfg))
    say(f"{out}: {sum(t.numel() for t in state.values()) / 1e6:.2f}M parameters from {hf}. Continue pretraining "
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
