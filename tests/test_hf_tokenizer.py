"""Hugging Face tokenizer.json support: ids equal `tokenizers.Tokenizer.encode` (plus the documented EOS rule) for
tokenizers built here with the `tokenizers` library, prepared data holds exactly those ids (uint32 above 65,536
tokens), and the folder/file rules of `load_tokenizer`."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from trainer.cli import main
from trainer.data.format import read_meta, split_files
from trainer.data.tokenizer import load_tokenizer, token_dtype
from trainer.errors import UserError

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
