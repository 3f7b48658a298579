"""Benchmark processes in turn on one GPU, the next ones getting ready on the host meanwhile.

Every measurement runs in a fresh process, and most of such a process is start-up on the host: imports,
building or loading a model, tokenizing the data (TRL's anchor initialises each model on the CPU and saves
and loads it, twice for DPO). Run one after another, the start-ups add up to most of a suite. Here the jobs
run on the GPU one at a time, in their order, while the next few prepare:

- a job starts preparing on the upper half of the host's cores (BENCH_GATE, gate.py), at most `preparing`
  at a time, never two of one `key` (jobs of a key write the same files: the anchor's model directory);
- it says "ready" where its work on the GPU would begin and waits until every earlier job has ended;
- while the running job says its timed part lasts ("timed" .. "untimed" or its end), every job still
  preparing is stopped (SIGSTOP, its whole process group), so the timed steps have the host to themselves,
  as in a run alone. Jobs waiting for their turn do nothing meanwhile.

So a suite takes about the sum of its jobs' GPU parts, and every timed step is measured as before.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gate import ENV

PREPARING, READY, RUNNING, DONE = "preparing", "ready", "running", "done"


@dataclass
class Job:
    """One process: `command`, named `label`; jobs of one `key` never prepare at the same time."""
    command: list[str]
    label: str
    key: str
    env: dict[str, str] | None = None


@dataclass
class Outcome:
    """How a job ended: exit status, output, and its process's time: all, preparing, waiting for its turn."""
    job: Job
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    prepare_s: float | None  # start to "ready" (None: it ended before)
    wait_s: float  # "ready" to its turn
    messages: list[str] = field(default_factory=list)  # what it said, in order (ready, timed, untimed)


@dataclass
class _Proc:
    job: Job
    popen: subprocess.Popen
    status: int  # the child's messages
    answer: int  # our answers
    out: Path
    err: Path
    started: float
    state: str = PREPARING
    ready_at: float | None = None
    went_at: float | None = None
    stopped: bool = False
    buffer: bytes = b""
    messages: list[str] = field(default_factory=list)


