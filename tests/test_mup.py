"""µP (model.parametrization=mup): init std and per-parameter learning rates against the Tensor Programs V table
written out here, the forward against Hugging Face's GraniteForCausalLM (Llama with µP's multipliers), the
coordinate check (`normtron mup-check`) flat under µP and growing under the standard parametrization, and sharded
training (FSDP2, DeepSpeed ZeRO-3) equal to one process. TP and PP parity under µP: the `peri` cases of
test_tensor_parallel.py and test_pipeline.py run with µP."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import transformers
from helpers import MICRO_MODEL, TINY, TrainedRuns, assert_same_losses, resume_copy, run_cli

from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer
from normtron.trainer.config import TrainingConfig
from normtron.trainer.optim import build_optimizer

HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MUP = ("model.parametrization=mup", "model.mup_base_dim=32")


def expected_table(name: str, dim: int, base: int, n_layers: int, init_std: float, lr: float) -> tuple[float, float]:
    """(init std, AdamW lr) of parameter `name` by Tensor Programs V, Table 8 (µP with multipliers), relative to
    the base width: hidden matrices init variance 1/fan_in -> std * sqrt(base/dim), Adam lr eta/fan_in -> lr *
    base/dim; input embedding and output head: std and lr unchanged (the 1/m goes into the logit multiplier);
    GPT-2 depth scaling 1/sqrt(2L) on output projections on top."""
    module = name.split(".")[-2]
    if module in HIDDEN:
        depth = 1 / math.sqrt(2 * n_layers) if module in ("o_proj", "down_proj") else 1.0
        return init_std * math.sqrt(base / dim) * depth, lr * base / dim
    return init_std, lr


@pytest.mark.parametrize("dim", [64, 256])
def test_init_std_and_learning_rates_follow_the_mup_table(dim):
    base, n_layers, init_std, lr = 32, 2, 0.02, 1e-2
    cfg = ModelConfig(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_hidden_dim=2 * dim,
                      max_seq_len=16, parametrization="mup", mup_base_dim=base, init_std=init_std)
    cfg.validate()
    model = Transformer(cfg)
    model.init_weights(seed=0)
    optimizer = build_optimizer(model, TrainingConfig(lr=lr, warmup_steps=0), cfg)
    group_lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(group_lr) == len(list(model.parameters()))
    for name, param in model.named_parameters():
        if param.ndim == 2:
            std, want_lr = expected_table(name, dim, base, n_layers, init_std, lr)
            assert param.std().item() == pytest.approx(std, rel=0.06), name
        else:  # norm weights: ones, lr unchanged
            want_lr = lr
            assert torch.equal(param, torch.ones_like(param)), name
        assert group_lr[id(param)] == pytest.approx(want_lr, rel=1e-12), name


def test_mup_at_the_base_width_is_the_standard_parametrization():
    common = dict(dim=64, n_layers=2, n_heads=4, vocab_size=50, ffn_hidden_dim=96, max_seq_len=16)
    standard, mup = Transformer(ModelConfig(**common)), Transformer(ModelConfig(**common, parametrization="mup",
                                                                               mup_base_dim=64))
    standard.init_weights(seed=3)
    mup.init_weights(seed=3)
    tokens = torch.randint(0, 50, (2, 12))
    assert torch.equal(standard(tokens), mup(tokens))
    lrs = [[g["lr"] for g in build_optimizer(m, TrainingConfig(), m.cfg).param_groups] for m in (standard, mup)]
    assert lrs[0] == lrs[1]


@pytest.mark.parametrize("dim,tied", [(128, False), (256, True)])
def test_mup_forward_matches_granite(dim, tied):
    """GraniteForCausalLM is Llama with attention_multiplier (the softmax scale) and logits divided by
    logits_scaling: µP's 1/d attention (sqrt(base head dim)/head_dim, 1/sqrt(head_dim) at the base width) and
    1/m output multiplier."""
    base, heads = 32, 4
    cfg = ModelConfig(dim=dim, n_layers=2, n_heads=heads, n_kv_heads=2, vocab_size=101, ffn_hidden_dim=96,
                      max_seq_len=64, tie_embeddings=tied, init_std=0.1, parametrization="mup", mup_base_dim=base)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    head_dim = dim // heads
    granite = transformers.GraniteForCausalLM(transformers.GraniteConfig(
        vocab_size=101, hidden_size=dim, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=2, rms_norm_eps=cfg.norm_eps, max_position_embeddings=64, tie_word_embeddings=tied,
        attention_multiplier=math.sqrt(base / heads) / head_dim, logits_scaling=dim / base,
        embedding_multiplier=1.0, residual_multiplier=1.0)).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        name = (name.replace("tok_embeddings", "model.embed_tokens").replace("output.weight", "lm_head.weight")
                .replace("attention_norms.input", "input_layernorm")
                .replace("ffn_norms.input", "post_attention_layernorm").replace("attention.", "self_attn.").replace("feed_forward.", "mlp."))
        state[name if name.startswith(("model.", "lm_head")) else f"model.{name}"] = tensor
    missing, unexpected = granite.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    tokens = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), granite(tokens).logits
    assert theirs.abs().max() > 0.3
    assert (ours - theirs).abs().max().item() < 1e-5


def test_schedule_and_resume_keep_each_groups_lr_multiplier():
    """The schedule scales every group's peak lr (training.lr x lr_scale), also after a checkpoint's param groups
    are loaded and the config's lr is applied again (trainer/train.py's resume path)."""
    from normtron.trainer.optim import apply_lr_schedule, build_lr_scheduler, lr_factor

    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, vocab_size=50, ffn_hidden_dim=256, parametrization="mup",
                      mup_base_dim=32)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    training = TrainingConfig(lr=4e-3, warmup_steps=3, steps=10)
    optimizer = build_optimizer(model, training, cfg)
    scheduler = build_lr_scheduler(optimizer, training)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = optimizer.state_dict()
    resumed = build_optimizer(model, TrainingConfig(lr=1e-3), cfg)
    resumed.load_state_dict(state)
    resumed_scheduler = build_lr_scheduler(resumed, training)
    resumed_scheduler.last_epoch = scheduler.last_epoch
    halved = TrainingConfig(lr=2e-3, warmup_steps=3, steps=10)
    apply_lr_schedule(resumed, resumed_scheduler, halved)
    names = {id(p): name for name, p in model.named_parameters()}
    for before, after in zip(optimizer.param_groups, resumed.param_groups):
        hidden = {names[id(p)].startswith("layers.") and p.ndim == 2 for p in before["params"]}
        assert len(hidden) == 1  # a group holds hidden matrices only, or none
        scale = 32 / 128 if hidden.pop() else 1.0
        assert before["lr"] == pytest.approx(4e-3 * scale * lr_factor(5, training), rel=1e-12)
        assert after["lr"] == pytest.approx(2e-3 * scale * lr_factor(5, training), rel=1e-12)
        after["expected_next"] = 2e-3 * scale * lr_factor(6, training)
    resumed.step()
    resumed_scheduler.step()  # the schedule goes on from the resumed peak, multiplier kept
    assert all(g["lr"] == pytest.approx(g["expected_next"], rel=1e-12) for g in resumed.param_groups)
    assert {g["lr_scale"] for g in resumed.param_groups} == {1.0, 0.25}


def test_coordinate_check_is_flat_under_mup_and_grows_under_standard(shakespeare_data, tmp_path):
    out = tmp_path / "coord"
    run_cli("mup-check", TINY, f"data.dir={shakespeare_data}", *MICRO_MODEL, "training.lr=1e-2",
            "--widths", "64,128,192,256", "--steps", "5", "--output", str(out))
    assert (out / "coord.png").stat().st_size > 10_000 and "max/min" in (out / "coord.md").read_text()
    with (out / "coord.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["step"] == "5"]
    spread = {}
    for parametrization in ("standard", "mup"):
        for activation in {r["activation"] for r in rows}:
            values = [float(r["mean_abs"]) for r in rows
                      if r["parametrization"] == parametrization and r["activation"] == activation]
            assert len(values) == 4
            spread[parametrization, activation] = max(values) / min(values)
    assert {a for _, a in spread} == {"embedding", "block 0", "block 1", "logits"}
    # Within a factor of 2 across the 4x width change under µP; the residual stream grows with width otherwise.
    assert all(ratio < 2 for (p, _), ratio in spread.items() if p == "mup"), spread
    assert spread["standard", "block 1"] > 3 and spread["standard", "block 0"] > 3, spread


def test_mup_check_rejects_bad_widths(shakespeare_data, tmp_path, capsys):
    from normtron.trainer.cli import main

    assert main(["mup-check", TINY, f"data.dir={shakespeare_data}", "--widths", "64,abc"]) == 2
    assert capsys.readouterr().err.startswith("normtron: error: --widths must be comma-separated")
    assert main(["mup-check", TINY, f"data.dir={shakespeare_data}", *MICRO_MODEL, "--widths", "64,66",
                 "--output", str(tmp_path / "x")]) == 2
    assert "n_heads" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def runs(shakespeare_data, tmp_path_factory):
    return TrainedRuns(shakespeare_data, tmp_path_factory.mktemp("mup"), "training.steps=6", "checkpoint.every=3",
                       "eval.every=3", "checkpoint.keep_last=0", "model.dim=128", *MUP)


@pytest.mark.parametrize("name,overrides", [
    ("fsdp_2", ["parallel.backend=fsdp"]),
    ("zero3_2", ["parallel.backend=deepspeed", "parallel.zero_stage=3"]),
])
def test_mup_sharded_training_matches_single_process(runs, name, overrides):
    reference = runs("single", 1)
    assert_same_losses(runs(name, 2, *overrides), reference)


def test_mup_fsdp_checkpoint_resumes_in_one_process(runs):
    """The per-group lr multipliers come back from a 2-rank FSDP2 DCP checkpoint: resumed in one process at step 3,
    the run goes on as the single-process run does."""
    reference, saved = runs("single", 1), runs("fsdp_2", 2, "parallel.backend=fsdp")
    resume_copy(saved, "fsdp_then_single", drop_step=6)
    resumed = runs("fsdp_then_single", 1)
    assert "resumed from" in (resumed / "train.log").read_text()
    assert_same_losses(resumed, reference, steps=range(4, 7))
