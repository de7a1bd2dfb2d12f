"""What the conversions share: the all-or-nothing output directory, progress lines, the Hugging Face library check
and the tokenizer-fits-the-model check."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from normtron.parallel.float8 import preload_torchao
from normtron.trainer.errors import UserError


def require_hf_libraries() -> None:
    """Fail with one line when transformers or safetensors is missing; import torchao (which transformers' models
    import when it is installed) quietly first."""
    missing = [name for name in ("safetensors", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"normtron convert needs the Hugging Face libraries ({missing[0]} is missing): "
                        f"pip install 'normtron[hf]'")
    preload_torchao()



def say(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def output_dir(out: Path) -> Iterator[Path]:
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


def checked_tokenizer(tokenizer: Path, vocab_size: int, where: str):
    """The tokenizer in `tokenizer` (sentencepiece or tokenizer.json), after checking the model can embed its ids."""
    from normtron.trainer.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > vocab_size:
        raise UserError(f"the tokenizer {tokenizer} has {tok.vocab_size} tokens but {where} has only {vocab_size} "
                        f"embedding rows; the model and tokenizer do not belong together")
    return tok
