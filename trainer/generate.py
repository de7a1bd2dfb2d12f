"""`normtron generate CHECKPOINT --prompt TEXT`: decode text from a training checkpoint with the training model and a
KV cache (models/generation.py), on one process, with the tokenizer saved in the checkpoint."""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from normtron.models.generation import generate
from normtron.models.transformer import Transformer
from normtron.trainer.checkpoint import checkpoint_format
from normtron.trainer.convert.checkpoints import CheckpointTensors, checkpoint_config, find_checkpoint
from normtron.trainer.convert.output import checked_tokenizer
from normtron.trainer.data.tokenizer import TOKENIZER_FILES
from normtron.trainer.errors import UserError


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or a positive number, not {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], not {top_p}")


def load_model(path: Path) -> tuple[Transformer, object]:
    """The checkpoint's model (fp32, eval mode) and its tokenizer."""
    cfg = checkpoint_config(path).model
    tokenizer = next((path / name for name in TOKENIZER_FILES if (path / name).is_file()), None)
    if tokenizer is None:
        raise UserError(f"{path} has no tokenizer.model or tokenizer.json; copy the one in the run's data.dir into it")
    tok = checked_tokenizer(tokenizer, cfg.vocab_size, f"{path}/config.yaml (model.vocab_size)")
    tensors = CheckpointTensors(path, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # the RoPE table and ties; every weight is then overwritten from the checkpoint
    state = {name: t.float() for name, t in tensors.load(list(tensors.expected)).items()}
    model.load_state_dict(state, strict=False)
    return model.eval(), tok


def encode_prompt(tok, prompt: str) -> list[int]:
    """The prompt's ids as documents were framed in training: BOS (if the tokenizer has one), the text, no EOS."""
    ids = tok.encode_documents([prompt])[0]
    return ids[:-1] if tok.eos_id is not None and ids and ids[-1] == tok.eos_id else ids


def decode(tok, ids: list[int]) -> str:
    return tok.sp.decode(ids) if tok.kind == "sentencepiece" else tok.tokenizer.decode(ids)


def generate_command(checkpoint: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0) -> str:
    """Print the prompt's continuation (stdout) and a rate line (stderr); returns the continuation."""
    check_sampling(max_new_tokens, temperature, top_p)
    if not prompt.strip():
        raise UserError("--prompt is empty; pass the text to continue, e.g. --prompt 'To be, or not'")
    path = find_checkpoint(Path(checkpoint))
    if checkpoint_format(path) == "deepspeed":  # gather its ZeRO partitions into a readable copy first
        from normtron.trainer.convert.consolidate import consolidate

        with tempfile.TemporaryDirectory(prefix="normtron-consolidated-") as tmp:
            return generate_command(str(consolidate(path, Path(tmp) / path.name)), prompt, max_new_tokens,
                                    temperature, top_p, seed)
    model, tok = load_model(path)
    ids = encode_prompt(tok, prompt)
    limit = model.cfg.max_seq_len
    if len(ids) + max_new_tokens > limit:
        raise UserError(f"the prompt is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that exceeds the "
                        f"model's max_seq_len of {limit}; shorten the prompt or lower --max-new-tokens")
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    new = generate(model, torch.tensor([ids]), max_new_tokens, temperature, top_p, generator, eos_id=tok.eos_id)[0]
    seconds = time.perf_counter() - start
    new = new.tolist()
    if tok.eos_id is not None and tok.eos_id in new:
        new = new[:new.index(tok.eos_id)]
    # Decoded with the prompt, then cut: a tokenizer drops the leading space of a text's first word.
    text = decode(tok, ids + new)[len(decode(tok, ids)):]
    print(prompt + text, flush=True)
    print(f"generated {len(new)} tokens in {seconds:.2f}s ({len(new) / max(seconds, 1e-9):.1f} tokens/s, "
          f"{'greedy' if temperature == 0 else f'temperature {temperature:g}, top-p {top_p:g}, seed {seed}'})",
          file=sys.stderr, flush=True)
    return text
