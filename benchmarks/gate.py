"""The measured process's side of pipeline.py: where it may run on the GPU, and where its timed part is.

A process started by pipeline.run_jobs gets BENCH_GATE ("write_fd,read_fd,cores"): a pipe to the scheduler,
one back, and the cores it may use once it runs. It prepares on a few of the host's cores (imports, models,
data), then

    ready()    "ready": it waits for its turn on the GPU; then it may use every core
    timed()    "timed": its timed part begins once the scheduler has stopped every process still preparing
    untimed()  "untimed": the timed part is over; they may go on

Without BENCH_GATE (a run on its own) the three do nothing.
"""

from __future__ import annotations

import contextlib
import os
import time

ENV = "BENCH_GATE"
_state = {"gone": False, "waited": 0.0}


def _fds() -> tuple[int, int, set[int]] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    write_fd, read_fd, cores = spec.split(",", 2)
    return int(write_fd), int(read_fd), {int(c) for c in cores.split()}


def _say(word: str, wait: bool) -> None:
    fds = _fds()
    if fds is None:
        return
    os.write(fds[0], (word + "\n").encode())
    if wait and not os.read(fds[1], 1):  # the scheduler answers one byte; nothing: it is gone
        raise SystemExit(f"benchmark pipeline: no answer to {word!r} (the scheduler stopped)")


def ready() -> None:
    """Wait for this process's turn on the GPU (once; later calls return at once), then use every core."""
    if _state["gone"]:
        return
    started = time.perf_counter()
    _say("ready", wait=True)
    _state["gone"], _state["waited"] = True, time.perf_counter() - started
    fds = _fds()
    if fds is not None and hasattr(os, "sched_setaffinity"):
        for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
            try:
                os.sched_setaffinity(int(tid), fds[2])
            except OSError:  # a thread that has just ended
                pass


def waited() -> float:
    """Seconds ready() waited for the turn (0 before it has, or without a pipeline)."""
    return _state["waited"]


def timed() -> None:
    """The timed part begins: returns once nothing else prepares on the host."""
    ready()
    _say("timed", wait=True)


def untimed() -> None:
    """The timed part is over."""
    _say("untimed", wait=False)


@contextlib.contextmanager
def timed_turn():
    """A block run on this process's turn on the GPU (ready) as a timed part of its own (timed), which ends
    with the block however it ends (untimed), so the processes stopped meanwhile go on."""
    ready()
    timed()
    try:
        yield
    finally:
        untimed()
