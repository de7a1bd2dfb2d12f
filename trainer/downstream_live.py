"""In-loop downstream evaluation (eval.tasks): lm-eval tasks on the live model, every rank taking part.

Under FSDP2 and tensor parallelism the model is never whole on one rank, so every rank runs the same evaluation:
lm-eval builds the same requests in the same order on each (its seeds are fixed, and each rank plays lm-eval's
"rank 0 of 1"), batches them alike, and every forward is one collective forward of the sharded model, whose logits
each rank then holds whole. The requests are lm-eval's `hf` model's own (`HFLM`, subclassed here with only the
forward replaced), with the Hugging Face tokenizer that `normtron convert to-hf` writes: tokenization, batching and
scoring are exactly those of `normtron eval` on an exported checkpoint. Only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from normtron.trainer.downstream import record, task_manager, write_json
from normtron.trainer.errors import UserError


def hf_tokenizer(tokenizer_file: Path, max_seq_len: int):
    """The tokenizer as the exported Hugging Face folder holds it (trainer/convert/hf/tokenizer.py)."""
    from transformers import AutoTokenizer

    from normtron.trainer.convert.hf.tokenizer import write_hf_tokenizer
    from normtron.trainer.data.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="normtron-tokenizer-") as tmp:
        write_hf_tokenizer(load_tokenizer(tokenizer_file), Path(tmp), max_seq_len)
        return AutoTokenizer.from_pretrained(tmp)


def sharded_logits(engine, tokens: torch.Tensor, device: torch.device, multiple: int) -> torch.Tensor:
    """Whole fp32 logits of `tokens` from the (sharded) training model; every rank calls this with the same tokens.
    The sequence is padded on the right to a multiple of `multiple` (sequence parallelism splits it over the tensor-
    parallel ranks); a causal model's logits before the padding do not depend on it. A pipeline runs the batch in
    pieces of training's batch shape (PipelineEngine.forward_logits)."""
    if hasattr(engine, "forward_logits"):
        rows = engine.micro_batch_size * engine.accum_steps
        with torch.compiler.set_stance("force_eager"):
            return torch.cat([engine.forward_logits(part) for part in tokens.split(rows)])
    model, length = engine.model, tokens.shape[1]
    pad = -length % multiple
    if pad:
        tokens = torch.cat([tokens, tokens[:, -1:].expand(-1, pad)], dim=1)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        logits = model(tokens.to(device))
    if isinstance(logits, DTensor):  # vocabulary-sharded under loss parallel
        logits = logits.full_tensor()
    return logits[:, :length].float()


def live_lm(engine, tokenizer, max_length: int, batch_size: int, device: torch.device, multiple: int):
    """An lm-eval `HFLM` whose forward is the engine's sharded model."""
    from lm_eval.models.huggingface import HFLM
    from transformers import PretrainedConfig

    class LiveModel(torch.nn.Module):
        """What HFLM reads of a model besides its forward: config, device, tie_weights."""

        def __init__(self):
            super().__init__()
            self.config = PretrainedConfig(max_position_embeddings=max_length)
            self.device = device

        def tie_weights(self):
            pass

    class LiveHFLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            return sharded_logits(engine, inps, device, multiple)

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise UserError("eval.tasks runs log-likelihood tasks (multiple choice, perplexity) on the live model; "
                            "evaluate generation tasks on a checkpoint with `normtron eval`")

        def get_model_info(self) -> dict:
            return {}

    return LiveHFLM(pretrained=LiveModel(), tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                    max_length=max_length)


@contextlib.contextmanager
def rng_kept():
    """lm-eval seeds python, numpy and torch; training's random state continues as if it had not run."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py)
    np.random.set_state(np_state)


class LiveTasks:
    """eval.tasks on the live model: `due(step)` and `run(step)`, which returns the `eval/<task>/<metric>` row
    (on every rank) and writes RUN/lm-eval/step_XXXXXXXX.json with each item's log-likelihoods (rank 0)."""

    def __init__(self, cfg, engine, tokenizer_file: Path, run_dir: Path, device: torch.device, is_main: bool):
        self.cfg, self.engine, self.run_dir, self.is_main = cfg, engine, run_dir, is_main
        if not is_main:  # lm-eval's notices once, from rank 0
            logging.getLogger("lm_eval").setLevel(logging.ERROR)
        e = cfg.eval
        self.every = e.tasks_every or e.every
        self.tasks = list(e.tasks)
        self.manager = task_manager(e.tasks_include_path, self.tasks)
        self.settings = {"num_fewshot": e.tasks_num_fewshot, "batch_size": e.tasks_batch_size, "limit": e.tasks_limit}
        multiple = cfg.parallel.tp if cfg.parallel.tp > 1 else 1
        # A pipeline's stages run sequences of data.seq_len tokens: the longest context lm-eval may send there.
        max_length = cfg.data.seq_len if cfg.parallel.pp > 1 else cfg.model.max_seq_len
        self.lm = live_lm(engine, hf_tokenizer(tokenizer_file, cfg.model.max_seq_len), max_length,
                          e.tasks_batch_size, device, multiple)

    def due(self, step: int, final: bool) -> bool:
        return step % self.every == 0 or final

    def run(self, step: int) -> dict[str, float]:
        import lm_eval

        from normtron.trainer.downstream import metric_rows

        self.engine.model.eval()
        try:
            with rng_kept():
                results = lm_eval.simple_evaluate(
                    model=self.lm, tasks=self.tasks, task_manager=self.manager, log_samples=True,
                    bootstrap_iters=0, num_fewshot=self.settings["num_fewshot"], limit=self.settings["limit"])
        finally:
            self.engine.model.train()
        if results is None:  # lm-eval reports on the first process of each node only
            return {"step": step}
        if self.is_main:
            out = self.run_dir / "lm-eval"
            out.mkdir(exist_ok=True)
            write_json(out / f"step_{step:08d}.json", record(results, str(self.run_dir), step, self.tasks,
                                                             self.settings))
        return {"step": step, **metric_rows(results)}
