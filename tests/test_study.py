"""`normtron study`: a tiny grid runs end to end and writes every report artifact, whose numbers are recomputed here
from the runs' own metrics.jsonl; finished runs are not redone; a study killed mid-run resumes that run."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import MICRO_MODEL, REPO, TINY, _env, read_metrics, run_cli, tree_digest

ARTIFACTS = ["report.md", "runs.csv", "cells.csv", "report.json", "loss_curves.png", "grad_norm_profile.png",
             "residual_variance.png", "max_attn_logit.png", "lr_sensitivity.png"]


def write_study(path: Path, data_dir: Path, grid: dict, **extra) -> Path:
    overrides = dict(item.split("=", 1) for item in MICRO_MODEL)
    overrides.update({"data.dir": str(data_dir), "training.steps": "8", "eval.every": "8", "checkpoint.every": "4",
                      "diagnostics.every": "4", "logging.every": "2"})
    overrides.update(extra.pop("overrides", {}))
    study = {"base": TINY, "output_dir": str(path.parent / "out"), "max_parallel": 2,
             "overrides": {k: yaml.safe_load(v) for k, v in overrides.items()}, "grid": grid, **extra}
    path.write_text(yaml.safe_dump(study))
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_study_runs_the_grid_writes_the_report_and_skips_finished_runs(shakespeare_data, tmp_path):
    study = write_study(tmp_path / "study.yaml", shakespeare_data,
                        {"model.placement": ["post"], "training.lr": [3e-3, 1e2], "run.seed": [0, 1]})
    result = run_cli("study", str(study))
    assert "[4/4 done]" in result.stdout and "ETA" in result.stdout
    out = tmp_path / "out"
    report = out / "report"
    for name in ARTIFACTS:
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name

    # Every run's numbers, recomputed from its own metrics.jsonl and status.
    runs = {r["name"]: r for r in read_csv(report / "runs.csv")}
    assert len(runs) == 4
    bound = math.log(512)
    for name, row in runs.items():
        run_dir = out / "runs" / name
        train, evals = read_metrics(run_dir)
        status_file = out / "status" / f"{name}.json"
        stopped = status_file.is_file() and json.loads(status_file.read_text())["status"] == "diverged"
        final = evals[-1]["val_loss"] if evals and not stopped else None
        diverged = stopped or not (math.isfinite(final) and final <= bound)
        assert row["diverged"] == str(diverged), name
        if diverged:
            first_bad = next((r["step"] for r in train if not math.isfinite(r["loss"]) or r["loss"] > bound), None)
            stop_step = json.loads(status_file.read_text())["step"] if stopped else None
            assert int(row["steps_to_divergence"]) == min(s for s in (first_bad, stop_step) if s is not None)
            assert row["final_val_loss"] == ""
        else:
            assert float(row["final_val_loss"]) == pytest.approx(final, rel=1e-12)
    assert all(r["diverged"] == "False" for r in runs.values() if "lr=0.003" in r["name"])
    assert all(r["diverged"] == "True" for r in runs.values() if "lr=100" in r["name"])

    cells = read_csv(report / "cells.csv")
    assert len(cells) == 2
    for cell in cells:
        group = [r for r in runs.values() if r["model.placement"] == cell["model.placement"]
                 and float(r["training.lr"]) == float(cell["training.lr"])]
        finals = [float(r["final_val_loss"]) for r in group if r["final_val_loss"]]
        assert int(cell["diverged"]) == sum(r["diverged"] == "True" for r in group)
        if finals:
            assert float(cell["val_loss_mean"]) == pytest.approx(statistics.fmean(finals), rel=1e-12)
            assert float(cell["val_loss_std"]) == pytest.approx(statistics.stdev(finals), rel=1e-9)
    report_md = (report / "report.md").read_text()
    assert "± " in report_md
    assert "| post | 100 | 2/2 | 2 of 2 seeds |" in report_md  # divergence counted per cell across seeds

    # Re-running redoes nothing: finished and diverged runs are skipped, their files untouched.
    before = tree_digest(out / "runs")
    again = run_cli("study", str(study))
    assert "4 already done, 0 to run" in again.stdout
    assert tree_digest(out / "runs") == before

    # --report-only rebuilds the report from the runs alone.
    for name in ARTIFACTS:
        (report / name).unlink()
    run_cli("study", str(study), "--report-only")
    assert all((report / name).is_file() for name in ARTIFACTS)
    assert {r["name"]: r for r in read_csv(report / "runs.csv")} == runs


def test_a_killed_study_resumes_its_interrupted_run(shakespeare_data, tmp_path):
    study = write_study(tmp_path / "study.yaml", shakespeare_data, {"model.placement": ["pre"]},
                        overrides={"training.steps": "300", "checkpoint.every": "20", "eval.every": "300",
                                   "logging.every": "20", "diagnostics.every": "0"})
    run_dir = tmp_path / "out" / "runs" / "placement=pre"
    process = subprocess.Popen([sys.executable, "-m", "normtron", "study", str(study)], cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "step_00000020" / ".metadata").is_file():
            assert process.poll() is None and time.time() < deadline, "the study ended before its first checkpoint"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / ".metadata").is_file())
    assert saved and saved[-1] != "step_00000300"

    result = run_cli("study", str(study))
    assert "0 already done, 1 to run" in result.stdout and "[1/1 done]" in result.stdout
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log and "step_00000300" in log
    train, _ = read_metrics(run_dir)
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)) and steps[-1] == 300


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_study_stops_its_cells_and_a_rerun_resumes_them_without_a_second_writer(stop, shakespeare_data,
                                                                                          tmp_path):
    """SIGTERM (or Ctrl-C) to `normtron study`: its running cell checkpoints and ends with it, the driver says which
    and exits 128 + the signal; re-running resumes the cell, whose steps then appear exactly once."""
    study = write_study(tmp_path / "study.yaml", shakespeare_data, {"model.placement": ["pre"]},
                        overrides={"training.steps": "400", "checkpoint.every": "100", "eval.every": "400",
                                   "logging.every": "10", "diagnostics.every": "0"})
    run_dir = tmp_path / "out" / "runs" / "placement=pre"
    driver = subprocess.Popen([sys.executable, "-m", "normtron", "study", str(study)], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").is_file() or '"step": 20,' not in (run_dir / "metrics.jsonl").read_text():
        assert driver.poll() is None and time.time() < deadline, driver.communicate()
        time.sleep(0.02)
    cell = next(int(p) for p in subprocess.run(["pgrep", "-f", "placement=pre"], capture_output=True,
                                               text=True).stdout.split() if int(p) != driver.pid)
    driver.send_signal(stop)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 128 + stop, out + err
    assert f"study stopped by {stop.name}: stopped its running cells (placement=pre)" in err, err
    assert not Path(f"/proc/{cell}").exists(), "the cell outlived its driver"
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / ".metadata").is_file())
    assert saved and saved[-1] != "step_00000400"  # the stop's own checkpoint

    result = run_cli("study", str(study))
    assert "[1/1 done]" in result.stdout
    train, _ = read_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(10, 401, 10))  # logging.every=10


@pytest.mark.parametrize("content,message", [
    ("grid: {model.placement: [pre]}\noutput_dir: x\n", "needs a 'base:' entry"),
    ("base: ../configs/tiny.yaml\noutput_dir: x\ngrid: {model.placment: [pre]}\n", "did you mean 'model.placement'"),
    ("base: ../configs/tiny.yaml\noutput_dir: x\ngrid: {model.placement: [pre, sideways]}\n", "sideways"),
    ("base: ../configs/tiny.yaml\noutput_dir: x\ngrid: {model.placement: pre}\n", "non-empty lists"),
    ("base: ../configs/tiny.yaml\noutput_dir: x\ngrid: {run.name: [a]}\n", "set by the study"),
    ("base: ../configs/tiny.yaml\noutput_dir: x\ngrid: {v: {a: {run.name: b}}}\n", "set by the study"),
    ("base: ../configs/tiny.yaml\noutput_dir: x\ngrid: {model.placement: {a: 3}}\n", "named variants"),
    ("base: ../configs/tiny.yaml\noutput_dir: x\ngrid: {model.placement: {dyt: {model.norm: dyt}}}\n", "dyt"),
    ("base: ../configs/tiny.yaml\noutput_dir: x\ngrid: {model.placement: [pre]}\nparallel: 2\n", "unknown key"),
    ("base: ../configs/tiny.yaml\noutput_dir: x\ngrid: {model.placement: [pre]}\nresources: {time: 24:00:00}\n",
     "resources.time must be a quoted string such as \"24:00:00\", not 86400"),
    ("base: ../configs/tiny.yaml\noutput_dir: x\ngrid: {model.placement: [pre]}\nlauncher: mpirun\n",
     "unknown launcher 'mpirun'; use one of local, torchrun, slurm"),
    ("base: ../configs/tiny.yaml\noutput_dir: x\ngrid: {model.placement: [pre]}\nresources: {per_axis: {model.dim: "
     "{64: {nodes: 2}}}}\n", "resources.per_axis.model.dim is not a grid axis"),
])
def test_bad_study_files_fail_with_one_line(tmp_path, capsys, content, message):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text(Path(TINY).read_text())
    study = tmp_path / "studies" / "s.yaml"
    study.parent.mkdir()
    study.write_text(content.replace("output_dir: x", f"output_dir: {tmp_path / 'x'}"))
    from normtron.trainer.cli import main

    assert main(["study", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normtron: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists()


def test_bad_study_file_message(tmp_path, capsys):
    from normtron.trainer.cli import main

    study = tmp_path / "s.yaml"
    study.write_text(f"base: {TINY}\noutput_dir: {tmp_path / 'x'}\ngrid: {{training.lr: [-1]}}\n")
    assert main(["study", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normtron: error: study cell lr=-1: training.lr=-1") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_missing_corpus_fails_before_any_run(tmp_path, capsys):
    from normtron.trainer.cli import main

    study = write_study(tmp_path / "study.yaml", tmp_path / "no-data", {"model.placement": ["pre", "post"]})
    assert main(["study", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"normtron: error: data.dir={tmp_path / 'no-data'} does not exist") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_failed_runs_make_the_study_exit_with_an_error(shakespeare_data, tmp_path):
    """A run that fails for another reason than divergence (here: its run directory is a file) is reported, the
    report is still written, and the study exits with code 2 and one line naming the logs."""
    study = write_study(tmp_path / "study.yaml", shakespeare_data, {"model.placement": ["pre"]})
    (tmp_path / "out" / "runs").mkdir(parents=True)
    (tmp_path / "out" / "runs" / "placement=pre").write_text("in the way")
    result = run_cli("study", str(study), check=False)
    assert result.returncode == 2 and "1 of 1 runs failed" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "out" / "report" / "report.md").is_file()
    assert json.loads((tmp_path / "out" / "status" / "placement=pre.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("name, cells, tokens", [("mixln-1b", 6, 5.0e9), ("periln-400m", 15, 30.0e9)])
def test_cost_estimate_of_the_scale_configs(name, cells, tokens):
    """--cost needs neither data nor a cluster. GPU-hours = tokens x FLOPs/token / (MFU x peak), with FLOPs/token
    recounted here from the model's own weight matrices: 6 per matmul weight (forward + backward) plus attention
    scores 12 x layers x dim x seq_len."""
    import torch

    from normtron.trainer.config import load_config
    from normtron.trainer.study.spec import load_study
    from normtron.trainer.train import build_model_on_meta

    path = REPO / "configs" / "study" / f"{name}.yaml"
    out = run_cli("study", str(path), "--cost").stdout
    study = load_study(path, check_data=False)
    assert len(study.cells) == cells and study.launcher == "slurm"
    cfg = load_config(study.base, study.cells[0].overrides)
    with torch.device("meta"):
        model = build_model_on_meta(cfg)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith("tok_embeddings"))
    m, seq = cfg.model, cfg.data.seq_len
    flops = 6 * matmul + 12 * m.n_layers * m.dim * seq
    trained = cfg.training.steps * cfg.training.batch_size * seq
    assert trained == pytest.approx(tokens, rel=2e-3)
    hours = trained * flops / (0.4 * 989e12) / 3600
    gpus = study.cells[0].resources.nodes * study.cells[0].resources.gpus_per_node
    assert f"{cells} cell(s) x {gpus} GPUs" in out and f"{flops / 1e9:.3g} GFLOP/token" in out
    assert f": {hours:,.0f} GPU-hours each ({hours / gpus:.1f} h wall)" in out
    assert f"total: {cells * hours:,.0f} GPU-hours for {cells} cells" in out


def test_named_variants_axis_sets_several_keys_per_value(tmp_path):
    """A grid axis given as {name: overrides}: each cell gets its variant's overrides, and the axis key (when it is
    a config key the variant does not set) takes the variant's name; other axes combine with it as usual."""
    from normtron.trainer.config import load_config
    from normtron.trainer.study.spec import load_study

    grid = {"model.placement": {"pre": {}, "subln": None, "ln-pre": {"model.placement": "pre", "model.norm":
                                                                     "layernorm", "model.norm_bias": False}},
            "size": {"small": {"model.dim": 32}, "big": {"model.dim": 64, "model.n_layers": 3}},
            "run.seed": [0, 1]}
    path = write_study(tmp_path / "s.yaml", tmp_path / "data", grid, reference={"size": "big"})
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "grid": grid}, sort_keys=False))  # in order
    study = load_study(path, check_data=False)
    assert study.grid == {"model.placement": ["pre", "subln", "ln-pre"], "size": ["small", "big"], "run.seed": [0, 1]}
    assert len(study.cells) == 12 and study.cells[0].name == "placement=pre_size=small_seed=0"
    got = {}
    for cell in study.cells:
        model = load_config(study.base, cell.overrides).model
        got[(cell.values["model.placement"], cell.values["size"])] = (model.placement, model.norm, model.norm_bias,
                                                                     model.dim, model.n_layers)
    assert got[("pre", "small")] == ("pre", "rmsnorm", True, 32, 2)
    assert got[("subln", "big")] == ("subln", "rmsnorm", True, 64, 3)
    assert got[("ln-pre", "big")] == ("pre", "layernorm", False, 64, 3)


