"""One training at a time per run directory: an exclusive lock on RUN/.lock.

    with hold_run_lock(run_dir):      # LockHeld (exit 2, naming pid, host and start) if another run holds it
        ...train...

The lock is aligndata's (`aligndata.write.lock.hold_lock`, the one convert takes on its output): the
kernel drops it when the holder exits, however it exits.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from aligndata.write.lock import hold_lock

from .config import ConfigError

LOCK_FILE = ".lock"
# What a run directory of ours holds (trainer, checkpoint, metrics): one of them marks it as ours.
RUN_MARKS = (LOCK_FILE, "config.yaml", "metrics.jsonl", "checkpoints")


@contextlib.contextmanager
def hold_run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run directory's lock for the block; creates the directory (removed again if the block
    leaves nothing in it)."""
    run_dir = Path(run_dir)
    check_is_run_dir(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    try:
        with hold_lock(path, f"{run_dir}: this run directory", "wait for it to end or choose another output_dir"):
            yield path
    finally:
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()


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
