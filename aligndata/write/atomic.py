"""Files that appear whole or not at all: written under a temporary name, fsynced, renamed into place.

A failed or killed writer therefore leaves the previous file untouched (plus, at worst, a temporary
file that the next writer of the same path removes). A symlink is followed: the file it points to is
replaced and the link stays. What is not a regular file (/dev/null, a FIFO, /dev/stdout) cannot be
replaced without destroying it: it is written in place; a directory, socket or block device is refused.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO

from aligndata.errors import InputError


class AtomicOutput:
    """A text file written line by line under a temporary name and renamed over `path` on commit()."""

    def __init__(self, path: str | Path):
        self.path = Path(os.path.realpath(path))
        self.in_place = special_file(self.path, str(path))
        if self.in_place:  # nothing to rename: written as it goes
            self.tmp = self.path
            self.f: IO[str] = open(self.path, "w", encoding="utf-8")
            return
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(self.path)
        self.f = open(self.tmp, "w", encoding="utf-8")

    def write(self, line: str) -> None:
        self.f.write(line)
        self.f.write("\n")

    def commit(self) -> None:
        self.f.flush()
        if self.in_place:
            self.f.close()
            return
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        if not self.in_place and self.tmp.exists():
            self.tmp.unlink()


def special_file(real: Path, given: str) -> bool:
    """True for an existing character device or FIFO (written in place); InputError for an existing target
    that is neither that nor a regular file."""
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return True
    if not stat.S_ISREG(mode):
        raise InputError(f"{given}: exists and is not a regular file (a directory, socket or block device); "
                         "name a file to write")
    return False


def _remove_orphans(path: Path) -> None:
    """Delete temporary files that killed runs left beside `path` (their process is gone)."""
    for tmp in path.parent.glob(f".{path.name}.partial-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # a live process of another user


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory, fsync, then rename over the target."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the renames done in directory `path` survive a power loss.

    Best effort: some systems cannot open or fsync a directory (Windows, some network filesystems).
    The rename itself has happened by then; only its durability is at stake.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
