"""`normtron convert from-hf`: Hugging Face Llama -> normtron -> Hugging Face is lossless, training continues from
the converted checkpoint with the Hugging Face model's loss, and bad inputs fail with one line and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import all_tensors, comparable_config, flip_model_tensor_bytes, read_metrics, run_cli, tree_digest

from normtron.trainer.cli import main
from normtron.trainer.data.batches import TrainBatches, load_data_meta, open_tokens


def save_llama(out: Path, tokenizer: Path, tied: bool = False, dtype=torch.float32, shard: str | None = None):
    """A random Llama (GQA, non-unit norms) saved by transformers itself, with our sentencepiece tokenizer."""
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    model.to(dtype).save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    shutil.copy2(tokenizer, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return out


@pytest.mark.parametrize("tied,dtype,shard", [(False, torch.float32, None), (True, torch.bfloat16, "60KB")])
def test_round_trip_is_lossless(shakespeare_data, tmp_path, tied, dtype, shard):
    original = save_llama(tmp_path / "llama", shakespeare_data / "tokenizer.model", tied, dtype, shard)
    assert (original / "model.safetensors.index.json").exists() == bool(shard)
    run_cli("convert", "from-hf", str(original), str(tmp_path / "ckpt"))
    run_cli("convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back"),
            "--dtype", "bf16" if dtype == torch.bfloat16 else "fp32")
    before, after = all_tensors(original), all_tensors(tmp_path / "back")
    assert before.keys() == after.keys()
    for key in before:
        assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    assert comparable_config(tmp_path / "back") == comparable_config(original)


def test_granite_round_trip_is_a_lossless_mup_model(shakespeare_data, tmp_path):
    """GraniteForCausalLM with µP's multipliers (width 64 from base 32: logits_scaling 2, attention_multiplier
    sqrt(head_dim / 2) / head_dim) reads as our µP model with the same logits, and converts back unchanged."""
    import math

    from helpers import native_model

    config = transformers.GraniteConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, logits_scaling=2.0,
        attention_multiplier=math.sqrt(16 / 2) / 16, embedding_multiplier=1.0, residual_multiplier=1.0)
    torch.manual_seed(0)
    granite = transformers.GraniteForCausalLM(config)
    with torch.no_grad():
        for p in granite.parameters():
            p.normal_(1.0 if p.ndim == 1 else 0.0, 0.1)
    original = tmp_path / "granite"
    granite.save_pretrained(original)
    shutil.copy2(shakespeare_data / "tokenizer.model", original / "tokenizer.model")
    run_cli("convert", "from-hf", str(original), str(tmp_path / "ckpt"))
    ours = native_model(tmp_path / "ckpt")
    assert (ours.cfg.parametrization, ours.cfg.mup_base_dim) == ("mup", 32)
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(tokens) - granite.eval()(tokens).logits).abs().max() < 1e-5
    run_cli("convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back"))
    before, after = all_tensors(original), all_tensors(tmp_path / "back")
    assert before.keys() == after.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert comparable_config(tmp_path / "back") == comparable_config(original)


def test_continued_pretraining_starts_at_the_hugging_face_loss(shakespeare_data, tmp_path):
    original = save_llama(tmp_path / "llama", shakespeare_data / "tokenizer.model")
    ckpt = tmp_path / "ckpt"
    run_cli("convert", "from-hf", str(original), str(ckpt))
    settings = ["data.seq_len=32", "training.batch_size=8", "run.seed=5", "training.warmup_steps=0",
                "training.lr=3e-3"]
    result = run_cli("train", str(ckpt / "config.yaml"), f"data.dir={shakespeare_data}", "training.steps=2",
                     f"run.output_dir={tmp_path / 'runs'}", "run.name=continued", "logging.every=1",
                     "logging.tensorboard=false", "eval.steps=1", *settings)
    assert f"initialized the model from {ckpt.resolve()}" in result.stdout + result.stderr
    rows, _ = read_metrics(tmp_path / "runs" / "continued")
    # The same first batch through the Hugging Face model: the data order depends only on run.seed.
    meta = load_data_meta(shakespeare_data)
    batches = TrainBatches(open_tokens(shakespeare_data, "train", meta), 32, 8, 0, 1, 5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(original).eval()
    with torch.no_grad():
        expected = [F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
                    for x, y in (batches.next_batch(), batches.next_batch())]
    assert rows[0]["step"] == 1 and rows[0]["loss"] == pytest.approx(expected[0], rel=1e-5)
    assert rows[1]["loss"] < expected[1] - 0.05  # and it trains on: one step beats the Llama on the next batch


@pytest.fixture(scope="module")
def converted(shakespeare_data, tmp_path_factory):
    """A Hugging Face Llama folder and its normtron checkpoint, for the error tests to copy and damage."""
    root = tmp_path_factory.mktemp("converted")
    llama = save_llama(root / "llama", shakespeare_data / "tokenizer.model")
    run_cli("convert", "from-hf", str(llama), str(root / "ckpt"))
    return root


def fails(args: list[str], capsys, message: str, out: Path) -> None:
    """The command exits 2 with one `normtron: error:` line containing `message` and `out` is not created."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normtron: error: ") and "\n" not in err and message in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp*"))


