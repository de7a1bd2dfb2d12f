"""`normtron convert`: trained checkpoints of every placement x norm against Hugging Face transformers loading the
converted folder; Hugging Face Llama round trips; continuing pretraining from a Hugging Face model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers
from helpers import TINY, native_model, run_cli, run_torchrun
from safetensors.torch import load_file

from normtron.models.transformer import Transformer
from normtron.trainer.config import load_config
from normtron.trainer.convert.to_hf import to_hf
from normtron.trainer.train import train

FEW_STEPS = ["training.steps=3", "checkpoint.every=3", "eval.every=3", "eval.steps=1", "training.warmup_steps=1"]


def train_micro(micro_args, name: str, *overrides: str) -> Path:
    """Train a micro model a few steps in this process; returns its final checkpoint directory."""
    result = train(load_config(TINY, micro_args(name, *FEW_STEPS, *overrides)))
    return result.checkpoint


def greedy(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(new_tokens):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def assert_matches_native(hf_model, checkpoint: Path) -> None:
    ours = native_model(checkpoint)
    vocab = ours.cfg.vocab_size
    tokens = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf_model(tokens).logits - ours(tokens)).abs().max().item()
        assert diff < 1e-4, diff
        prompt = tokens[:1, :6]
        expected = greedy(ours, prompt, 20)
        generated = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                                      min_new_tokens=20, do_sample=False)
    assert generated.tolist() == expected.tolist()


CASES = {  # id: (overrides, expected architecture)
    "pre-rmsnorm": ([], "LlamaForCausalLM"),
    "pre-rmsnorm-tied": (["model.tie_embeddings=true"], "LlamaForCausalLM"),
    "pre-layernorm": (["model.norm=layernorm"], "NormtronForCausalLM"),
    "pre-rmsnorm-qknorm": (["model.qk_norm=true"], "NormtronForCausalLM"),
    "post-rmsnorm": (["model.placement=post"], "NormtronForCausalLM"),
    "post-layernorm": (["model.placement=post", "model.norm=layernorm"], "NormtronForCausalLM"),
    "peri-rmsnorm-embednorm": (["model.placement=peri", "model.embed_norm=true"], "NormtronForCausalLM"),
    "peri-layernorm-nobias-tied": (["model.placement=peri", "model.norm=layernorm", "model.norm_bias=false",
                                    "model.tie_embeddings=true"], "NormtronForCausalLM"),
    "mix-rmsnorm": (["model.placement=mix", "model.mix_alpha=0.5"], "NormtronForCausalLM"),
    "mix-layernorm-layers": (["model.layer_placements=post,peri", "model.norm=layernorm"], "NormtronForCausalLM"),
    "deepnorm-layernorm": (["model.placement=deepnorm", "model.norm=layernorm"], "NormtronForCausalLM"),
    "lns-reordered-layers-qknorm": (["model.layer_placements=lns,reordered", "model.qk_norm=true"],
                                    "NormtronForCausalLM"),
    "ngpt-tied": (["model.placement=ngpt", "model.tie_embeddings=true"], "NormtronForCausalLM"),
    "subln-layernorm": (["model.placement=subln", "model.norm=layernorm"], "NormtronForCausalLM"),
    "normformer-subln-layers-residual": (["model.layer_placements=normformer,subln",
                                          "model.normformer_residual_scale=true"], "NormtronForCausalLM"),
    "peri-dyt-nobias-qknorm-embednorm": (["model.placement=peri", "model.norm=dyt", "model.norm_bias=false",
                                         "model.qk_norm=true", "model.embed_norm=true"], "NormtronForCausalLM"),
    "pre-rmsnorm-mup": (["model.parametrization=mup", "model.mup_base_dim=16"], "GraniteForCausalLM"),
    "peri-rmsnorm-mup-tied": (["model.placement=peri", "model.tie_embeddings=true", "model.parametrization=mup",
                               "model.mup_base_dim=32"], "NormtronForCausalLM"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_matches_native_logits_and_generation(case, micro_args, tmp_path):
    overrides, arch = CASES[case]
    checkpoint = train_micro(micro_args, case, *overrides)
    out = to_hf(checkpoint, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch]
    if arch != "NormtronForCausalLM":  # a plain Llama (Granite under µP): no code in the folder, no trust_remote_code
        assert not list(out.glob("*.py")) and "auto_map" not in config
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert type(model) is getattr(transformers, arch)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert type(model).__name__ == "NormtronForCausalLM"
    assert_matches_native(model.eval(), checkpoint)


def test_custom_code_loads_without_normtron_and_cli_shards(micro_args, tmp_path, shakespeare_data):
    """A fresh interpreter that cannot import normtron (isolated mode, another cwd) loads the generated code; the
    CLI writes shards plus an index when --max-shard-size is small, and the tokenizer loads too."""
    checkpoint = train_micro(micro_args, "peri", "model.placement=peri", "model.qk_norm=true")
    out = tmp_path / "hf"
    run_cli("convert", "to-hf", str(checkpoint), str(out), "--max-shard-size", "100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size < 100_000 + 50_000 for p in shards)  # a shard may exceed only by one tensor
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, tmp_path / "tokens.pt")
    script = (
        "import sys\n"
        "# normtron is installed editable in this venv: remove its import hooks, as if it were not installed\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, '__module__', '').startswith('__editable__')]\n"
        "sys.path_importer_cache.clear()\n"
        "import torch, transformers\n"
        "try:\n    import normtron\nexcept ImportError:\n    pass\nelse:\n    sys.exit('normtron is importable')\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        f"tok = transformers.AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"tokens = torch.load({str(tmp_path / 'tokens.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save({{'logits': m(tokens).logits, 'ids': tok('To be, or not')['input_ids']}}, "
        f"{str(tmp_path / 'out.pt')!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, check=True, timeout=300,
                   stdin=subprocess.DEVNULL)
    result = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        assert (result["logits"] - native_model(checkpoint)(tokens)).abs().max().item() < 1e-4
    sp = spm.SentencePieceProcessor(model_file=str(shakespeare_data / "tokenizer.model"))
    assert result["ids"] == [sp.bos_id(), *sp.encode("To be, or not")]
    # ... and the folder converts back: from-hf reads NormtronForCausalLM folders too, losslessly.
    run_cli("convert", "from-hf", str(out), str(tmp_path / "ckpt"))
    back = to_hf(tmp_path / "ckpt", tmp_path / "back")
    original = {}
    for file in sorted(out.glob("model-*.safetensors")):
        original.update(load_file(file))
    again = load_file(back / "model.safetensors")
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    assert json.loads((back / "config.json").read_text()) == json.loads((out / "config.json").read_text())


def test_tokenizer_encodes_and_decodes_like_sentencepiece(micro_args, tmp_path, shakespeare_data, shakespeare_dir):
    out = to_hf(train_micro(micro_args, "pre"), tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(shakespeare_data / "tokenizer.model"))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    play = min(shakespeare_dir.glob("*.txt")).read_text(encoding="utf-8")[:100_000]
    for text in [play, " leading space", "two  spaces, tab\tand newline\n\n", "digits 12345 and Ünïcödé 🙂", ""]:
        ids = tokenizer(text)["input_ids"]
        assert ids == [1, *sp.encode(text)]
        assert tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:])


@pytest.mark.parametrize("layout", [[], ["parallel.backend=fsdp"],
                                    ["parallel.backend=deepspeed", "parallel.zero_stage=3"]],
                         ids=["ddp", "fsdp2", "deepspeed_zero3"])
def test_two_rank_checkpoint_converts_like_the_single_process_one(micro_args, tmp_path, layout):
    """A checkpoint written by two processes — DDP, FSDP2 shards, or DeepSpeed ZeRO-3 partitions (gathered by
    to-hf itself) — converts to the same folder as the single-process run of the same config, up to the rounding
    the gradient reduction adds in training."""
    overrides = ("model.placement=mix", "model.mix_alpha=0.5", "training.micro_batch_size=2")
    run_torchrun(2, "train", TINY, *micro_args("two", *FEW_STEPS, *overrides, *layout))
    single = to_hf(train_micro(micro_args, "single", *overrides), tmp_path / "hf_single")
    two = to_hf(tmp_path / "runs" / "two", tmp_path / "hf_two")
    assert sorted(p.name for p in single.iterdir()) == sorted(p.name for p in two.iterdir())
    for name in ("config.json", "modeling_normtron.py", "tokenizer.json", "tokenizer_config.json"):
        assert (single / name).read_bytes() == (two / name).read_bytes()
    a, b = load_file(single / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)