"""Hugging Face tokenizer.json support: ids equal `tokenizers.Tokenizer.encode` (plus the documented EOS rule) for
tokenizers built here with the `tokenizers` library, prepared data holds exactly those ids (uint32 above 65,536
tokens), the folder/file rules of `load_tokenizer`, and Llama 3 style models (tokenizer.json only) through
`convert from-hf`, continued pretraining and `convert to-hf`."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from helpers import all_tensors, comparable_config, native_model, read_metrics, run_cli
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from normtron.trainer.cli import main
from normtron.trainer.data.format import read_meta, split_files
from normtron.trainer.data.tokenizer import load_tokenizer, token_dtype
from normtron.trainer.errors import UserError

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


def shakespeare_paragraphs(shakespeare_dir: Path, files: int = 2) -> list[str]:
    docs = []
    for path in sorted(shakespeare_dir.glob("*.txt"))[:files]:
        docs += [p.strip("\n") for p in path.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 40]
    return docs


def train_llama3_style_bpe(lines: list[str], vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE whose post-processor puts BOS in front of every text, as Llama 3's tokenizer.json does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


@pytest.fixture(scope="session")
def bpe_json(shakespeare_dir, tmp_path_factory) -> Path:
    """tokenizer.json of a 512-token BPE trained on Shakespeare, alone in its folder (no tokenizer_config.json)."""
    lines = [line for doc in shakespeare_paragraphs(shakespeare_dir, 6) for line in doc.splitlines()]
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_llama3_style_bpe(lines).save(str(path))
    return path


@pytest.fixture(scope="module")
def documents(shakespeare_dir) -> list[str]:
    return shakespeare_paragraphs(shakespeare_dir)[:200] + [
        "Ça va? Grüße — ünïcödé 漢字 🎭", f"a text that ends with the EOS token {EOS}", " leading space", "x"]


def expected_ids(tokenizer_json: Path, docs: list[str], eos: str | None) -> list[list[int]]:
    """The documented rule, computed with `tokenizers` alone: encode(doc).ids, then EOS unless already last."""
    tok = Tokenizer.from_file(str(tokenizer_json))
    eos_id = tok.token_to_id(eos) if eos else None
    out = []
    for doc in docs:
        ids = tok.encode(doc).ids
        out.append(ids + [eos_id] if eos_id is not None and ids[-1:] != [eos_id] else ids)
    return out


def test_ids_equal_tokenizers_encode(bpe_json, documents):
    tok = load_tokenizer(bpe_json)
    reference = Tokenizer.from_file(str(bpe_json))
    assert tok.kind == "huggingface" and tok.file_name == "tokenizer.json"
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True) == 512
    # Without tokenizer_config.json, EOS is the tokenizer's known end-of-text special token.
    assert (tok.bos_id, tok.eos_id) == (reference.token_to_id(BOS), reference.token_to_id(EOS))
    expected = expected_ids(bpe_json, documents, EOS)
    assert all(ids[0] == tok.bos_id and ids[-1] == tok.eos_id for ids in expected)
    assert expected[-3][-2:] != [tok.eos_id, tok.eos_id]  # a document ending in EOS gets no second one
    assert tok.encode_documents(documents, threads=1) == expected
    assert tok.encode_documents(documents, threads=2) == expected  # encode_batch: same ids


@pytest.mark.parametrize("config,eos", [
    ({"eos_token": EOT}, EOT),  # Llama 3 Instruct names <|eot_id|>
    ({"eos_token": {"content": EOS, "special": True, "__type": "AddedToken"}}, EOS),
    ({"eos_token": None}, None),  # explicitly none: nothing appended
    ({"bos_token": BOS}, EOS),  # no eos_token key: the tokenizer's own end-of-text token
])
def test_eos_comes_from_tokenizer_config(bpe_json, documents, tmp_path, config, eos):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy2(bpe_json, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.encode_documents(documents, threads=2) == expected_ids(bpe_json, documents, eos)
    # A saved copy (as in a prepared directory or checkpoint) frames documents the same way.
    (tmp_path / "copy").mkdir()
    tok.save(tmp_path / "copy" / "tokenizer.json")
    assert (tmp_path / "copy" / "tokenizer.json").read_bytes() == bpe_json.read_bytes()
    again = load_tokenizer(tmp_path / "copy" / "tokenizer.json")
    assert again.encode_documents(documents) == expected_ids(bpe_json, documents, eos)
    assert again.info()["sha256"] == tok.info()["sha256"] and again.info()["eos_id"] == tok.info()["eos_id"]


def test_tokenizer_paths(bpe_json, shakespeare_data, tmp_path):
    both = tmp_path / "both"  # a Llama 2 style folder: tokenizer.model and tokenizer.json
    both.mkdir()
    shutil.copy2(bpe_json, both / "tokenizer.json")
    shutil.copy2(shakespeare_data / "tokenizer.model", both / "tokenizer.model")
    assert load_tokenizer(both).kind == "sentencepiece"
    assert load_tokenizer(both / "tokenizer.json").kind == "huggingface"
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.json").write_text('{"not": "a tokenizer"}')
    (tmp_path / "model").mkdir()
    shutil.copy2(bpe_json, tmp_path / "model" / "tokenizer.json")
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|missing|>"}))
    for path, message in [(tmp_path / "empty", "holds neither tokenizer.model nor tokenizer.json"),
                          (tmp_path / "nothing.json", "does not exist"),
                          (tmp_path / "junk.json", "is not a Hugging Face tokenizer.json"),
                          (tmp_path / "model", "names eos_token '<|missing|>', which its tokenizer.json does not")]:
        with pytest.raises(UserError) as err:
            load_tokenizer(path)
        assert message in str(err.value) and "\n" not in str(err.value)


def prepared_ids(out: Path) -> tuple[dict, np.ndarray]:
    """meta.json and every stored id (train and val) of a prepared directory."""
    meta = read_meta(out)
    ids = [np.fromfile(f, dtype=meta["dtype"]) for split in ("train", "val") for f in split_files(out, meta, split)]
    return meta, np.concatenate(ids).astype(np.int64)


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def test_prepare_with_tokenizer_json(bpe_json, documents, tmp_path):
    corpus = write_jsonl(tmp_path / "in" / "docs.jsonl", documents)
    assert main(["prepare-data", "--input", str(corpus), "--output", str(tmp_path / "out"),
                 "--tokenizer", str(bpe_json)]) == 0
    meta, stored = prepared_ids(tmp_path / "out")
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16" and meta["documents"] == len(documents)
    assert meta["tokenizer"]["type"] == "huggingface" and meta["tokenizer"]["eos_token"] == EOS
    expected = np.concatenate(expected_ids(bpe_json, documents, EOS))
    assert np.array_equal(np.bincount(stored, minlength=512), np.bincount(expected, minlength=512))


def test_vocabulary_above_65536_is_stored_as_uint32(tmp_path):
    """A 70,000-word WordLevel tokenizer built here: ids above 65,535 survive preparation exactly."""
    words = [f"w{i}" for i in range(70_000 - 3)]
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    rng = random.Random(0)
    docs = [" ".join(rng.choice(words[60_000:]) for _ in range(rng.randint(20, 200))) for _ in range(300)]
    corpus = write_jsonl(tmp_path / "in" / "docs.jsonl", docs)
    assert main(["prepare-data", "--input", str(corpus), "--output", str(tmp_path / "out"),
                 "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    meta, stored = prepared_ids(tmp_path / "out")
    assert meta["vocab_size"] == 70_000 and meta["dtype"] == "uint32" == token_dtype(70_000).name
    expected = np.concatenate(expected_ids(tmp_path / "tokenizer.json", docs, "</s>"))
    assert expected.max() > 65_535 and stored.max() == expected.max()
    assert np.array_equal(np.bincount(stored, minlength=70_000), np.bincount(expected, minlength=70_000))


# --- Conversion: a Llama 3 style model (tokenizer.json only) through from-hf, training and to-hf -------------------

def save_llama3_style(out: Path, tokenizer_json: Path, eos: str = EOS) -> Path:
    """A random Llama saved by transformers itself with a tokenizer.json and its tokenizer_config.json, and no
    sentencepiece tokenizer.model, as Llama 3 is distributed (base models end texts with <|end_of_text|>, Instruct
    models name <|eot_id|>)."""
    tok = Tokenizer.from_file(str(tokenizer_json))
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(eos))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    model.save_pretrained(out)
    shutil.copy2(tokenizer_json, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": eos, "model_max_length": 64}))
    return out


def assert_tokenizer_carried(folder: Path, tokenizer_json: Path, documents: list[str], eos: str = EOS) -> None:
    """AutoTokenizer on the exported folder encodes like the original tokenizers.Tokenizer; ids in the configs."""
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    original = Tokenizer.from_file(str(tokenizer_json))
    assert [auto(d)["input_ids"] for d in documents] == [original.encode(d).ids for d in documents]
    assert (auto.bos_token, auto.eos_token) == (BOS, eos)
    generation = json.loads((folder / "generation_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    for ids in (generation, config):
        assert (ids["bos_token_id"], ids["eos_token_id"]) == (original.token_to_id(BOS), original.token_to_id(eos))


def test_tokenizer_json_model_round_trip(bpe_json, documents, tmp_path, capsys):
    original = save_llama3_style(tmp_path / "llama3", bpe_json)
    assert main(["convert", "from-hf", str(original), str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "tokenizer.json").read_bytes() == bpe_json.read_bytes()
    assert not (tmp_path / "ckpt" / "tokenizer.model").exists()
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    before, after = all_tensors(original), all_tensors(tmp_path / "back")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert comparable_config(tmp_path / "back") == comparable_config(original)
    assert_tokenizer_carried(tmp_path / "back", bpe_json, documents)
    # A config.json with fewer embedding rows than the tokenizer.json has tokens is refused, nothing written.
    small = tmp_path / "small"
    shutil.copytree(original, small)
    (small / "config.json").write_text(json.dumps({**json.loads((small / "config.json").read_text()),
                                                   "vocab_size": 256}))
    assert main(["convert", "from-hf", str(small), str(tmp_path / "never")]) == 2
    assert "has 512 tokens but" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_continued_pretraining_of_a_tokenizer_json_model(bpe_json, documents, tmp_path):
    """from-hf, prepare-data with the checkpoint's tokenizer.json, train from it, to-hf: the exported model's logits
    are normtron's own, and its tokenizer is the original one, with the EOS its tokenizer_config.json names (an
    Instruct-style <|eot_id|>, not the tokenizer's own end-of-text token) carried through data and checkpoints."""
    ckpt, data = tmp_path / "ckpt", tmp_path / "data"
    original = save_llama3_style(tmp_path / "llama3", bpe_json, EOT)
    assert main(["convert", "from-hf", str(original), str(ckpt)]) == 0
    corpus = write_jsonl(tmp_path / "in" / "docs.jsonl", documents)
    assert main(["prepare-data", "--input", str(corpus), "--output", str(data), "--tokenizer",
                 str(ckpt / "tokenizer.json")]) == 0
    meta, stored = prepared_ids(data)
    expected = np.concatenate(expected_ids(bpe_json, documents, EOT))
    assert np.array_equal(np.bincount(stored, minlength=512), np.bincount(expected, minlength=512))
    run = tmp_path / "runs" / "continued"
    result = run_cli("train", str(ckpt / "config.yaml"), f"data.dir={data}", f"run.output_dir={run.parent}",
                     f"run.name={run.name}", "training.steps=3", "checkpoint.every=3", "data.seq_len=32",
                     "training.batch_size=8", "training.warmup_steps=1", "logging.every=1",
                     "logging.tensorboard=false", "eval.steps=1", "eval.every=3")
    assert f"initialized the model from {ckpt.resolve()}" in result.stdout + result.stderr
    rows, _ = read_metrics(run)
    assert len(rows) == 3
    step = run / "checkpoints" / "step_00000003"
    assert (step / "tokenizer.json").read_bytes() == bpe_json.read_bytes()
    assert main(["convert", "to-hf", str(run), str(tmp_path / "exported")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = hf(tokens).logits
        assert (logits - native_model(step)(tokens)).abs().max().item() < 1e-4
        before = transformers.AutoModelForCausalLM.from_pretrained(original).eval()(tokens).logits
        assert (logits - before).abs().max().item() > 1e-3  # the three steps trained the model
    assert_tokenizer_carried(tmp_path / "exported", bpe_json, documents, EOT)
