"""Megatron-LM / GPT-NeoX indexed datasets written by megatron-core's own IndexedDatasetBuilder: read back token for
token with their document boundaries, validation held out as documented, and trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from helpers import MICRO_MODEL, TINY, read_metrics, run_cli

from normtron.trainer.config import DataConfig
from normtron.trainer.data.indexed import MegatronIndex, holdout_every, megatron_split
from normtron.trainer.data.mixture import open_sources
from normtron.trainer.errors import UserError

from megatron.core.datasets import indexed_dataset  # megatron-core: the dev extra

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # megatron-core's own


def shakespeare_documents(shakespeare_dir, n_files=6) -> list[str]:
    """Real text cut into paragraph documents (hundreds of them)."""
    docs = []
    for path in sorted(shakespeare_dir.glob("*.txt"))[:n_files]:
        docs += [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 40]
    return docs


def write_megatron(prefix, token_docs, dtype, split_sequences=False):
    """What Megatron's tools/preprocess_data.py does: one document per entry (EOD appended), via the builder."""
    builder = indexed_dataset.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for ids in token_docs:
        if split_sequences and len(ids) > 4:  # a document of two sequences (Megatron's sentence splitting)
            half = len(ids) // 2
            builder.add_document(torch.tensor(ids), [half, len(ids) - half])
        else:
            builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")


@pytest.fixture(scope="module")
def megatron_data(shakespeare_dir, shakespeare_data, tmp_path_factory):
    """(prefix, tokenizer path, the token ids of each document) for a uint16 dataset."""
    tokenizer = shakespeare_data / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    token_docs = [ids + [sp.eos_id()] for ids in sp.encode(shakespeare_documents(shakespeare_dir))]
    prefix = tmp_path_factory.mktemp("megatron") / "shakespeare_text_document"
    dtype = indexed_dataset.DType.optimal_dtype(sp.get_piece_size())
    write_megatron(prefix, token_docs, dtype, split_sequences=True)
    return prefix, tokenizer, token_docs


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_reads_megatron_core_files_token_for_token(megatron_data, tmp_path, dtype):
    prefix, _, token_docs = megatron_data
    if dtype is not np.uint16:  # the same documents in Megatron's dtype for large vocabularies
        prefix = tmp_path / "int32_text_document"
        write_megatron(prefix, token_docs, dtype)
    index = MegatronIndex(prefix, "data.dir")
    assert index.dtype == np.dtype(dtype) and index.documents == len(token_docs) > 500
    # Megatron's own reader agrees on every document (its sequences joined) ...
    theirs = indexed_dataset.IndexedDataset(str(prefix))
    tokens = index.tokens()
    for d in (0, 1, 17, len(token_docs) - 1):
        begin, end = index.doc_starts[d], index.doc_starts[d + 1]
        sequences = range(theirs.document_indices[d], theirs.document_indices[d + 1])
        assert np.array_equal(tokens[begin:end], np.concatenate([theirs[s] for s in sequences]))
    # ... and every document is the ids written, at its boundaries.
    for d, ids in enumerate(token_docs):
        assert list(tokens[index.doc_starts[d]:index.doc_starts[d + 1]]) == ids
    # Validation: every k-th document (k-1, 2k-1, ...), k = round(1 / val_fraction); train: all the others.
    k = holdout_every(0.02)
    assert k == 50
    val = megatron_split(index, k, "val")
    train = megatron_split(index, k, "train")
    expected_val = [t for d, ids in enumerate(token_docs) if d % k == k - 1 for t in ids]
    expected_train = [t for d, ids in enumerate(token_docs) if d % k != k - 1 for t in ids]
    assert val[:len(val)].tolist() == expected_val and train[:len(train)].tolist() == expected_train
    # Slices across document-range boundaries read the right tokens.
    assert train[1000:9000].tolist() == expected_train[1000:9000]


