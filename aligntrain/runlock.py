"""One training at a time per run directory: an exclusive lock on RUN/.lock.

    with hold_run_lock(run_dir):      # RunLocked (exit 2, naming pid, host and start) if another run holds it
        ...train...

The lock is `fcntl.flock` on an open file, so the kernel drops it when the holder exits, however it
exits (a crash, SIGKILL, a lost node's process). The file itself is left in place: deleting a lock file
that another process may have just opened would let two holders lock two different files. Its content
(pid, host, start time) is only what the next run prints when it is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from aligndata.errors import InputError

from .config import ConfigError

LOCK_FILE = ".lock"
# What a run directory of ours holds (trainer, checkpoint, metrics): one of them marks it as ours.
RUN_MARKS = (LOCK_FILE, "config.yaml", "metrics.jsonl", "checkpoints")


class RunLocked(InputError):
    """Another process is training into this run directory (exit 2)."""


@contextlib.contextmanager
def hold_run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run directory's lock for the block; creates the directory (removed again if the block
    leaves nothing in it but the lock)."""
    run_dir = Path(run_dir)
    check_is_run_dir(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{run_dir}: another training is writing into this run directory "
                            f"({_holder(fd)}); wait for it to end or choose another output_dir") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield path
        finally:
            if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
                path.unlink()
                run_dir.rmdir()
    finally:
        os.close(fd)  # releases the lock


def check_is_run_dir(run_dir: Path) -> None:
    """output_dir must be new, empty, or a run of ours: training never writes into someone's files."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"key 'output_dir': {run_dir} is a file, not a directory")
    names = {p.name for p in run_dir.iterdir()}
    if names and not names & set(RUN_MARKS):
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise ConfigError(f"key 'output_dir': {run_dir} is not empty and is not a training run ({shown}); "
                          "choose a new directory for the run")


def _holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "its holder has not written its name yet"
