"""launch/quickstart.sh as a user runs it (shortened with an override): install, corpus, tokenizer, 2-rank run."""

from __future__ import annotations

import os
import re
import subprocess

from helpers import REPO


def test_quickstart_trains_below_the_unigram_baseline(tmp_path):
    env = dict(os.environ, NORMTRON_DATA=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    result = subprocess.run(
        ["bash", "launch/quickstart.sh", "training.steps=60", "eval.every=60", "checkpoint.every=60",
         f"run.output_dir={tmp_path / 'runs'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    for stage in ("[1/4] install", "[2/4] corpus", "[3/4] tokenizer", "[4/4] pretrain"):
        assert stage in out
    assert "2 rank(s)" in out and re.search(r"step 60/60 \| loss [\d.]+ \| lr .* tok/s \| ETA", out)
    found = re.search(r"validation loss ([\d.]+) \(ppl [\d.]+\) \| unigram baseline ([\d.]+)", out)
    assert found, out[-3000:]
    val_loss, baseline = map(float, found.groups())
    assert val_loss < baseline - 0.5
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000060" / ".metadata").is_file()
    assert (tmp_path / "data" / "meta.json").is_file()