def damaged_copy(src: Path, dst: Path, damage) -> Path:
    shutil.copytree(src, dst)
    damage(dst)
    return dst


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def test_to_hf_errors(converted, tmp_path, capsys):
    ckpt, out = converted / "ckpt", tmp_path / "out"
    before = tree_digest(converted)
    fails(["convert", "to-hf", str(tmp_path), str(out)], capsys, "is not a training checkpoint", out)
    fails(["convert", "to-hf", str(tmp_path / "missing"), str(out)], capsys, "does not exist", out)
    truncated = damaged_copy(ckpt, tmp_path / "truncated", lambda d: truncate(next(d.glob("*.distcp"))))
    fails(["convert", "to-hf", str(truncated), str(out)], capsys, "is truncated", out)
    corrupted = damaged_copy(ckpt, tmp_path / "corrupted", flip_model_tensor_bytes)
    deep = tmp_path / "new" / "dirs" / "out"  # found while writing: the half-written output and its parents go
    fails(["convert", "to-hf", str(corrupted), str(deep)], capsys, "fails its checksum", deep)
    assert not (tmp_path / "new").exists()
    no_config = damaged_copy(ckpt, tmp_path / "no_config", lambda d: (d / "config.yaml").unlink())
    fails(["convert", "to-hf", str(no_config), str(out)], capsys, "has no config.yaml", out)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "to-hf", str(ckpt), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert tree_digest(converted) == before


def test_from_hf_errors(converted, tmp_path, capsys):
    llama, out = converted / "llama", tmp_path / "out"
    before = tree_digest(converted)

    def edit_config(**changes):
        def apply(folder: Path) -> None:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return apply

    fails(["convert", "from-hf", str(tmp_path), str(out)], capsys, "no config.json", out)
    gpt2 = damaged_copy(llama, tmp_path / "gpt2", edit_config(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    fails(["convert", "from-hf", str(gpt2), str(out)], capsys, "supported architectures: LlamaForCausalLM", out)
    scaled = damaged_copy(llama, tmp_path / "scaled", edit_config(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
    fails(["convert", "from-hf", str(scaled), str(out)], capsys, "rope_type='linear'", out)
    small_vocab = damaged_copy(llama, tmp_path / "vocab", edit_config(vocab_size=256))
    fails(["convert", "from-hf", str(small_vocab), str(out)], capsys, "has 512 tokens but", out)
    truncated = damaged_copy(llama, tmp_path / "truncated", lambda d: truncate(d / "model.safetensors"))
    fails(["convert", "from-hf", str(truncated), str(out)], capsys, "damaged or truncated", out)
    no_tokenizer = damaged_copy(llama, tmp_path / "no_tok", lambda d: (d / "tokenizer.model").unlink())
    fails(["convert", "from-hf", str(no_tokenizer), str(out)], capsys, "no sentencepiece tokenizer.model", out)
    assert tree_digest(converted) == before


def test_init_from_a_different_model_is_refused(converted, shakespeare_data, tmp_path):
    ckpt = converted / "ckpt"
    result = run_cli("train", str(ckpt / "config.yaml"), f"data.dir={shakespeare_data}", "model.n_layers=3",
                     f"run.output_dir={tmp_path / 'runs'}", "data.seq_len=32", check=False)
    assert result.returncode == 2 and "holds a different model (model.n_layers: 2 there, 3 here)" in result.stderr
    assert not (tmp_path / "runs").exists()
