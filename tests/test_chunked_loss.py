"""Chunked linear cross-entropy (training.loss_chunk_size): loss and gradients against a float64 reference written
here, training runs equal to the unchunked ones step for step, and the peak memory of a training step at Llama-3's
vocabulary, measured per variant in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY, _env, read_metrics, run_cli
from normtron.trainer.loss import chunked_head_objective


def reference_objective(hidden, weight, targets, scale, z_coefficient):
    """(mean cross entropy over counted tokens, + z * mean logsumexp^2), in float64, written out."""
    logits = scale * hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().t()
    targets = targets.reshape(-1)
    lse = torch.logsumexp(logits, dim=-1)
    counted = targets != -100
    target_logit = logits[torch.arange(len(targets)), targets.clamp(min=0)]
    ce = ((lse - target_logit) * counted).sum() / counted.sum()
    return ce, ce + z_coefficient * lse.pow(2).mean()


def assert_close(got, want):
    """Within 1e-6 relative to the reference's largest magnitude."""
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-6 * want.abs().max().item(), (err, want.abs().max().item())


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_loss_and_gradients_match_float64_with_z_loss_and_accumulation(chunk_size):
    """Two micro-batches accumulated (each 1/2 of the step), z-loss on, ignored targets, a µP-style logit scale:
    loss, hidden-state gradients and the accumulated head-weight gradient equal the float64 reference's."""
    gen = torch.Generator().manual_seed(0)
    batch, seq, dim, vocab, z, scale = 2, 24, 16, 300, 1e-2, 0.5
    hidden = [torch.randn(batch, seq, dim, generator=gen, requires_grad=True) for _ in range(2)]
    weight = torch.randn(vocab, dim, generator=gen, requires_grad=True)
    targets = [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(2)]
    targets[0][0, :5] = -100

    losses = []
    for h, t in zip(hidden, targets):
        loss, objective = chunked_head_objective(t, 2, z, chunk_size)(h, weight, scale)
        objective.backward()
        losses.append(loss)

    ref_hidden = [h.detach().double().requires_grad_() for h in hidden]
    ref_weight = weight.detach().double().requires_grad_()
    ref_losses = []
    for h, t in zip(ref_hidden, targets):
        ce, objective = reference_objective(h, ref_weight, t, scale, z)
        (objective / 2).backward()
        ref_losses.append(ce.detach() / 2)
    for got, want in zip(losses, ref_losses):
        assert_close(got.detach(), want)
    for h, ref in zip(hidden, ref_hidden):
        assert_close(h.grad, ref.grad)
    assert_close(weight.grad, ref_weight.grad)


def test_no_grad_evaluation_matches():
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(3, 10, 8, generator=gen), torch.randn(50, 8, generator=gen)
    targets = torch.randint(0, 50, (3, 10), generator=gen)
    with torch.no_grad():
        loss, objective = chunked_head_objective(targets, 1, 0.0, 4)(hidden, weight, None)
    want, _ = reference_objective(hidden, weight, targets, 1.0, 0.0)
    assert_close(loss, want)
    assert_close(objective, want)


def test_training_equals_unchunked_step_for_step(micro_args):
    """The same run (gradient accumulation, z-loss) with the full logits and in chunks of 16 tokens: every step's
    loss and gradient norm agree within 1e-6."""
    common = ("training.steps=6", "training.micro_batch_size=4", "stability.z_loss=1e-3", "eval.every=3")
    args = {name: micro_args(name, *common, f"training.loss_chunk_size={chunk}")
            for name, chunk in (("full", 0), ("chunked", 16))}
    with ThreadPoolExecutor(2) as pool:  # the two runs side by side, one core each
        list(pool.map(lambda a: run_cli("train", TINY, *a), args.values()))
    runs = {name: read_metrics(Path(a[1].split("=", 1)[1]) / name) for name, a in args.items()}
    (full, full_eval), (chunked, chunked_eval) = runs["full"], runs["chunked"]
    assert [r["step"] for r in full] == [r["step"] for r in chunked] == list(range(1, 7))
    for a, b in zip(full, chunked):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6), (a, b)
    for a, b in zip(full_eval, chunked_eval):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)


# One training step of a micro model (dim 32) at Llama-3's vocabulary on 8 x SEQ tokens; prints the growth of the
# process's peak resident memory over the step (ru_maxrss, kB on Linux: the allocator's own figure for the process).
MEMORY_STEP = """
import json, resource, sys, torch
from models.config import ModelConfig
from models.transformer import Transformer
from trainer.loss import chunked_head_objective, micro_batch_objective
torch.manual_seed(0)
chunk = int(sys.argv[1])
cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden_dim=64, vocab_size=128256,
                  max_seq_len=int(sys.argv[2]))
model = Transformer(cfg)
tokens = torch.randint(0, cfg.vocab_size, (8, int(sys.argv[2]) + 1))
x, y = tokens[:, :-1], tokens[:, 1:]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if chunk:
    loss, objective = model(x, head=chunked_head_objective(y, 1, 1e-4, chunk))
else:
    loss, objective = micro_batch_objective(model(x), y, 1, 1e-4)
objective.backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_growth_bytes": (after - before) * 1024, "loss": loss.item()}))
"""


# 8 x 128 tokens, not the 8 x 1,024: unchunked, that step holds about four full-size fp32 buffers (logits,
# log-softmax, and the gradients of both), 17 GB, more than the 2-core test machine's memory (23 GB, shared).
SEQ, CHUNK = 128, 128


def test_peak_memory_drops_by_the_full_logits_and_their_gradient():
    def step(chunk: int) -> dict:
        out = subprocess.run([sys.executable, "-c", MEMORY_STEP, str(chunk), str(SEQ)], cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(2) as pool:  # one process per variant (its own peak), side by side
        measured = dict(zip((0, CHUNK), pool.map(step, (0, CHUNK))))
    logits_and_grad = 2 * 8 * SEQ * 128256 * 4  # fp32 logits and their gradient: 0.53 GB each
    drop = measured[0]["peak_growth_bytes"] - measured[CHUNK]["peak_growth_bytes"]
    assert drop >= logits_and_grad, (measured, logits_and_grad)
    assert measured[CHUNK]["loss"] == pytest.approx(measured[0]["loss"], rel=1e-6)
