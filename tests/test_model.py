"""Model structure: parameter counts of the shipped sizes, meta-device build, pipeline-stage forward, init."""

from __future__ import annotations

import pytest
import torch
from helpers import REPO

from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer, count_parameters
from normtron.trainer.config import load_config


def analytic_parameter_count(c: ModelConfig) -> int:
    """Embedding + head + per layer (q, k, v, o, gate, up, down, two RMSNorm weights) + final norm."""
    kv = (c.n_kv_heads or c.n_heads) * (c.dim // c.n_heads)
    per_layer = 2 * c.dim * c.dim + 2 * c.dim * kv + 3 * c.dim * c.hidden_dim + 2 * c.dim
    return 2 * c.vocab_size * c.dim + c.n_layers * per_layer + c.dim


@pytest.mark.parametrize("name,billions", [("125m", 0.125), ("350m", 0.35), ("1b", 1.0), ("3b", 3.0), ("7b", 7.0)])
def test_size_configs_have_their_named_size(name, billions):
    cfg = load_config(REPO / "configs" / f"{name}.yaml").model
    with torch.device("meta"):  # no memory even for 7B
        model = Transformer(cfg)
    n = count_parameters(model)
    assert n == analytic_parameter_count(cfg)
    assert abs(n / (billions * 1e9) - 1) < 0.15, f"{name}: {n / 1e9:.2f}B"


def small_cfg(**kw) -> ModelConfig:
    base = dict(dim=32, n_layers=4, n_heads=4, vocab_size=40, ffn_hidden_dim=48, max_seq_len=16)
    base.update(kw)
    return ModelConfig(**base)


def test_meta_build_then_init_is_seeded_and_fills_everything():
    def build(seed):
        with torch.device("meta"):
            model = Transformer(small_cfg(qk_norm=True, norm="layernorm"))
        model.to_empty(device="cpu")
        model.init_weights(seed=seed)
        return model

    a, b, c = build(0), build(0), build(1)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, q), name
        if p.ndim == 2:
            assert not torch.equal(p, r), name
    assert torch.equal(a.rope, Transformer(small_cfg()).rope)
    # depth-scaled output projections: std 0.02 / sqrt(2 * 4)
    std = torch.cat([m.o_proj.weight.flatten() for m in (blk.attention for blk in a.layers.values())]).std()
    assert abs(std.item() - 0.02 / 8 ** 0.5) < 0.002


def test_init_does_not_depend_on_which_modules_exist():
    """A pipeline stage that keeps layers 2-3 initializes them exactly as the whole model does."""
    def materialized(drop_first_half: bool) -> Transformer:
        with torch.device("meta"):
            model = Transformer(small_cfg())
        if drop_first_half:
            del model.layers["0"], model.layers["1"]
            model.tok_embeddings = model.embed_norm = None
        model.to_empty(device="cpu")
        model.init_weights(seed=7)
        return model

    full, stage = dict(materialized(False).named_parameters()), dict(materialized(True).named_parameters())
    assert set(stage) < set(full)
    for name, p in stage.items():
        assert torch.equal(p, full[name]), name


def test_pipeline_stage_forward_without_embedding_or_head():
    """Deleting layers / embedding / head (as pipeline stages do) keeps names and composes to the full model."""
    torch.manual_seed(0)
    full = Transformer(small_cfg())
    first, last = Transformer(small_cfg()), Transformer(small_cfg())
    first.load_state_dict(full.state_dict())
    last.load_state_dict(full.state_dict())
    del first.layers["2"], first.layers["3"]
    first.norm, first.output = None, None
    del last.layers["0"], last.layers["1"]
    last.tok_embeddings = last.embed_norm = None
    assert set(first.state_dict()) | set(last.state_dict()) == set(full.state_dict())
    tokens = torch.randint(0, 40, (2, 10))
    torch.testing.assert_close(last(first(tokens)), full(tokens))


def test_tied_embeddings_share_one_tensor_after_meta_init():
    with torch.device("meta"):
        model = Transformer(small_cfg(tie_embeddings=True))
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    assert count_parameters(model) == analytic_parameter_count(small_cfg()) - 40 * 32
