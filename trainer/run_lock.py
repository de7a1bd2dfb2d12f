"""One writer per run directory: an advisory flock on RUN/.lock, held by rank 0 for the whole job.

The kernel drops a flock when its process dies, however it dies, so a crashed or SIGKILLed run never leaves a lock
that blocks its re-run; the pid and host in the file only serve the message of the writer that is turned away.
Under torchrun only rank 0 takes it: when it stops with that message, the agent ends the job's other workers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from normtron.trainer.errors import UserError

LOCK_FILE = ".lock"
# flock is not supported here (Lustre mounted noflock, some FUSE and old NFS mounts)
NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}


def holder(run_dir: Path) -> str | None:
    """"pid N on host H" when a run holds the run's lock, else None. Looks with a shared lock, which clashes with the
    run's exclusive one but not with other lookers (every node of a job runs `train --check` at once)."""
    path = run_dir / LOCK_FILE
    if not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(path)
        except OSError as err:
            if err.errno in NO_FLOCK:
                return None
            raise
    return None


def in_use(run_dir: Path, holder_text: str) -> UserError:
    """The one line for a run directory another run holds (the run's own start and `train --check` alike)."""
    return UserError(f"{run_dir} is in use by another run ({holder_text}); wait for it to finish, stop it, or choose "
                     f"another run.name (if that host is down, remove {run_dir / LOCK_FILE})")


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
    f = _locked(path, run_dir)
    try:
        previous = ""
        if f is not None:
            f.seek(0)
            previous, times = f.read(), os.stat(path)
            _write(f, f"pid {os.getpid()} on host {socket.gethostname()}\n")
        try:
            yield
        except BaseException:
            if created and {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
                # unlinked while still held: a process that opened it meanwhile finds it gone and retries
                path.unlink(missing_ok=True)
                run_dir.rmdir()
            elif f is not None and not created:  # a failed run leaves the directory as it found it
                _write(f, previous)
                os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
            raise
    finally:
        if f is not None:
            f.close()  # releases the lock


def _locked(path: Path, run_dir: Path):
    """The lock file, open and exclusively locked; None where the file system has no flock (a one-line warning)."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise in_use(run_dir, _describe(path)) from None
        except OSError as err:
            f.close()
            if err.errno not in NO_FLOCK:
                raise
            print(f"warning: {run_dir} is on a file system without flock ({err.strerror}): nothing stops a second "
                  f"run from writing into it at the same time", file=sys.stderr, flush=True)
            return None
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()  # locked a file a failed start had just removed: take the one that is there now


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
