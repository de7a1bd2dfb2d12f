"""logging.wandb: every metrics.jsonl row (events included) and the resolved config reach W&B, read back from the
run's local .wandb files with wandb's own reader (offline mode, no network); a resumed run continues the W&B run."""

from __future__ import annotations

import json
import math
import sys

import pytest
import yaml

from tests.helpers import TINY, read_metrics, run_cli
from trainer.config import load_config, validate
from trainer.errors import UserError

wandb = pytest.importorskip("wandb")  # in the dev extra, so CI has it
from wandb.proto import wandb_internal_pb2  # noqa: E402
from wandb.sdk.internal.datastore import DataStore  # noqa: E402


def read_wandb_file(path) -> tuple[str, list[dict], dict]:
    """(run id, history rows, config) of one .wandb file, through wandb's own record reader."""
    store = DataStore()
    store.open_for_scan(str(path))
    run_id, rows, config = None, [], {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return run_id, rows, config


def as_logged(row: dict) -> dict:
    """A metrics.jsonl row as W&B stores it: lists (per-layer diagnostics) as one key per layer."""
    flat = {}
    for key, value in row.items():
        flat.update({f"{key}/{i}": v for i, v in enumerate(value)} if isinstance(value, list) else {key: value})
    return flat


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b))


def test_offline_wandb_holds_every_row_and_the_config_and_resume_continues_the_run(micro_args, tmp_path):
    env = {"WANDB_DIR": str(tmp_path / "wandb"), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    (tmp_path / "wandb").mkdir()
    # A NaN step (stability.nonfinite=skip) writes an event row; diagnostics write per-layer lists.
    args = micro_args("tracked", "logging.wandb=offline", "logging.wandb_project=normtron-test",
                      "training.steps=6", "checkpoint.every=3", "eval.every=3", "diagnostics.every=3",
                      "stability.nonfinite=skip", "debug.nan_at_step=2")
    run_cli("train", TINY, *args, "training.steps=3", env=env)
    run_id = (tmp_path / "runs" / "tracked" / "wandb_run_id").read_text().strip()
    run_cli("train", TINY, *args, env=env)  # resumes from step 3

    files = sorted((tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2, files  # one per attempt, both of the same W&B run
    attempts = [read_wandb_file(path) for path in files]
    assert [a[0] for a in attempts] == [run_id, run_id]

    logged = [row for _, rows, _ in attempts for row in rows]
    jsonl = [json.loads(line) for line in (tmp_path / "runs" / "tracked" / "metrics.jsonl").read_text().splitlines()]
    assert any("event" in row for row in jsonl) and any(isinstance(v, list) for r in jsonl for v in r.values())
    assert len(logged) == len(jsonl)
    for expected, got in zip(jsonl, logged):
        expected = as_logged(expected)
        assert set(expected) <= set(got), (expected, got)  # W&B adds its own _step, _runtime, _timestamp
        assert all(same(value, got[key]) for key, value in expected.items()), (expected, got)
    train_rows, eval_rows = read_metrics(tmp_path / "runs" / "tracked")
    assert sorted({row["step"] for row in logged if "loss" in row}) == [r["step"] for r in train_rows]

    resolved = yaml.safe_load((tmp_path / "runs" / "tracked" / "config.yaml").read_text())
    first, last = attempts[0][2], attempts[1][2]
    assert {section: last[section] for section in resolved} == resolved
    assert first["training"]["steps"] == 3 and first["model"] == resolved["model"]


def test_wandb_not_installed_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib finds no wandb, as when it is not installed
    cfg = load_config(TINY, ["logging.wandb=offline"])
    with pytest.raises(UserError, match=r"logging.wandb=offline needs wandb: pip install 'normtron\[wandb\]'"):
        validate(cfg)