def test_lr_transfer_report_finds_each_widths_best_lr(tmp_path):
    """The lr_transfer plot and table (a grid over model.dim and training.lr): one panel per parametrization, the
    best lr of each width is the one with the lowest mean final validation loss (diverged cells have none)."""
    import types

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from normtron.trainer.study.report import lr_transfer_lines, lr_transfer_plot

    grid = {"model.dim": [64, 128], "training.lr": [1e-3, 1e-2, 1e-1], "model.parametrization": ["standard", "mup"],
            "run.seed": [0, 1]}
    study = types.SimpleNamespace(grid=grid, axes=tuple(grid))
    loss = {("standard", 64): [3.0, 2.5, 2.9], ("standard", 128): [2.8, 2.9, None],
            ("mup", 64): [3.0, 2.5, 2.9], ("mup", 128): [2.9, 2.4, 2.8]}
    cells = [{"model.dim": d, "training.lr": lr, "model.parametrization": p, "val_loss_mean": loss[p, d][i]}
             for (p, d) in loss for i, lr in enumerate(grid["training.lr"])]
    lines = lr_transfer_lines(study, cells)
    assert "| parametrization=standard | 0.001 | 0.001 |" not in lines
    assert "| parametrization=standard | 0.01 | 0.001 |" in lines
    assert "| parametrization=mup | 0.01 | 0.01 |" in lines
    fig = lr_transfer_plot(plt, study, cells)
    assert [ax.get_title() for ax in fig.axes] == ["parametrization=standard", "parametrization=mup"]
    assert len(fig.axes[1].get_lines()) == 4  # a loss line and a best-lr star per width
    fig.savefig(tmp_path / "lr_transfer.png")
