"""logging.wandb: every metrics.jsonl row (events included) and the resolved config reach W&B, read back from the
run's local .wandb files with wandb's own reader (offline mode, no network); a resumed run continues the W&B run."""

from __future__ import annotations

import json
import math
import sys
import time

import pytest
import yaml

from tests.helpers import TINY, read_metrics, run_cli
from normtron.trainer.config import LoggingConfig, load_config, validate
from normtron.trainer.errors import UserError
from normtron.trainer.metrics import MetricsLogger

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


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch) -> dict:
    """W&B offline, its files under tmp_path/wandb (no network, nothing in the user's directories)."""
    env = {"WANDB_DIR": str(tmp_path / "wandb"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_CONSOLE": "off"}
    (tmp_path / "wandb").mkdir()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def wandb_files(tmp_path) -> list:
    return sorted((tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb"))


def test_offline_wandb_holds_every_metrics_row_and_the_config(micro_args, tmp_path, offline_wandb):
    # A NaN step (stability.nonfinite=skip) writes an event row; diagnostics write per-layer lists.
    run_cli("train", TINY, *micro_args("tracked", "logging.wandb=offline", "logging.wandb_project=normtron-test",
                                       "training.steps=4", "checkpoint.every=4", "eval.every=2",
                                       "diagnostics.every=2", "stability.nonfinite=skip", "debug.nan_at_step=2"),
            env=offline_wandb)
    run_dir = tmp_path / "runs" / "tracked"
    [path] = wandb_files(tmp_path)
    run_id, logged, config = read_wandb_file(path)
    assert run_id == (run_dir / "wandb_run_id").read_text().strip()

    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("event" in row for row in jsonl) and any(isinstance(v, list) for r in jsonl for v in r.values())
    assert len(logged) == len(jsonl)
    for expected, got in zip(jsonl, logged):
        expected = as_logged(expected)
        assert set(expected) <= set(got), (expected, got)  # W&B adds its own _step, _runtime, _timestamp
        assert all(same(value, got[key]) for key, value in expected.items()), (expected, got)
    train_rows, _ = read_metrics(run_dir)
    assert [row["step"] for row in logged if "loss" in row] == [r["step"] for r in train_rows]

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {section: config[section] for section in resolved} == resolved


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = LoggingConfig(wandb="offline", wandb_project="normtron-test")
    first = MetricsLogger(run_dir, 4, 0, True, False, wandb=settings, config={"training": {"steps": 4}})
    for step in (1, 2, 3):  # step 3 is past the checkpoint the resumed attempt starts from
        first.log({"step": step, "loss": 10.0 - step}, quiet=True)
    first.close()
    second = MetricsLogger(run_dir, 4, 2, True, False, wandb=settings, config={"training": {"steps": 4}})
    for step in (3, 4):
        second.log({"step": step, "loss": 20.0 - step}, quiet=True)
    second.close()

    files = wandb_files(tmp_path)
    # wandb-core (W&B's own service process) may still be writing the second attempt's file when finish() returns
    deadline = time.monotonic() + 20
    while len(attempts := [read_wandb_file(path) for path in files]) == 2 and not attempts[1][1] \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    # W&B names each attempt's file run-<run id>.wandb (the run record inside is not always flushed by an offline
    # resume, so the name is what is checked)
    assert [path.name for path in files] == [f"run-{run_id}.wandb"] * 2
    assert attempts[0][0] == run_id and attempts[1][0] in (run_id, None)
    assert [(r["step"], r["loss"]) for r in attempts[0][1]] == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert [(r["step"], r["loss"]) for r in attempts[1][1]] == [(3, 17.0), (4, 16.0)]


def test_wandb_not_installed_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib finds no wandb, as when it is not installed
    cfg = load_config(TINY, ["logging.wandb=offline"])
    with pytest.raises(UserError, match=r"logging.wandb=offline needs wandb: pip install 'normtron\[wandb\]'"):
        validate(cfg)


def test_a_study_groups_its_cells_in_wandb(tmp_path):
    from normtron.trainer.study.spec import load_study

    def cell_groups(name: str, overrides: dict) -> list:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"base": TINY, "output_dir": str(tmp_path / name), "overrides": overrides,
                                        "grid": {"model.placement": ["pre", "post"]}}))
        study = load_study(path, check_data=False)
        return [load_config(study.base, cell.overrides).logging.wandb_group for cell in study.cells]

    assert cell_groups("placements", {"logging.wandb": "offline"}) == ["placements", "placements"]
    assert cell_groups("own", {"logging.wandb": "offline", "logging.wandb_group": "mine"}) == ["mine", "mine"]
    assert cell_groups("off", {}) == [None, None]  # W&B off: the cells' commands are as before
