"""`normtron convert consolidate`: the full fp32 model of a DeepSpeed (ZeRO-partitioned) checkpoint as a
layout-free DCP checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed.checkpoint as dcp

from normtron.trainer.checkpoint import checkpoint_format, load_failure_reason, single_process_ok
from normtron.trainer.convert.output import output_dir, say
from normtron.trainer.data.tokenizer import TOKENIZER_FILES
from normtron.trainer.errors import UserError


def consolidate(src: Path, dst: Path) -> Path:
    """Write the full fp32 model of a DeepSpeed checkpoint as a DCP checkpoint with `model.*` keys (plus its
    config.yaml and tokenizer files): layout-free, readable by to-hf, `checkpoint.init_from` or any DCP reader."""
    src, dst = Path(src), Path(dst)
    written_by = checkpoint_format(src) if src.is_dir() else None
    if written_by is None:
        raise UserError(f"{src} is not a checkpoint directory (expected RUN/checkpoints/step_XXXXXXXX)")
    if written_by == "dcp":
        raise UserError(f"{src} is a DCP checkpoint, which is already layout-independent; use it as it is")
    from normtron.parallel.zero import consolidated_state_dict

    with output_dir(dst) as tmp:
        try:
            state = consolidated_state_dict(src)
        except (Exception, SystemExit) as err:  # DeepSpeed reports damage with asserts, ValueErrors, pickling errors
            raise UserError(f"cannot read the DeepSpeed checkpoint {src} ({load_failure_reason(err)})") from None
        with single_process_ok():
            dcp.save({"model": state}, checkpoint_id=tmp, no_dist=True)
        for name in ("config.yaml", *TOKENIZER_FILES, "tokenizer_config.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    say(f"{dst}: {len(state)} tensors, {sum(t.numel() for t in state.values()) / 1e6:.2f}M parameters (fp32)")
    return dst
