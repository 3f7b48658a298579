"""Where `aligndata convert` writes, checked before anything is written.

A conversion replaces its output as a whole (shards: a staging directory renamed over OUT; JSON Lines:
a temporary file renamed over the file). So before a byte is written:
  - the output is something that can be replaced: a named directory for shards (not `.`, `..`, `/` or
    `-`), and, through a symlink, its target;
  - no input, output or rejects file is the same file as another, or lies inside the shard directory
    (it would be overwritten, or deleted with the old output);
  - an existing output directory holds only files a conversion writes: `--overwrite` never deletes
    anything else.
Targets that are not regular files (/dev/null, a FIFO, /dev/stdout) are written in place: see atomic.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from aligndata.errors import InputError
from aligndata.write.shards import INCOMPLETE, MANIFEST, SPLITS

# What a conversion (and `aligntrain precompute-ref`) writes in an output directory besides the shards.
OWN_FILES = {MANIFEST, INCOMPLETE, "rejects.jsonl", ".precompute-ref"}
SIDECARS = {"state.json", "dataset_info.json"}


def shard_output(out: str) -> Path:
    """The directory to write shards into: `out` itself, or the target of a symlink `out` (the link stays)."""
    if out in ("", "-"):
        raise InputError(f"--out {out!r}: shards are a directory of files, not a stream; name a directory")
    real = Path(os.path.realpath(out))
    if Path(out).name in ("", "..") or real.name == "":
        raise InputError(f"--out {out}: name a directory of its own (the output directory is replaced as a "
                         "whole, so it cannot be ., .. or a filesystem root)")
    return real if Path(out).is_symlink() else Path(out)


def refuse_overlaps(inputs: list[str], *, out_dir: Path | None = None, out_file: str | None = None,
                    rejects: str | None = None, eval_file: str | None = None) -> None:
    """InputError (exit 2) when the output file, the rejects file or the eval file is the same file as
    another of them or as an input, or when one of them or an input lies inside the shard directory `out_dir`."""
    named = [("input", p) for p in inputs] + [("--eval-file", eval_file), ("--out", out_file), ("--rejects", rejects)]
    files = [(f"{what} {p}", p) for what, p in named if p is not None and p != "-"]
    seen: dict[tuple[int, int] | str, str] = {}
    for label, path in files:
        if out_dir is not None and Path(os.path.realpath(path)).is_relative_to(os.path.realpath(out_dir)):
            raise InputError(f"{label} is inside the output directory {out_dir}, which a conversion replaces as a "
                             "whole; put it elsewhere")
        key = _identity(path)
        if key is None:
            continue
        earlier = seen.setdefault(key, label)
        if earlier != label and not (earlier.startswith("input ") and label.startswith("input ")):
            raise InputError(f"{earlier} and {label} are the same file; the output, the rejects file and the "
                             "eval file must each be a file of its own")


def _identity(path: str) -> tuple[int, int] | str | None:
    """What makes two paths the same file: device and inode when it exists (hard links too), else the real
    path. None for what is not a regular file (/dev/null twice is harmless and written in place)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return os.path.realpath(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def refuse_foreign_files(out_dir: Path) -> None:
    """InputError listing the files in the existing output directory that no conversion wrote: replacing
    the directory would delete them."""
    foreign = foreign_files(out_dir)
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise InputError(f"{out_dir}: holds files that aligndata did not write ({shown}); replacing the output "
                         "would delete them: move them elsewhere, or choose another --out")


def foreign_files(out_dir: Path) -> list[str]:
    """Paths (relative to `out_dir`; folders end in /) in it that a conversion does not write: its manifest,
    its markers, its rejects file, and in each split folder the shards (named `shard-*.arrow` by the writer)
    and their `datasets` sidecars."""
    foreign = []
    for entry in sorted(os.scandir(out_dir), key=lambda e: e.name):
        if entry.name in SPLITS and entry.is_dir(follow_symlinks=False):
            foreign += [f"{entry.name}/{name}" for name in _foreign_in_split(Path(entry.path))]
        elif entry.name not in OWN_FILES and not _temporary_of(entry.name, OWN_FILES):
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def _foreign_in_split(split_dir: Path) -> list[str]:
    foreign = []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        shard = entry.name.startswith("shard-") and entry.name.endswith(".arrow")
        ours = shard or entry.name in SIDECARS or _temporary_of(entry.name, SIDECARS)
        if not entry.is_file(follow_symlinks=False) or not ours:
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def _temporary_of(name: str, owners: set[str]) -> bool:
    """A temporary file that atomic.py writes for one of `owners` (`.NAME.tmp-PID`), left by a killed run."""
    return any(name.startswith(f".{owner}.tmp-") or name.startswith(f".{owner}.partial-") for owner in owners)