def host_cores() -> tuple[list[int], list[int]]:
    """(every core this process may use, the cores preparing jobs get: the upper half, or all of few)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return cores, cores[len(cores) // 2:] if len(cores) >= 4 else cores


def run_jobs(jobs: list[Job], preparing: int = 2, alive: int = 4, on_done: Callable[[Outcome], None] | None = None,
             watchdog_s: float = 300.0) -> list[Outcome]:
    """Run `jobs` as the module says; their outcomes in order (`on_done` is called as each ends). `alive`
    bounds the processes started and not ended (each may hold a model on the GPU while it waits);
    `watchdog_s`: a timed part longer than this lets the stopped jobs go on (a stopped job may hold a lock)."""
    cores, prep_cores = host_cores()
    outcomes: list[Outcome | None] = [None] * len(jobs)
    procs: dict[int, _Proc] = {}
    selector = selectors.DefaultSelector()
    head = 0
    timed_since: float | None = None
    previous = signal.getsignal(signal.SIGTERM)
    stop: list[int] = []  # `timeout` stopping the suite ends its jobs too (finally below), from a point where
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))  # every job started is in procs
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        try:
            while head < len(jobs):
                if stop:
                    raise SystemExit(128 + stop[0])
                _start_what_may(jobs, procs, head, preparing, alive, Path(tmp), cores, prep_cores, selector)
                turn = procs.get(head)
                if turn is not None and turn.state == READY:
                    turn.state, turn.went_at = RUNNING, time.perf_counter()
                    _answer(turn)
                for key, _ in selector.select(timeout=0.05):
                    proc = key.data
                    for message in _read_messages(proc, selector):
                        timed_since = _handle(message, proc, procs, timed_since)
                if timed_since is not None and time.perf_counter() - timed_since > watchdog_s:
                    print(f"benchmark pipeline: a timed part has lasted over {watchdog_s:.0f} s; "
                          "the jobs preparing go on", file=sys.stderr, flush=True)
                    _resume(procs)
                    timed_since = None
                for index, proc in list(procs.items()):
                    if proc.state != DONE and proc.popen.poll() is not None:
                        for message in _read_messages(proc, selector, final=True):
                            timed_since = _handle(message, proc, procs, timed_since)
                        if proc.state == RUNNING:  # its timed part, if any, is over
                            _resume(procs)
                            timed_since = None
                        outcomes[index] = _finish(proc, selector)
                while head < len(jobs) and outcomes[head] is not None:
                    if on_done is not None:
                        on_done(outcomes[head])
                    head += 1
        finally:
            for proc in procs.values():
                if proc.state != DONE:
                    _signal(proc, signal.SIGCONT)
                    _signal(proc, signal.SIGKILL)
                    proc.popen.wait()
            selector.close()
            signal.signal(signal.SIGTERM, previous)
    if stop:  # asked to stop after the last job ended
        raise SystemExit(128 + stop[0])
    return outcomes  # type: ignore[return-value]



def _start_what_may(jobs, procs, head, preparing, alive, tmp, cores, prep_cores, selector) -> None:
    for index in range(head, len(jobs)):
        if index in procs:
            continue
        live = [p for p in procs.values() if p.state != DONE]
        busy = [p for p in live if p.state == PREPARING]
        if index != head and (len(live) >= alive or len(busy) >= preparing):
            return
        if any(p.job.key == jobs[index].key for p in busy):
            continue  # a later job of another key may start meanwhile
        procs[index] = _spawn(jobs[index], tmp / str(index), cores, prep_cores, selector)


def _spawn(job: Job, folder: Path, cores: list[int], prep_cores: list[int], selector) -> _Proc:
    folder.mkdir(parents=True)
    status_r, status_w = os.pipe()
    answer_r, answer_w = os.pipe()
    env = dict(os.environ if job.env is None else job.env)
    env[ENV] = f"{status_w},{answer_r},{' '.join(map(str, cores))}"
    out, err = folder / "stdout", folder / "stderr"

    def pin() -> None:
        if prep_cores:
            os.sched_setaffinity(0, prep_cores)

    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        popen = subprocess.Popen(job.command, stdout=stdout, stderr=stderr, env=env, pass_fds=(status_w, answer_r),
                                 start_new_session=True, preexec_fn=pin if prep_cores else None)
    os.close(status_w)
    os.close(answer_r)
    os.set_blocking(status_r, False)
    proc = _Proc(job, popen, status_r, answer_w, out, err, time.perf_counter())
    selector.register(status_r, selectors.EVENT_READ, proc)
    return proc


def _read_messages(proc: _Proc, selector, final: bool = False) -> list[str]:
    """Whole lines the child has written (at its end: everything left)."""
    while True:
        try:
            chunk = os.read(proc.status, 4096)
        except BlockingIOError:
            break
        if not chunk:
            if proc.status in selector.get_map():
                selector.unregister(proc.status)
            break
        proc.buffer += chunk
    *lines, proc.buffer = proc.buffer.split(b"\n")
    if final and proc.buffer:
        lines.append(proc.buffer)
        proc.buffer = b""
    return [line.decode() for line in lines if line]


def _handle(message: str, proc: _Proc, procs: dict[int, _Proc], timed_since: float | None) -> float | None:
    proc.messages.append(message)
    if message == "ready":
        proc.state, proc.ready_at = READY, time.perf_counter()
    elif message == "timed":
        for other in procs.values():
            if other.state == PREPARING and not other.stopped:
                _signal(other, signal.SIGSTOP)
                other.stopped = True
        _answer(proc)
        return time.perf_counter()
    elif message == "untimed":
        _resume(procs)
        return None
    return timed_since


def _resume(procs: dict[int, _Proc]) -> None:
    for proc in procs.values():
        if proc.stopped:
            _signal(proc, signal.SIGCONT)
            proc.stopped = False


def _answer(proc: _Proc) -> None:
    try:
        os.write(proc.answer, b"g")
    except OSError:  # it has ended; its exit is seen next
        pass


def _signal(proc: _Proc, sig: int) -> None:
    try:
        os.killpg(proc.popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _finish(proc: _Proc, selector) -> Outcome:
    if proc.status in selector.get_map():
        selector.unregister(proc.status)
    os.close(proc.status)
    os.close(proc.answer)
    _signal(proc, signal.SIGKILL)  # what it left running in its group (its process has ended)
    proc.state = DONE
    ended = time.perf_counter()
    return Outcome(proc.job, proc.popen.returncode, proc.out.read_text(errors="replace"),
                   proc.err.read_text(errors="replace"), ended - proc.started,
                   None if proc.ready_at is None else proc.ready_at - proc.started,
                   0.0 if proc.went_at is None or proc.ready_at is None else proc.went_at - proc.ready_at,
                   proc.messages)
