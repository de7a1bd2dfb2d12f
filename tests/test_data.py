"""prepare-data on real text and on every input format; the batch loader's order, sharding and resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from helpers import read_split, reassemble, run_cli, split_segments, tree_digest

from normtron.trainer.data.batches import TrainBatches, eval_windows
from normtron.trainer.data.format import split_files
from normtron.trainer.data.tokenizer import token_dtype


def test_shakespeare_prepared(shakespeare_data, shakespeare_dir):
    meta = json.loads((shakespeare_data / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    assert len(meta["sources"]) == len(list(shakespeare_dir.glob("*.txt"))) > 50
    assert all(len(s["sha256"]) == 64 for s in meta["sources"])
    train, val = read_split(shakespeare_data, "train"), read_split(shakespeare_data, "val")
    assert train.dtype == np.uint16 and len(val) == meta["val_tokens"]
    assert len(train) == meta["train_tokens"] > 1_000_000
    assert 0.015 < len(val) / (len(train) + len(val)) < 0.025
    assert train.max() < 512
    # The tokenizer decodes the stored ids back to the real text.
    sp = spm.SentencePieceProcessor(model_file=str(shakespeare_data / "tokenizer.model"))
    text = sp.decode(train[:2000].tolist())
    assert "KING" in text.upper() or "Lord" in text
    # Unigram baseline: entropy of val's own token frequencies, recomputed here in float64.
    counts = np.bincount(val.astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    assert meta["val_unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)


def test_rerun_with_same_inputs_is_a_noop(shakespeare_data, shakespeare_dir):
    before = tree_digest(shakespeare_data)
    mtimes = {p.name: p.stat().st_mtime_ns for p in shakespeare_data.iterdir()}
    out = run_cli("prepare-data", "--input", str(shakespeare_dir), "--output", str(shakespeare_data),
                  "--vocab-size", "512")
    assert "up to date" in out.stdout
    assert tree_digest(shakespeare_data) == before
    assert {p.name: p.stat().st_mtime_ns for p in shakespeare_data.iterdir()} == mtimes


def write_formats(root):
    """The same three documents as .txt files, one .jsonl and one .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 30),
            ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 30),
            ("Friends, Romans, countrymen, lend me your ears;\nI come to bury Caesar, not to praise him.\n" * 30)]
    (root / "txt").mkdir(parents=True)
    for i, doc in enumerate(docs):
        (root / "txt" / f"doc{i}.txt").write_text(doc)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    pq.write_table(pa.table({"text": docs, "id": [0, 1, 2]}), root / "docs.parquet")
    return docs


def test_txt_jsonl_parquet_give_the_same_tokens(tmp_path):
    docs = write_formats(tmp_path / "in")
    tok = None
    streams = {}  # format -> (train segments, val segments)
    for name, inp in [("txt", tmp_path / "in" / "txt"), ("jsonl", tmp_path / "in" / "docs.jsonl"),
                      ("parquet", tmp_path / "in" / "docs.parquet")]:
        out = tmp_path / name
        args = ["prepare-data", "--input", str(inp), "--output", str(out)]
        args += ["--tokenizer", str(tok)] if tok else ["--vocab-size", "300"]
        run_cli(*args)
        tok = tok or out / "tokenizer.model"
        meta = json.loads((out / "meta.json").read_text())
        assert meta["documents"] == 3
        streams[name] = (split_segments(out, "train"), split_segments(out, "val"))
    # In every format, every document is BOS ids EOS, in input order, each token in train or (held out) in val.
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    for name in streams:
        reassemble(*streams[name], [[sp.bos_id()] + sp.encode(d) + [sp.eos_id()] for d in docs])


def test_dtype_follows_vocab_size():
    assert token_dtype(32000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


def batches(tokens, rank, world, global_batch=8, seed=3):
    return TrainBatches(tokens, seq_len=4, global_batch=global_batch, dp_rank=rank, dp_size=world, seed=seed)


def test_ranks_split_each_global_batch_and_cover_an_epoch():
    tokens = np.arange(4 * 40 + 1, dtype=np.uint16)  # 40 windows of 4 tokens
    single = batches(tokens, 0, 1)
    seen = []
    for _ in range(5):  # 5 x 8 = one epoch
        x, y = single.next_batch()
        parts = [batches_at(tokens, r, 2, len(seen) // 8) for r in range(2)]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), x.numpy())
        assert np.array_equal(y.numpy(), x.numpy() + 1)  # targets are inputs shifted by one token
        seen.extend(x[:, 0].tolist())
    assert sorted(seen) == list(range(0, 160, 4))  # each window exactly once per epoch


def batches_at(tokens, rank, world, index):
    b = batches(tokens, rank, world)
    for _ in range(index):
        b.next_batch()
    return [t.numpy() for t in b.next_batch()]


def test_resume_continues_with_the_exact_next_batch():
    tokens = np.arange(4 * 13 + 1, dtype=np.uint16)  # 13 windows: batches straddle epochs
    a = batches(tokens, 1, 2, global_batch=6)
    for _ in range(4):
        a.next_batch()
    b = batches(tokens, 1, 2, global_batch=6)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(5):
        xa, _ = a.next_batch()
        xb, _ = b.next_batch()
        assert np.array_equal(xa.numpy(), xb.numpy())


def test_eval_windows_are_fixed_and_sharded():
    tokens = np.arange(101, dtype=np.uint16)
    assert list(eval_windows(tokens, 10, 100, 0, 1)) == list(range(10))
    assert list(eval_windows(tokens, 10, 6, 1, 2)) == [1, 3, 5]


def test_damaged_output_is_rebuilt_not_skipped(shakespeare_data, shakespeare_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shakespeare_data, copy)
    meta = json.loads((copy / "meta.json").read_text())
    with open(split_files(copy, meta, "train")[0], "r+b") as f:
        f.truncate(1000)
    out = run_cli("prepare-data", "--input", str(shakespeare_dir), "--output", str(copy), "--vocab-size", "512")
    assert "up to date" not in out.stdout
    for split in ("train", "val"):
        assert np.array_equal(read_split(copy, split), read_split(shakespeare_data, split))


def test_byte_order_marks_and_upper_case_suffixes(tmp_path):
    text = "Once more unto the breach, dear friends, once more;\n" * 40
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "A.TXT").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "in" / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps({"text": text}) + "\n").encode())
    run_cli("prepare-data", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--vocab-size", "300")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["documents"] == 2
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    train = read_split(tmp_path / "out", "train")
    assert "\ufeff" not in sp.decode(train.tolist())
