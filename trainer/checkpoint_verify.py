"""Checkpoint verification: every checkpoint carries `checksums.json` (size and CRC32 of each of its files, written
once the whole checkpoint is on disk), and resume, rollback, conversion and `normtron checkpoint verify` check it.

    write_checksums(dir)      after a save has completed on every rank, before the directory is renamed into place
                              (a separate step so that an asynchronous save can call it when its write is done)
    damaged_files(dir)        one line per damaged file: missing, truncated or failing its checksum; [] when intact

trainer/checkpoint.py uses them: Checkpointer.save, Checkpointer.intact (the fallback) and `normtron checkpoint verify`.

Checkpoints written before checksums.json existed are checked as conversion always checked them: the byte ranges
DCP's .metadata records must exist in its files, and every chunk (a torch.save zip archive) must pass the CRC32s its
zip records carry (torch.load never checks them, so a flipped bit would load silently); DeepSpeed's .pt files are
such archives too.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHECKSUMS = "checksums.json"
_BLOCK = 8 << 20


def file_crc32(path: Path) -> tuple[int, str]:
    """(size, CRC32 as 8 hex digits) of a file, read in blocks (zlib releases the GIL on large blocks)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return size, f"{crc:08x}"


def checkpoint_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def crc32_of_files(files: list[Path]) -> list[tuple[int, str]]:
    """file_crc32 of each file, several files at a time (a checkpoint has one data file per rank or more)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(files)))) as pool:
        return list(pool.map(file_crc32, files))


def write_checksums(path: Path) -> None:
    """Record the size and CRC32 of every file in the checkpoint directory `path` (one process; all ranks' files
    must be complete). Written through a temporary name, so a checksums.json is always whole."""
    found = checkpoint_files(path)
    files = {file.relative_to(path).as_posix(): {"size": size, "crc32": crc}
             for file, (size, crc) in zip(found, crc32_of_files(found))}
    tmp = path / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps({"algorithm": "crc32", "files": files}, indent=0))
    os.replace(tmp, path / CHECKSUMS)


def damaged_files(path: Path) -> list[str]:
    """One line per damaged file of the checkpoint at `path` ("FILE is truncated (...)"); [] when it is intact."""
    manifest = path / CHECKSUMS
    if not manifest.is_file():
        return _unrecorded_damage(path)
    try:
        recorded = json.loads(manifest.read_text())["files"]
        recorded = {name: (int(r["size"]), str(r["crc32"])) for name, r in recorded.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        return [f"{manifest} cannot be read ({' '.join(str(err).split())[:120]})"]
    problems = [f"{path / name} is missing" for name in sorted(recorded) if not (path / name).is_file()]
    present = sorted(name for name in recorded if (path / name).is_file())
    for name, (actual_size, actual_crc) in zip(present, crc32_of_files([path / name for name in present])):
        file, (size, crc) = path / name, recorded[name]
        if actual_size != size:
            problems.append(f"{file} is {'truncated' if actual_size < size else 'longer than written'} "
                            f"({actual_size:,} of {size:,} bytes)")
        elif actual_crc != crc:
            problems.append(f"{file} fails its checksum (crc32 {actual_crc}, written as {crc})")
    return problems


# --- Checkpoints without checksums.json: what their own formats record ------------------------------------------

def _unrecorded_damage(path: Path) -> list[str]:
    if (path / ".metadata").is_file():
        try:
            from torch.distributed.checkpoint import FileSystemReader

            metadata = FileSystemReader(str(path)).read_metadata()
        except (OSError, EOFError, ValueError, RuntimeError, AttributeError, pickle.UnpicklingError) as err:
            return [f"{path / '.metadata'} cannot be read ({' '.join(str(err).split())[:120]})"]
        pieces = [info for info in metadata.storage_data.values()]
        return dcp_size_problems(path, pieces) or dcp_chunk_problems(path, pieces)
    problems = []
    for file in sorted(path.glob("*.pt")):  # DeepSpeed: each file one torch.save archive
        if (bad := _zip_problem(file.read_bytes())) is not None:
            problems.append(f"{file} fails its checksum ({bad})")
    return problems


def dcp_size_problems(path: Path, pieces: list) -> list[str]:
    """Every byte range DCP recorded (`pieces`: its storage_data entries) exists: a missing or truncated .distcp
    file is named."""
    needed: dict[str, int] = {}
    for info in pieces:
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(needed.items()):
        file = path / name
        actual = file.stat().st_size if file.is_file() else -1
        if actual < size:
            problems.append(f"{file} is missing" if actual < 0 else
                            f"{file} is truncated ({actual:,} of at least {size:,} bytes)")
    return problems


def dcp_chunk_problems(path: Path, pieces: list) -> list[str]:
    """The stored CRC32s of every chunk in `pieces`: DCP writes each with torch.save, a zip archive whose records
    carry checksums."""
    problems = []
    for info in pieces:
        with open(path / info.relative_path, "rb") as f:
            f.seek(info.offset)
            bad = _zip_problem(f.read(info.length))
        if bad is not None:
            problems.append(f"{path / info.relative_path} fails its checksum ({bad})")
    return list(dict.fromkeys(problems))  # one line per file


def _zip_problem(data: bytes) -> str | None:
    """Why a torch.save archive is damaged, or None (also for data in another serialization, with no checksums)."""
    chunk = io.BytesIO(data)
    if not zipfile.is_zipfile(chunk):
        return None
    try:
        bad = zipfile.ZipFile(chunk).testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return " ".join(str(err).split())[:120]
    return None if bad is None else f"record {bad}"
