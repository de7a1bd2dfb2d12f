"""Generation with a KV cache: the cached decode gives the tokens of a full recompute and of the model's own full
forward, for every placement (native and the exported NormtronForCausalLM), and `normtron generate` end to end."""

from __future__ import annotations

import pytest
import torch

from normtron.models.placement import PLACEMENTS
from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer
from normtron.models.generation import KVCache, generate, next_token

# Every placement, the three norm types, QK-norm, per-layer placements and µP.
CASES = {name: {"placement": name} for name in PLACEMENTS} | {
    "dyt": {"norm": "dyt"}, "layernorm_qk": {"norm": "layernorm", "qk_norm": True, "embed_norm": True},
    "mup": {"parametrization": "mup", "mup_base_dim": 32}, "layers": {"layer_placements": ["post", "peri", "pre"]},
    "normformer_residual": {"placement": "normformer", "normformer_residual_scale": True},
}


def micro_model(**overrides) -> Transformer:
    cfg = ModelConfig(**{"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden_dim": 96,
                         "vocab_size": 97, "max_seq_len": 48, **overrides})
    model = Transformer(cfg)
    model.init_weights(seed=7)
    with torch.no_grad():  # norms away from their init, so a wrongly placed one changes the tokens
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model.eval()


def full_forward_greedy(model: Transformer, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """The reference: the model's own training forward over the whole sequence, argmax of the last position."""
    tokens = prompt
    for _ in range(new):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[:, prompt.shape[1]:]


@pytest.mark.parametrize("case", CASES)
def test_cached_greedy_equals_recompute_and_full_forward(case):
    model = micro_model(**CASES[case])
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    reference = full_forward_greedy(model, prompt, 16)
    assert torch.equal(generate(model, prompt, 16, use_cache=False), reference)
    assert torch.equal(generate(model, prompt, 16), reference)
    # The cached logits themselves, position by position, against one full forward (fp32 round-off only).
    tokens = torch.cat([prompt, reference], dim=1)
    cache = KVCache()
    logits = [model(tokens[:, :7], cache=cache)]
    logits += [model(tokens[:, i:i + 1], cache=cache) for i in range(7, tokens.shape[1])]
    torch.testing.assert_close(torch.cat(logits, dim=1), model(tokens), rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == tokens.shape[1]


def test_multi_token_steps_use_a_bottom_right_causal_mask():
    model = micro_model(placement="peri")
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    cache = KVCache()
    chunks = [model(tokens[:, a:b], cache=cache) for a, b in ((0, 5), (5, 12), (12, 20))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(tokens), rtol=1e-4, atol=1e-4)


def test_top_p_samples_only_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([next_token(logits, 1.0, 0.7, generator) for _ in range(2000)]).flatten()
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    assert counts[2] == 0 and counts[3] == 0  # 0.5 + 0.3 reaches 0.7: the nucleus is {0, 1}
    assert abs(counts[0] - 0.5 / 0.8) < 0.04
    full = torch.stack([next_token(logits, 1.0, 1.0, generator) for _ in range(4000)]).flatten()
    torch.testing.assert_close(torch.bincount(full, minlength=4).double() / 4000,
                               torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.03, rtol=0)


# --- The exported NormtronForCausalLM: transformers' generate with its Cache ---------------------------------------

@pytest.mark.parametrize("case", ["post", "peri", "ngpt", "dyt", "layers"])
def test_hf_generate_with_cache_equals_without_and_native(case):
    from normtron.trainer.convert.hf.mapping import hf_config
    from normtron.trainer.convert.hf.remote_config import NormtronConfig
    from normtron.trainer.convert.hf.remote_model import NormtronForCausalLM

    native = micro_model(**CASES[case])
    hf_model = NormtronForCausalLM(NormtronConfig(**hf_config(native.cfg, torch.float32, None, None))).eval()
    hf_model.model.load_state_dict(native.state_dict())
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    expected = torch.cat([prompt, full_forward_greedy(native, prompt, 16)], dim=1)
    kwargs = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 16, "min_new_tokens": 16,
              "do_sample": False}
    with torch.no_grad():
        cached = hf_model.generate(prompt, use_cache=True, return_dict_in_generate=True, **kwargs)
        recomputed = hf_model.generate(prompt, use_cache=False, **kwargs)
    cache = getattr(cached, "cache", None) or cached.past_key_values  # the field's name before transformers 5.2x
    assert cache.get_seq_length() == expected.shape[1] - 1  # the cache was used and grew
    assert torch.equal(cached.sequences, expected) and torch.equal(recomputed, expected)


# --- `normtron generate` -------------------------------------------------------------------------------------------

def test_cli_generates_the_native_greedy_continuation(micro_args, tmp_path):
    import sentencepiece as spm
    from helpers import TINY, native_model, run_cli

    from normtron.trainer.config import load_config
    from normtron.trainer.train import train

    checkpoint = train(load_config(TINY, micro_args("gen", "training.steps=3", "checkpoint.every=3", "eval.every=3",
                                                    "model.placement=peri", "model.qk_norm=true"))).checkpoint
    prompt = "To be, or not to be"
    out = run_cli("generate", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "12")
    # The reference: sentencepiece itself, and the model loaded by DCP directly, decoded by full forwards.
    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    ids = [sp.bos_id(), *sp.encode(prompt)]
    new = full_forward_greedy(native_model(checkpoint), torch.tensor([ids]), 12)[0].tolist()
    new = new[:new.index(sp.eos_id())] if sp.eos_id() in new else new
    assert out.stdout == prompt + sp.decode(ids + new)[len(sp.decode(ids)):] + "\n"
    assert "tokens/s" in out.stderr and "greedy" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["MISSING", "--prompt", "x"], "does not exist"),
    (["CKPT", "--prompt", "  "], "--prompt is empty"),
    (["CKPT", "--prompt", "x", "--temperature", "-1"], "--temperature must be"),
    (["CKPT", "--prompt", "x", "--top-p", "0"], "--top-p must be"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    from normtron.trainer.cli import main

    (tmp_path / "ckpt").mkdir()
    args = [a.replace("MISSING", str(tmp_path / "nope")).replace("CKPT", str(tmp_path / "ckpt")) for a in args]
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("normtron: error: ") and message in err[0], err
