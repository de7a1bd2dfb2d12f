"""Downstream evaluation with lm-eval, offline: a multiple-choice task (which ending completes a Shakespeare line)
and a rolling log-likelihood task over the same lines, both local YAMLs over a local JSON-lines file. `normtron eval`
on a trained micro model gives the accuracies and every item's log-likelihoods of lm-eval's own `hf` model run
directly on the exported folder, and the in-loop evaluation (eval.tasks) of the same weights under 2-rank FSDP2 and
TP=2 and PP=2 gives them too."""

from __future__ import annotations

import json
import random
import re
import shutil
import socket
import subprocess
import sys

import pytest
from helpers import MICRO_MODEL, REPO, TINY, _env, run_cli, run_torchrun, tree_digest, write_lm_eval_tasks

TASKS = "shakespeare_mc,shakespeare_ppl"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def write_tasks(shakespeare_dir, out):
    """24 verse lines of Hamlet: the first half is the context, the true second half and three other lines' second
    halves the choices. The micro model trains on 5k tokens of the 5M, so the lines are effectively unseen."""
    text = (shakespeare_dir / "hamlet_gut.txt").read_text(errors="ignore")
    lines = [l.strip() for l in text.splitlines() if 40 <= len(l.strip()) <= 70 and l.strip()[0].isupper()][-200:]
    rng = random.Random(0)
    items = []
    for line in lines[:24]:
        words = line.split()
        context, ending = " ".join(words[:len(words) // 2]), " " + " ".join(words[len(words) // 2:])
        others = [" " + " ".join(o.split()[len(o.split()) // 2:]) for o in rng.sample(lines[24:], 3)]
        label = rng.randrange(4)
        items.append({"context": context, "choices": others[:label] + [ending] + others[label:], "label": label,
                      "text": line})
    return write_lm_eval_tasks(out, items)


@pytest.fixture(scope="module")
def setup(shakespeare_dir, shakespeare_data, tmp_path_factory):
    """A trained micro run, the task folder and `normtron eval` of the run's checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    env = {**OFFLINE, "HF_DATASETS_CACHE": str(root / "datasets")}
    tasks = write_tasks(shakespeare_dir, root / "tasks")
    common = [f"data.dir={shakespeare_data}", f"run.output_dir={root / 'runs'}", *MICRO_MODEL]
    run_cli("train", TINY, *common, "run.name=base", "training.steps=20", "checkpoint.every=20", "eval.every=20")
    checkpoint = root / "runs" / "base" / "checkpoints" / "step_00000020"
    result = run_cli("eval", str(checkpoint), "--tasks", TASKS, "--include-path", str(tasks), "--batch-size", "4",
                     env=env)
    return {"root": root, "env": env, "tasks": tasks, "common": common, "checkpoint": checkpoint,
            "stdout": result.stdout, "record": json.loads(checkpoint.with_name("step_00000020.lm-eval.json")
                                                          .read_text())}


def assert_same_items(got: dict, want: dict) -> None:
    assert set(got) == set(want) == set(TASKS.split(","))
    for task in want:
        assert [i["doc_id"] for i in got[task]] == [i["doc_id"] for i in want[task]] == list(range(24))
        for g, w in zip(got[task], want[task]):
            assert g["loglikelihoods"] == pytest.approx(w["loglikelihoods"], abs=1e-4, rel=0), (task, g, w)


def test_normtron_eval_equals_lm_eval_hf_model_on_the_exported_folder(setup, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from normtron.trainer.convert.to_hf import to_hf
    from normtron.trainer.downstream import item_loglikelihoods

    for key, value in setup["env"].items():
        monkeypatch.setenv(key, value)
    hf = to_hf(setup["checkpoint"], tmp_path / "hf")
    want = lm_eval.simple_evaluate(  # lm-eval's own Hugging Face model, its own batching (one request at a time)
        model="hf", model_args={"pretrained": str(hf), "trust_remote_code": True, "dtype": "float32",
                                "device": "cpu"},
        tasks=TASKS.split(","), batch_size=1,
        task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False))
    record = setup["record"]
    assert_same_items(record["items"], item_loglikelihoods(want))
    for task, metrics in want["results"].items():
        for name in ("acc", "acc_norm") if task == "shakespeare_mc" else ("word_perplexity", "bits_per_byte"):
            assert record["metrics"][f"eval/{task}/{name}"] == pytest.approx(metrics[f"{name},none"], rel=1e-5)
    # The multiple-choice accuracy from the log-likelihoods themselves: the true ending scores highest.
    labels = [json.loads(line)["label"] for line in (setup["tasks"] / "lines.jsonl").read_text().splitlines()]
    chosen = [max(range(4), key=lambda c: i["loglikelihoods"][c]) for i in record["items"]["shakespeare_mc"]]
    assert record["metrics"]["eval/shakespeare_mc/acc"] == pytest.approx(
        sum(c == label for c, label in zip(chosen, labels)) / 24)
    # The table, and the metrics at the checkpoint's step in the run's metrics.jsonl.
    assert "shakespeare_mc" in setup["stdout"] and "acc_norm" in setup["stdout"]
    rows = [json.loads(line) for line in (setup["checkpoint"].parents[1] / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if "eval/shakespeare_mc/acc" in r)
    assert row == {"step": 20, **record["metrics"]}


def test_data_parallel_eval_under_accelerate_launch_equals_one_process(setup, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m normtron eval` on a CPU machine (accelerate 1.15's only
    launcher that starts several local processes without MPI; its `--cpu` starts one): two gloo processes split the
    requests, and the first writes the one JSON file and the one metrics row, equal to the one-process `normtron
    eval` of the same checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(setup["checkpoint"], run / "checkpoints" / setup["checkpoint"].name)
    (run / "metrics.jsonl").write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "normtron", "eval", str(run), "--tasks", TASKS, "--include-path", str(setup["tasks"]),
           "--batch-size", "4"]
    result = subprocess.run(cmd, cwd=REPO, env=_env(setup["env"]), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    log = result.stdout + result.stderr
    # The first process scored half of the 96 multiple-choice requests (24 documents x 4 endings; lm-eval draws the
    # progress bars of the first only), the results below hold all 24 documents: the other half was the second's.
    done = re.findall(r"Running loglikelihood requests: 100%\|[^|]*\| (\d+)/\d+", log)
    assert "48" in done and "96" not in done, done
    assert result.stdout.count("results: ") == 1 and result.stdout.count("|shakespeare_mc ") == 1, result.stdout
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files == ["step_00000020", "step_00000020.lm-eval.json"], files
    got, want = json.loads((run / "checkpoints" / files[1]).read_text()), setup["record"]
    assert_same_items(got["items"], want["items"])
    for key, value in want["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-5), key
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 20, **got["metrics"]}]


# A pipeline's stages run sequences of data.seq_len tokens, the longest context it can score: the whole max_seq_len
# here, as `normtron eval` scores (the longest item is 35 tokens).
LAYOUTS = {"fsdp2": [], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2", "data.seq_len=64"]}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_loop_evaluation_under_fsdp2_tp_and_pp_equals_normtron_eval(setup, layout):
    """The checkpoint's weights as a new run's start (a learning rate of 1e-30 leaves them bit for bit), the tasks
    evaluated after its one step on 2 ranks, each holding half of the model."""
    name = f"live_{layout}"
    run_torchrun(2, "train", TINY, *setup["common"], f"run.name={name}", "training.steps=1", "training.lr=1e-30",
                 "training.precision=fp32", "parallel.backend=fsdp", *LAYOUTS[layout],
                 f"checkpoint.init_from={setup['checkpoint']}", f"eval.tasks={TASKS}",
                 f"eval.tasks_include_path={setup['tasks']}", "eval.tasks_batch_size=3", env=setup["env"])
    run = setup["root"] / "runs" / name
    live = json.loads((run / "lm-eval" / "step_00000001.json").read_text())
    want = setup["record"]
    assert_same_items(live["items"], want["items"])
    assert live["metrics"]["eval/shakespeare_mc/acc"] == want["metrics"]["eval/shakespeare_mc/acc"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if "eval/shakespeare_mc/acc" in r)
    assert row["step"] == 1
    for key, value in want["metrics"].items():
        assert row[key] == pytest.approx(value, rel=1e-5), key


def test_bad_input_is_one_line_and_damages_nothing(setup, tmp_path):
    run = setup["checkpoint"].parents[1]
    before = tree_digest(run)
    for args, words in [
        (["eval", str(tmp_path / "nope"), "--tasks", TASKS], "does not exist"),
        (["eval", str(setup["checkpoint"]), "--tasks", "shakespeare_mc,no_such_task", "--include-path",
          str(setup["tasks"])], "unknown lm-eval task(s) no_such_task"),
        (["eval", str(setup["checkpoint"]), "--tasks", TASKS, "--include-path", str(setup["tasks"]),
          "--parallelize"], "none is visible"),  # the test machines have no GPU
        (["train", "--check", TINY, *setup["common"], "eval.tasks=shakespeare_mc", "eval.tasks_include_path=/nope"],
         "eval.tasks_include_path) /nope is not a directory"),
    ]:
        result = run_cli(*args, check=False, env=setup["env"])
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().startswith("normtron: error:") and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert tree_digest(run) == before


def test_study_report_has_a_column_per_task_metric():
    """Each run's newest eval/<task>/<metric>; a cell's value is the mean over its seeds that did not diverge."""
    import types

    from normtron.trainer.study.report import aggregate, task_metrics

    rows = [{"step": 2, "eval/mc/acc": 0.25}, {"step": 2, "val_loss": 3.0}, {"step": 4, "eval/mc/acc": 0.5}]
    assert task_metrics(rows) == {"eval/mc/acc": 0.5}
    study = types.SimpleNamespace(grid={"training.lr": [0.1], "run.seed": [0, 1, 2]}, axes=("training.lr", "run.seed"),
                                  published={})
    runs = [{"training.lr": 0.1, "run.seed": seed, "status": "finished", "diverged": diverged, "rollbacks": 0,
             "final_val_loss": None if diverged else 3.0, "steps_to_divergence": 3 if diverged else None,
             "diagnostics": [], "eval/mc/acc": acc} for seed, (acc, diverged) in enumerate(
                 [(0.5, False), (0.75, False), (0.0, True)])]
    cell, = aggregate(study, runs)
    assert cell["eval/mc/acc"] == pytest.approx(0.625)