def test_trains_on_a_megatron_prefix(megatron_data, shakespeare_data, tmp_path):
    prefix, tokenizer, token_docs = megatron_data
    args = [f"data.dir={prefix}", f"data.tokenizer={tokenizer}", f"run.output_dir={tmp_path}", "run.name=mega",
            *MICRO_MODEL, "training.steps=4", "checkpoint.every=4", "eval.every=4", "data.val_fraction=0.1"]
    run_cli("train", TINY, *args)
    train, evals = read_metrics(tmp_path / "mega")
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in train)
    # The first loss is about ln(vocab) (an untrained model), the validation loss is over the held-out documents.
    assert abs(train[0]["loss"] - np.log(512)) < 0.5 and np.isfinite(evals[-1]["val_loss"])
    ckpt = tmp_path / "mega" / "checkpoints" / "step_00000004"
    assert (ckpt / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    # In a mixture with a prepared directory of the same tokenizer.
    run_cli("train", TINY, f"data.sources=[{{dir: {prefix}, name: mega}}, {{dir: {shakespeare_data}, weight: 3}}]",
            *args[1:3], "run.name=mixed", *args[4:])
    mixed_train, mixed_evals = read_metrics(tmp_path / "mixed")
    assert mixed_train[-1]["data_share/mega"] == pytest.approx(0.25, abs=0.02)
    assert {"val_loss/mega", "val_loss/shakespeare"} <= set(mixed_evals[-1])
    # The meta that training used: token counts of the two splits at val_fraction 0.1 (every 10th document).
    sources = open_sources(DataConfig(dir=str(prefix), tokenizer=str(tokenizer), val_fraction=0.1))
    meta = sources[0].meta
    assert meta["val_tokens"] == sum(len(ids) for d, ids in enumerate(token_docs) if d % 10 == 9)
    assert meta["train_tokens"] + meta["val_tokens"] == sum(map(len, token_docs))
    val = np.array([t for d, ids in enumerate(token_docs) if d % 10 == 9 for t in ids])
    p = np.bincount(val) / len(val)
    assert meta["val_unigram_entropy"] == pytest.approx(-(p[p > 0] * np.log(p[p > 0])).sum(), rel=1e-9)


def test_megatron_source_errors(megatron_data, shakespeare_data, shakespeare_dir, tmp_path):
    prefix, tokenizer, _ = megatron_data

    def error(**data) -> str:
        with pytest.raises(UserError) as err:
            open_sources(DataConfig(**data))
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "carries no tokenizer; set data.tokenizer" in error(dir=str(prefix))
    assert "data.tokenizer=" in error(dir=str(prefix), tokenizer=str(tmp_path / "none.model"))
    (tmp_path / "half.bin").write_bytes(b"\0" * 8)
    assert "half.idx is missing" in error(dir=str(tmp_path / "half"))
    (tmp_path / "bad.bin").write_bytes(b"\0" * 8)
    (tmp_path / "bad.idx").write_bytes(b"not an index at all, really not" * 3)
    assert "MMIDIDX" in error(dir=str(tmp_path / "bad"), tokenizer=str(tokenizer))
    cut = tmp_path / "cut"  # a .bin shorter than its .idx says
    (tmp_path / "cut.idx").write_bytes(Path(f"{prefix}.idx").read_bytes())
    (tmp_path / "cut.bin").write_bytes(Path(f"{prefix}.bin").read_bytes()[:-2])
    assert "the pair is damaged or mismatched" in error(dir=str(cut), tokenizer=str(tokenizer))
    # A tokenizer too small for the ids stored, and one that differs from a prepared source's own.
    lines = sorted(shakespeare_dir.glob("*.txt"))[0].read_text(encoding="utf-8").splitlines()
    other = tmp_path / "other.model"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "other"),
                                   vocab_size=100, model_type="bpe", minloglevel=2)
    assert "outside the vocabulary of 100" in error(dir=str(prefix), tokenizer=str(other))
    mixed = [{"dir": str(prefix), "name": "mega"}, {"dir": str(shakespeare_data)}]
    assert [s.name for s in open_sources(DataConfig(sources=mixed, tokenizer=str(tokenizer)))] == ["mega",
                                                                                                    "shakespeare"]
    assert "another tokenizer than data.tokenizer=" in error(sources=mixed[1:], tokenizer=str(other))
    # Through the CLI: one line, exit code 2.
    result = run_cli("train", "--check", TINY, f"data.dir={prefix}", *MICRO_MODEL, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("normtron: error: data.dir=") and "data.tokenizer" in result.stderr
