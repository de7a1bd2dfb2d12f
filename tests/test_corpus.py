"""Reading corpora: every input format (.txt/.jsonl/.json, each plain, .gz or .zst, and parquet) gives the documents
the json module / pyarrow read from the same data, prepare-data turns each into the same tokens as sentencepiece
itself, reading streams in bounded memory, and a damaged file fails with one line naming file and line."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard
from helpers import tree_digest

from normtron.trainer.cli import main
from normtron.trainer.data.corpus import find_corpus_files, iter_documents, read_documents
from normtron.trainer.data.format import read_meta, split_files
from normtron.trainer.errors import UserError


@pytest.fixture(scope="module")
def documents(shakespeare_dir) -> list[str]:
    """~300 real paragraphs (and one with non-ASCII text), each a document."""
    docs = []
    for path in sorted(shakespeare_dir.glob("*.txt"))[:3]:
        docs += [p.strip("\n") for p in path.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 40]
    return docs[:300] + ["Ça va? Grüße — ünïcödé «quotes» 漢字 and an emoji 🎭"]


def jsonl_bytes(docs: list[str], key: str = "text") -> bytes:
    return "".join(json.dumps({"id": i, key: d}) + "\n" for i, d in enumerate(docs)).encode()


def zstd_frames(data: bytes, frames: int = 3) -> bytes:
    """Several concatenated zstd frames, as `zstd` writes for concatenated files."""
    step = len(data) // frames + 1
    return b"".join(zstandard.ZstdCompressor().compress(data[i:i + step]) for i in range(0, len(data), step))


def write_corpus(root: Path, fmt: str, docs: list[str]) -> Path:
    """`docs` as one input of format `fmt` (a file, or a directory of .txt/.txt.gz/.txt.zst files)."""
    root.mkdir(parents=True)
    if fmt.startswith("txt"):
        compress = {"txt": lambda b: b, "txt.gz": gzip.compress, "txt.zst": zstd_frames}[fmt]
        for i, doc in enumerate(docs):  # nested folders: directories are searched recursively
            (root / f"part{i % 2}").mkdir(exist_ok=True)
            (root / f"part{i % 2}" / f"doc{i:04d}.{fmt}").write_bytes(compress(doc.encode()))
        return root
    path = root / f"docs.{fmt}"
    if fmt == "parquet":  # small row groups: reading crosses several
        pq.write_table(pa.table({"id": list(range(len(docs))), "content": docs}), path, row_group_size=64)
    else:
        data = jsonl_bytes(docs)
        path.write_bytes({"gz": gzip.compress, "zst": zstd_frames}.get(fmt.rsplit(".", 1)[-1], lambda b: b)(data))
    return path


FORMATS = ["jsonl", "json", "json.gz", "jsonl.gz", "jsonl.zst", "json.zst", "parquet", "txt", "txt.gz", "txt.zst"]


def text_key(fmt: str) -> str:
    return "content" if fmt == "parquet" else "text"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_documents_of_plain_jsonl(fmt, documents, tmp_path):
    reference = write_corpus(tmp_path / "plain", "jsonl", documents)
    expected = [json.loads(line)["text"] for line in reference.read_text(encoding="utf-8").splitlines()]
    assert expected == documents
    inp = write_corpus(tmp_path / fmt, fmt, documents)
    files = find_corpus_files([inp])
    got = [doc for f in files for doc in read_documents(f, text_key=text_key(fmt))]
    if fmt.startswith("txt"):  # one document per file, files in sorted path order
        order = sorted(range(len(documents)), key=lambda i: (i % 2, i))
        expected = [documents[i] for i in order]
    assert got == expected


@pytest.mark.parametrize("fmt", ["jsonl.zst", "parquet"])
def test_index_ranges_split_a_file_in_order(fmt, documents, tmp_path):
    path = write_corpus(tmp_path / fmt, fmt, documents)
    whole = list(iter_documents(path, text_key(fmt)))
    assert [i for i, _ in whole] == list(range(len(documents))) and [d for _, d in whole] == documents
    cuts = [0, 1, 63, 64, 150, 250, len(documents)]  # across parquet row groups
    pieces = [list(iter_documents(path, text_key(fmt), a, b)) for a, b in zip(cuts, cuts[1:])]
    assert [item for piece in pieces for item in piece] == whole
    assert list(iter_documents(path, text_key(fmt), 250)) == whole[250:]


@pytest.mark.parametrize("fmt", ["jsonl.zst", "jsonl.gz"])
def test_compressed_reading_streams(fmt, tmp_path):
    """Python memory at any moment is a small multiple of one line, whatever the file's size (~24 MB here)."""
    line = json.dumps({"text": "All the world's a stage, and all the men and women merely players. " * 3}) + "\n"
    data = (line * 100_000).encode()
    path = tmp_path / f"big.{fmt}"
    path.write_bytes(zstd_frames(data, 5) if fmt.endswith("zst") else gzip.compress(data, compresslevel=1))
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_documents(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 100_000
    assert peak < 6_000_000, f"reading {len(data) / 1e6:.0f} MB peaked at {peak / 1e6:.1f} MB"


@pytest.mark.parametrize("fmt", ["json.gz", "jsonl.zst", "parquet", "txt.gz"])
def test_prepared_tokens_equal_sentencepiece(fmt, documents, shakespeare_data, tmp_path):
    """prepare-data on each format stores exactly sentencepiece's BOS ids EOS of every document (as a multiset over
    train + val, which holds whatever the split)."""
    tok = shakespeare_data / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    expected = np.bincount(np.concatenate([[sp.bos_id(), *sp.encode(d), sp.eos_id()] for d in documents]),
                           minlength=sp.get_piece_size())
    inp = write_corpus(tmp_path / "in", fmt.replace("parquet", "jsonl"), documents)  # parquet's key is 'content'
    if fmt == "parquet":
        inp = inp.with_suffix(".parquet")
        pq.write_table(pa.table({"text": documents}), inp, row_group_size=64)
        (tmp_path / "in" / "docs.jsonl").unlink()
    assert main(["prepare-data", "--input", str(inp), "--output", str(tmp_path / "out"), "--tokenizer", str(tok)]) == 0
    meta = read_meta(tmp_path / "out")
    assert meta["documents"] == len(documents)
    stored = np.concatenate([np.fromfile(f, dtype=meta["dtype"]) for split in ("train", "val")
                             for f in split_files(tmp_path / "out", meta, split)]).astype(np.int64)
    assert np.array_equal(np.bincount(stored, minlength=sp.get_piece_size()), expected)


def damage(root: Path, documents: list[str]) -> dict[str, tuple[Path, str]]:
    """Damaged inputs -> (file, what the error must say)."""
    root.mkdir()
    data = jsonl_bytes(documents)
    out = {}
    gz, zst = gzip.compress(data), zstd_frames(data, 1)
    (root / "cut.jsonl.gz").write_bytes(gz[:len(gz) * 2 // 3])
    out["truncated gzip"] = (root / "cut.jsonl.gz", "truncated or corrupt: its gzip stream breaks off after line")
    (root / "cut.jsonl.zst").write_bytes(zst[:len(zst) * 2 // 3])
    out["truncated zstd"] = (root / "cut.jsonl.zst", "truncated or corrupt: its zstd stream breaks off after line")
    lines = data.splitlines(keepends=True)
    (root / "latin1.jsonl").write_bytes(b"".join(lines[:6]) + '{"text": "café"}\n'.encode("latin-1") + lines[6])
    out["bad UTF-8"] = (root / "latin1.jsonl", "line 7 is not valid UTF-8 (byte 0xe9 at offset 13)")
    (root / "broken.json").write_bytes(b"".join(lines[:11]) + b'{"text": "unterminated\n' + lines[11])
    out["broken JSON"] = (root / "broken.json", "line 12 is not valid JSON (Unterminated string starting at column 10)")
    (root / "array.json").write_text(json.dumps([{"text": d} for d in documents[:3]], indent=2))
    out["JSON array"] = (root / "array.json", "line 1 is not valid JSON")
    (root / "key.jsonl").write_bytes(jsonl_bytes(documents[:3], key="body"))
    out["other key"] = (root / "key.jsonl", "line 1 has no string field 'text' (its fields: id, body); pass --text-key")
    (root / "bad.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"not zstd at all" * 10)
    out["corrupt zstd"] = (root / "bad.txt.zst", "truncated or corrupt: its zstd stream breaks off after 0 bytes")
    return out


def test_damaged_inputs_fail_with_one_line(documents, shakespeare_data, tmp_path, capsys):
    """Through the CLI: exit 2, one `normtron: error:` line naming the file and line, and an existing prepared
    output stays as it was."""
    out, tok = tmp_path / "out", str(shakespeare_data / "tokenizer.model")
    good = write_corpus(tmp_path / "good", "jsonl", documents[:50])
    assert main(["prepare-data", "--input", str(good), "--output", str(out), "--tokenizer", tok]) == 0
    before = tree_digest(out)
    for problem, (path, message) in damage(tmp_path / "bad", documents).items():
        capsys.readouterr()
        code = main(["prepare-data", "--input", str(path), "--output", str(out), "--tokenizer", tok])
        err = capsys.readouterr().err.strip()
        assert code == 2, (problem, err)
        assert err.startswith("normtron: error: ") and "\n" not in err, (problem, err)
        assert str(path) in err and message in err, (problem, err)
        assert tree_digest(out) == before, problem


def test_unknown_files_are_refused(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"notes.csv is not a .txt/.jsonl/.json \(optionally .gz or .zst\) or "
                                        r".parquet file"):
        find_corpus_files([tmp_path / "notes.csv"])
    with pytest.raises(UserError, match="no .txt/.jsonl/.json"):
        find_corpus_files([tmp_path])
