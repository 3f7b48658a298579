"""One writer at a time: an exclusive lock on a file beside what is being written.

    with hold_lock(lock_path_for(out), f"the output {out}"):
        ...   # a second process asking for the same lock is refused, naming this one

The lock is `fcntl.flock` on the lock file: the kernel releases it when the process exits, however it
exits (a crash or SIGKILL included), so a stale lock never blocks the next run. The file holds who took
the lock (pid, host, start time) for the refusal message, and is removed on release. Used by `aligndata
convert` for its output and by `aligntrain` for its run directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from aligndata.errors import InputError


class LockHeld(InputError):
    """Another live process holds the lock (exit code 2): run again when it is done, or write elsewhere."""


def lock_path_for(target: Path) -> Path:
    """The lock file of a file or directory: hidden, beside it (inside it could be replaced with it)."""
    return target.parent / f".{target.name}.lock"


@contextmanager
def hold_lock(path: Path, what: str, advice: str = "wait for it to finish, or write elsewhere") -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the duration of the block.

    Raises LockHeld at once, naming `what`, the holder and `advice`, when another process has it: waiting
    would hide that two runs were started on the same target, which is usually a mistake. The parent
    directory must exist.
    """
    fd = _acquire(Path(path), what, advice)
    try:
        yield
    finally:
        try:
            os.unlink(path)  # while still holding it: a process waiting on this file retries on the new one
        except OSError:
            pass
        os.close(fd)  # releases the lock


def _acquire(path: Path, what: str, advice: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockHeld(f"{what} is being written by another run ({holder}); {advice}") from None
        except BaseException:
            os.close(fd)
            raise
        # The holder we waited on may have removed the file before we locked it: then our lock is on a
        # file nobody else will open. Lock the file that is at `path` now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            _write_holder(fd)
            return fd
        os.close(fd)


def _write_holder(fd: int) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data + b"\n", 0)


def _holder(fd: int) -> str:
    """Who holds the lock, as the holder wrote it (it may not have written it yet)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "a process that has not said who it is yet"
