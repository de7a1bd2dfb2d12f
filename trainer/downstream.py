"""Downstream evaluation with lm-evaluation-harness (`lm-eval`): `normtron eval CHECKPOINT_OR_HF_DIR --tasks ...`
exports a training checkpoint to a temporary Hugging Face folder and runs lm-eval's own `hf` model on it; the
in-loop evaluation (eval.tasks, trainer/downstream_live.py) runs the same tasks on the live, sharded model. Both
report through what is here: task checks, `eval/<task>/<metric>` rows, the results table and the JSON file with
every item's log-likelihoods."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from trainer.errors import UserError

STEP_NAME = re.compile(r"step_(\d+)$")


def require_lm_eval() -> None:
    try:
        import accelerate  # noqa: F401
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise UserError(f"downstream evaluation needs lm-eval and accelerate ({err.name} is missing): "
                        f"pip install 'normtron[eval]'") from None


def task_manager(include_path: str | None, tasks: list[str]):
    """lm-eval's task index with the task YAMLs of `include_path` (offline, local tasks); only those when they hold
    every task asked for (indexing lm-eval's thousands of built-in tasks takes seconds)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise UserError(f"--include-path (eval.tasks_include_path) {include_path} is not a directory; pass the "
                            f"folder holding the task YAMLs")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include_path)


def check_tasks(tasks: list[str], manager) -> list[str]:
    """The task names, each one known to lm-eval or defined under the include path."""
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("no tasks given; pass --tasks T1,T2 (lm-eval task names, or tasks in --include-path)")
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}; see `lm-eval ls tasks`, or pass "
                        f"--include-path (eval.tasks_include_path) with the folder of your task YAMLs")
    return tasks


def check_live_tasks(cfg) -> None:
    """eval.tasks in a training config: lm-eval present, the tasks known, a layout the live model supports."""
    check_tasks(cfg.eval.tasks, task_manager(cfg.eval.tasks_include_path, cfg.eval.tasks))


def metric_rows(results: dict) -> dict[str, float]:
    """`eval/<task>/<metric>` -> value for every numeric metric lm-eval reports (its stderr left out); a filter
    other than lm-eval's `none` is kept in the name: eval/<task>/<metric>_<filter>."""
    rows = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            rows[f"eval/{task}/{metric}{'' if filt == 'none' else '_' + filt}"] = float(value)
    return rows


def item_loglikelihoods(results: dict) -> dict[str, list[dict]]:
    """task -> [{doc_id, loglikelihoods}] from lm-eval's logged samples: one log-likelihood per request of the
    document (per choice for multiple choice; the whole text's for rolling log-likelihood)."""
    items = {}
    for task, samples in (results.get("samples") or {}).items():
        items[task] = [{"doc_id": s["doc_id"], "loglikelihoods": [_loglikelihood(r) for r in s["resps"]]}
                       for s in sorted(samples, key=lambda s: s["doc_id"])]
    return items


def _loglikelihood(response) -> float:
    value = response[0] if isinstance(response, (list, tuple)) else response  # [(ll, is_greedy)] or [ll]
    return float(value[0] if isinstance(value, (list, tuple)) else value)


def results_table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


def write_json(path: Path, record: dict) -> None:
    """Written whole under a temporary name, then renamed: an interrupted write leaves the old file (or none)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def record(results: dict, source: str, step: int | None, tasks: list[str], settings: dict) -> dict:
    return {"source": source, "step": step, "tasks": tasks, **settings, "metrics": metric_rows(results),
            "results": results["results"], "items": item_loglikelihoods(results)}


# --- normtron eval: a checkpoint or Hugging Face folder through lm-eval's `hf` model -------------------------------

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
    if (path / "config.json").is_file():
        checkpoint, results = path, run_hf(path, tasks, manager, parallelize, **settings)
    else:
        from trainer.convert.checkpoints import find_checkpoint
        from trainer.convert.to_hf import to_hf

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
    GPUs with an accelerate device map; under `accelerate launch` lm-eval splits the requests over the processes)."""
    import lm_eval

    import torch

    model_args = {"pretrained": str(hf_dir), "trust_remote_code": True, "dtype": "float32",
                  "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if parallelize:
        model_args["parallelize"] = True
    return lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, num_fewshot=num_fewshot,
                                   batch_size=batch_size, limit=limit, task_manager=manager, log_samples=True)
