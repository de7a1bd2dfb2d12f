"""`normtron eval CHECKPOINT_OR_HF_DIR --tasks ...`: a training checkpoint exported to a temporary Hugging Face folder
(trainer/convert/to_hf.py) and evaluated by lm-eval's own `hf` model; reporting is trainer/downstream.py's."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

from normtron.trainer.downstream import STEP_NAME, check_tasks, metric_rows, record, results_table, task_manager, write_json
from normtron.trainer.errors import UserError


def eval_command(target: str, tasks: list[str], num_fewshot: int | None = None, batch_size: int = 1,
                 limit: int | None = None, include_path: str | None = None, parallelize: bool = False) -> dict:
    """Evaluate, print the table, write <target>.lm-eval.json beside the checkpoint (or folder) and, for a run's
    checkpoint, append the metrics to the run's metrics.jsonl at the checkpoint's step. Returns lm-eval's results
    (None on the non-zero ranks of an `accelerate launch`)."""
    path = Path(target)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a checkpoint (RUN/checkpoints/step_XXXXXXXX), a run directory "
                        f"or a Hugging Face model folder")
    if batch_size < 1 or (limit is not None and limit < 1) or (num_fewshot is not None and num_fewshot < 0):
        raise UserError("--batch-size and --limit must be at least 1, --num-fewshot at least 0")
    tasks = [t.strip() for t in tasks if t.strip()]
    manager = task_manager(include_path, tasks)
    tasks = check_tasks(tasks, manager)  # before any export: a typo costs nothing
    settings = {"num_fewshot": num_fewshot, "batch_size": batch_size, "limit": limit}
    import torch

    if parallelize and not torch.cuda.is_available():
        raise UserError("--parallelize spreads the model's layers over the visible GPUs and none is visible; leave "
                        "it out (one process), or launch several with `accelerate launch` for data parallelism")
    if (path / "config.json").is_file():
        checkpoint, results = path, run_hf(path, tasks, manager, parallelize, **settings)
    else:
        from normtron.trainer.convert.checkpoints import find_checkpoint
        from normtron.trainer.convert.to_hf import to_hf

        checkpoint = find_checkpoint(path)
        with tempfile.TemporaryDirectory(prefix="normtron-eval-") as tmp:
            results = run_hf(to_hf(checkpoint, Path(tmp) / "hf"), tasks, manager, parallelize, **settings)
    if results is None:  # not the main process of a data-parallel `accelerate launch`
        return None
    print(results_table(results), flush=True)
    step = int(m.group(1)) if (m := STEP_NAME.match(checkpoint.name)) else None
    out = checkpoint.with_name(f"{checkpoint.name}.lm-eval.json")
    write_json(out, record(results, str(checkpoint), step, tasks, settings))
    print(f"results: {out}", flush=True)
    metrics = checkpoint.parent.parent / "metrics.jsonl"
    if step is not None and checkpoint.parent.name == "checkpoints" and metrics.is_file():
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": step, **metric_rows(results)}) + "\n")
        print(f"metrics of step {step} appended to {metrics}", flush=True)
    return results


def run_hf(hf_dir: Path, tasks: list[str], manager, parallelize: bool, num_fewshot: int | None, batch_size: int,
           limit: int | None) -> dict | None:
    """lm-eval's own Hugging Face model on `hf_dir` (fp32; parallelize=True spreads the layers over the visible
    GPUs with an accelerate device map; under `accelerate launch` or torchrun lm-eval splits the requests over the
    processes and gathers the results on the first)."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    model_args = {"pretrained": str(hf_dir), "trust_remote_code": True, "dtype": "float32",
                  "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if parallelize:
        model_args["parallelize"] = True
    state = launched_processes()
    # One process at a time: loading copies the folder's modeling code into the shared transformers modules cache.
    with state.main_process_first() if state else nullcontext():
        lm = HFLM.create_from_arg_obj(model_args, {"batch_size": batch_size})  # as simple_evaluate(model="hf") does
    accelerator = getattr(lm, "accelerator", None)
    if accelerator is not None and lm.world_size == 1 and accelerator.num_processes > 1:
        # lm-eval goes data parallel only when it counts several GPUs; CPU processes (gloo) split the requests too.
        lm._rank, lm._world_size = accelerator.process_index, accelerator.num_processes
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, batch_size=batch_size,
                                      limit=limit, task_manager=manager, log_samples=True)
    if state:
        state.destroy_process_group()
    return results


def launched_processes():
    """accelerate's process state when a launcher started several processes (WORLD_SIZE > 1), else None; the
    Accelerator lm-eval's `hf` model creates joins it. Without GPUs accelerate only forms a process group (gloo)
    when told to use the CPU, which `accelerate launch --multi_gpu` (the launcher that starts a machine's processes)
    does not tell them."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # read by lm-eval's Accelerator()
    return PartialState(cpu=cpu, timeout=timedelta(weeks=52))  # lm-eval's own timeout: rank 0 waits for the slowest
