"""One writer per run directory: an advisory flock on RUN/.lock, held by rank 0 for the whole job.

The kernel drops a flock when its process dies, however it dies, so a crashed or SIGKILLed run never leaves a lock
that blocks its re-run; the pid and host in the file only serve the message of the writer that is turned away.
Under torchrun only rank 0 takes it: when it stops with that message, the agent ends the job's other workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from normtron.trainer.errors import UserError

LOCK_FILE = ".lock"


def holder(run_dir: Path) -> str | None:
    """"pid N on host H" when another process holds the run's lock, else None (takes and releases it to see)."""
    path = run_dir / LOCK_FILE
    if not path.is_file():
        return None
    with open(path, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(path)
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def run_lock(run_dir: Path, take: bool = True) -> Iterator[None]:
    """Hold RUN/.lock while the block runs (`take=False`: the ranks other than 0, which hold nothing). A second
    writer gets a UserError naming the holder; a run directory this call created is removed again when the block
    fails before anything else was written into it."""
    if not take:
        yield
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir} is in use by another run ({_describe(path)}); wait for it to finish, stop "
                            f"it, or choose another run.name") from None
        f.seek(0)
        previous, times = f.read(), os.stat(path)
        _write(f, f"pid {os.getpid()} on host {socket.gethostname()}\n")
        try:
            yield
        except BaseException:
            if created and {p.name for p in run_dir.iterdir()} == {LOCK_FILE}:
                path.unlink()
                run_dir.rmdir()
            elif not created:  # a run that failed leaves the directory as it found it, lock file included
                _write(f, previous)
                os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
            raise
    finally:
        f.close()  # releases the lock


def _write(f, text: str) -> None:
    f.seek(0)
    f.truncate()
    f.write(text)
    f.flush()


def _describe(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "a process that has not written its pid yet"
