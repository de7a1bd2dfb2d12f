"""Diagnostics and stability guards against independent computations: per-layer norms of `param.grad` groups, the
residual stream and attention logits recomputed block by block here, float64 formulas, a single-process run as the
reference for FSDP2, and what a run with non-finite steps leaves on disk."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, diagnostic_rows, run_cli, run_torchrun

from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer
from normtron.models.transformer import apply_rope
from normtron.trainer.diagnostics import Diagnostics
from normtron.trainer.loss import z_loss
from normtron.trainer.stability import SpikeDetector


def tiny_model(**kw) -> Transformer:
    cfg = ModelConfig(**{"dim": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64,
                         "ffn_hidden_dim": 48, "max_seq_len": 16, **kw})
    model = Transformer(cfg)
    model.init_weights(seed=1)
    with torch.no_grad():  # a non-trivial norm weight makes the QK-norm and output norms matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return model


def reference_attention_logits(block, h, rope, mup_base_dim=None):
    """Scores q.k/sqrt(d) of every causal pair (µP: q.k * sqrt(base head dim)/d, Tensor Programs V's 1/d attention),
    computed per head here; also returns the attention output they give, so the test can check that these are the
    logits the model's SDPA really used."""
    att, norms = block.attention, block.attention_norms
    x = norms.input(h) * norms.input_scale
    b, s, _ = x.shape
    d = att.head_dim
    scale = 1 / math.sqrt(d) if mup_base_dim is None else math.sqrt(mup_base_dim / (x.shape[-1] // d)) / d
    q = apply_rope(att.q_norm(att.q_proj(x).view(b, s, -1, d)), rope)
    k = apply_rope(att.k_norm(att.k_proj(x).view(b, s, -1, d)), rope)
    v = att.v_proj(x).view(b, s, -1, d)
    group = q.shape[2] // k.shape[2]
    heads = []
    scores = torch.full((b, q.shape[2], s, s), float("-inf"))
    for head in range(q.shape[2]):
        kv = head // group
        for i in range(s):
            for j in range(i + 1):
                scores[:, head, i, j] = (q[:, i, head] * k[:, j, kv]).sum(-1) * scale
        heads.append(torch.softmax(scores[:, head], dim=-1) @ v[:, :, kv])
    out = att.o_proj(torch.stack(heads, dim=2).reshape(b, s, -1))
    return scores, out, x


@pytest.mark.parametrize("placement,qk_norm,mup_base_dim", [("pre", False, None), ("post", True, None),
                                                            ("lns", True, None), ("pre", False, 16)])
def test_diagnostics_match_independent_computation(placement, qk_norm, mup_base_dim):
    torch.manual_seed(0)
    mup = {"parametrization": "mup", "mup_base_dim": mup_base_dim} if mup_base_dim else {}
    model = tiny_model(placement=placement, qk_norm=qk_norm, **mup)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    diagnostics = Diagnostics(model, every=5, total_steps=12, device=torch.device("cpu"), gradients=True)
    assert [s for s in range(1, 13) if diagnostics.due(s)] == [1, 5, 10, 12]
    tokens = torch.randint(0, 64, (3, 10))
    with diagnostics.probe():
        logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    diagnostics.before_step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    row = diagnostics.after_step()

    n_layers = model.cfg.n_layers
    grads = {n: p.grad for n, p in model.named_parameters()}

    def norm(prefix, tensors):
        return math.sqrt(sum(float(t.double().pow(2).sum()) for n, t in tensors.items() if n.startswith(prefix)))

    for i in range(n_layers):
        assert row["layer_grad_norm"][i] == pytest.approx(norm(f"layers.{i}.", grads), rel=1e-5)
        assert row["attn_grad_norm"][i] == pytest.approx(norm(f"layers.{i}.attention.", grads), rel=1e-5)
        assert row["mlp_grad_norm"][i] == pytest.approx(norm(f"layers.{i}.feed_forward.", grads), rel=1e-5)
        delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        want = norm(f"layers.{i}.", delta) / norm(f"layers.{i}.", before)
        assert row["update_ratio"][i] == pytest.approx(want, rel=1e-4)

    # The residual stream and the attention logits, block by block, with the weights the forward used.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(before[name])
        h = model.tok_embeddings(tokens[:, :-1])
        rope = model.rope[:h.shape[1]]
        for i, block in enumerate(model.layers.values()):
            scores, attention_out, x = reference_attention_logits(block, h, rope, mup_base_dim)
            torch.testing.assert_close(attention_out, block.attention(x, rope), rtol=1e-5, atol=1e-6)
            assert row["max_attn_logit"][i] == pytest.approx(float(scores.max()), rel=1e-5)
            h = block(h, rope)
            hd = h.double()
            assert row["resid_rms"][i] == pytest.approx(float(hd.pow(2).mean().sqrt()), rel=1e-5)
            assert row["resid_var"][i] == pytest.approx(float(hd.var(-1, unbiased=False).mean()), rel=1e-5)
            assert row["max_act"][i] == pytest.approx(float(hd.abs().max()), rel=1e-6)
            assert row["max_act_ratio"][i] == pytest.approx(float(hd.abs().max() / hd[0].abs().median()), rel=1e-5)


def test_probe_leaves_no_hooks_behind():
    model = tiny_model()
    diagnostics = Diagnostics(model, every=1, total_steps=1, device=torch.device("cpu"), gradients=True)
    with diagnostics.probe():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert all(not m._forward_hooks for m in model.modules())


def test_spike_detector_matches_numpy():
    rng = np.random.default_rng(0)
    losses = list(3.0 - 0.01 * np.arange(60) + 0.02 * rng.standard_normal(60))
    losses[40] += 1.0  # a spike
    detector, window, kept = SpikeDetector(window=20, threshold=6.0), 20, []
    for i, loss in enumerate(losses):
        z = detector.update(loss)
        history = kept[-window:]
        if len(history) < 10:
            assert z is None
            kept.append(loss)
            continue
        want = (loss - np.mean(history)) / np.std(history)
        assert z == pytest.approx(want, rel=1e-9)
        assert detector.is_spike(z) == (i == 40)
        if want <= 6.0:
            kept.append(loss)


def test_z_loss_matches_float64():
    logits = torch.randn(2, 5, 11) * 4
    want = np.mean(np.log(np.exp(logits.double().numpy()).sum(-1)) ** 2)
    assert float(z_loss(logits)) == pytest.approx(want, rel=1e-5)


ACTIVATION_KEYS = ("resid_rms", "resid_var", "max_act", "max_attn_logit")
GRADIENT_KEYS = ("layer_grad_norm", "attn_grad_norm", "mlp_grad_norm", "update_ratio")


@pytest.mark.parametrize("backend", ["fsdp", "ddp", "deepspeed"])
def test_two_rank_diagnostics_match_single_process(micro_args, tmp_path, backend):
    """2 ranks on halves of the same global batch log the whole model's values, equal to a single process's: FSDP2
    reduces sharded gradient and weight norms over the shards, activations are reduced over ranks. DeepSpeed (ZeRO-3
    here) logs the activation statistics only. Medians are per rank, so max_act_ratio is not compared."""
    common = ("training.steps=2", "diagnostics.every=1", "eval.every=2", "checkpoint.every=2")
    layout = {"fsdp": ["parallel.backend=fsdp"], "ddp": [],
              "deepspeed": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}[backend]
    run_cli("train", TINY, *micro_args("single", *common))
    run_torchrun(2, "train", TINY, *micro_args("sharded", *common, *layout))
    single, sharded = ({r["step"]: r for r in diagnostic_rows(tmp_path / "runs" / name)}
                       for name in ("single", "sharded"))
    assert sorted(single) == sorted(sharded) == [1, 2]
    for step in (1, 2):
        keys = ACTIVATION_KEYS if backend == "deepspeed" else ACTIVATION_KEYS + GRADIENT_KEYS
        for key in keys:
            assert sharded[step][key] == pytest.approx(single[step][key], rel=2e-4), (step, key)
        if backend == "deepspeed":
            assert not set(GRADIENT_KEYS) & set(sharded[step])


def test_nonfinite_skip_drops_the_updates_and_counts_them(micro_args, tmp_path):
    """lr=1e30 makes step 1's update enormous, so every later forward overflows: with stability.nonfinite=skip each
    of those steps is counted and leaves the weights exactly as step 1 left them."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    result = run_cli("train", TINY, *micro_args("skip", "training.lr=1e30", "training.warmup_steps=0",
                                                "training.grad_clip=0", "training.steps=5", "checkpoint.every=1",
                                                "checkpoint.keep_last=0", "eval.every=5",
                                                "stability.nonfinite=skip"))
    assert "step 5 skipped" in result.stdout
    run_dir = tmp_path / "runs" / "skip"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("event") == "skipped_step"] == [2, 3, 4, 5]
    assert [r["skipped_steps"] for r in rows if "loss" in r] == [0, 1, 2, 3, 4]
    weights = []
    for step in (1, 5):
        dcp_to_torch_save(run_dir / "checkpoints" / f"step_{step:08d}", tmp_path / f"{step}.pt")
        weights.append(torch.load(tmp_path / f"{step}.pt", weights_only=False)["model"])
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
