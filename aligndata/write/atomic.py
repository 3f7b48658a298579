"""Files that appear whole or not at all: written under a temporary name, fsynced, renamed into place.

A failed or killed writer therefore leaves the previous file untouched (plus, at worst, a temporary
file that the next writer of the same path removes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO


class AtomicOutput:
    """A text file written line by line under a temporary name and renamed over `path` on commit()."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(self.path)
        self.f: IO[str] = open(self.tmp, "w", encoding="utf-8")

    def write(self, line: str) -> None:
        self.f.write(line)
        self.f.write("\n")

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        if self.tmp.exists():
            self.tmp.unlink()


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
