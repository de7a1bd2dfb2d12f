"""Downstream evaluation with lm-evaluation-harness (`lm-eval`): `normtron eval CHECKPOINT_OR_HF_DIR --tasks ...`
(trainer/downstream_command.py) exports a training checkpoint to a temporary Hugging Face folder and runs lm-eval's
own `hf` model on it; the in-loop evaluation (eval.tasks, trainer/downstream_live.py) runs the same tasks on the
live, sharded model. Both report through what is here: task checks, `eval/<task>/<metric>` rows, the results table and the JSON file with
every item's log-likelihoods."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from normtron.parallel.float8 import preload_torchao
from normtron.trainer.errors import UserError

STEP_NAME = re.compile(r"step_(\d+)$")


def require_lm_eval() -> None:
    preload_torchao()  # lm-eval imports transformers' models, which import torchao when it is installed
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
