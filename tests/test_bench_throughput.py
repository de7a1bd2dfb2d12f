"""bench/throughput.py on a micro model: normtron's step (full and chunked loss) and Hugging Face's
LlamaForCausalLM holding the same weights, whose logits the script checks against normtron's before timing."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO, _env

MICRO = ["--dim", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "128", "--vocab", "512",
         "--seq", "32", "--batch", "2", "--steps", "2", "--warmup", "1"]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), *MICRO, *args], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)


def test_times_normtron_and_hugging_face_on_the_same_weights():
    result = bench("--loss-chunk", "0", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    agreement = [float(v) for v in re.findall(r"logits agree to ([0-9.e+-]+)", result.stdout)]
    assert len(agreement) == 2 and max(agreement) <= 1e-4, result.stdout
    rows = re.findall(r"^\| (normtron, loss_chunk_size=\d+|HF LlamaForCausalLM) \| ([0-9.]+) \| ([0-9,]+) \|",
                      result.stdout, re.M)
    assert [name for name, *_ in rows] == ["normtron, loss_chunk_size=0", "normtron, loss_chunk_size=16",
                                           "HF LlamaForCausalLM"], result.stdout
    for _, seconds, tokens_per_s in rows:  # 2 x 32 tokens per step; seconds are printed to 4 decimals
        assert float(seconds) > 0
        assert int(tokens_per_s.replace(",", "")) == pytest.approx(64 / float(seconds), rel=0.05)
    assert "no GPU: no plan column" in result.stdout


def test_refuses_a_model_without_a_llama_counterpart():
    result = bench("model.qk_norm=true")
    assert result.returncode != 0
    assert "the model is NormtronForCausalLM, not LlamaForCausalLM" in result.stderr, result.stderr[-2000:]
