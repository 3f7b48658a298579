"""aligndata.write.workers: ordered results from worker processes and the main process, errors, no deadlock."""

from __future__ import annotations

import os
import signal
import time

import pytest

from aligndata.write.workers import WorkerGroup, WorkerLost, ordered

_STATE: dict[str, int] = {}


def _square(x: int) -> tuple[int, int, int]:
    time.sleep(0.002)  # long enough for the workers to be busy when the next job comes
    return x, x * x, os.getpid()


def _echo(blob: bytes) -> bytes:
    return blob[::-1] + blob  # twice as large going back


def _fail_on(x: int) -> int:
    if x == 5:
        raise ValueError(f"bad job {x}")
    return x


def _die_on(x: int) -> int:
    if x >= 3 and os.getpid() != _STATE["main"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def _set_offset(value: int) -> None:
    _STATE["offset"] = value


def _add_offset(x: int) -> int:
    return x + _STATE.get("offset", 0)


def _learn(x: int) -> tuple[int, bool]:
    """A job that is faster when the answer was shared: reports whether it had to compute it."""
    known = _STATE.setdefault("known", {})
    shared = x in known
    known[x] = x * x
    _STATE.setdefault("new", []).append(x)
    return known[x], shared


def _export() -> list[int]:
    new, _STATE["new"] = _STATE.get("new", []), []
    return new


def _import(items: list[int]) -> None:
    known = _STATE.setdefault("known", {})
    for x in items:
        known[x] = x * x


def _broken_initializer() -> None:
    raise RuntimeError("cannot load the tokenizer")


def test_results_come_in_input_order_from_workers_and_this_process():
    with WorkerGroup(2) as group:
        out = list(ordered(group, _square, range(200), depth=2))
    assert [(x, y) for x, y, _ in out] == [(x, x * x) for x in range(200)]
    pids = {pid for _, _, pid in out}
    assert os.getpid() in pids and len(pids) == 3  # the main process took jobs too


def test_the_initializer_runs_in_every_worker():
    _STATE.pop("offset", None)
    with WorkerGroup(2, _set_offset, (1000,)) as group:
        tickets = [group.submit(_add_offset, (i,)) for i in range(6)]
        assert [t.get() for t in tickets] == [1000 + i for i in range(6)]


def test_messages_larger_than_the_pipe_do_not_deadlock():
    blobs = [bytes([i]) * (3 << 20) for i in range(6)]  # 3 MiB out, 6 MiB back: beyond any pipe
    with WorkerGroup(1) as group:
        capacity = group.workers[0].capacity
        out = list(ordered(group, _echo, blobs, depth=3))
    assert capacity >= 1 << 12
    assert out == [_echo(b) for b in blobs]


def test_an_exception_in_a_worker_is_raised_in_its_turn():
    seen = []
    with WorkerGroup(1) as group:
        with pytest.raises(ValueError, match="bad job 5"):
            for x in ordered(group, _fail_on, range(20), depth=2):
                seen.append(x)
    assert seen == [0, 1, 2, 3, 4]


def test_a_killed_worker_is_an_error_not_a_hang():
    _STATE["main"] = os.getpid()
    with WorkerGroup(1) as group:
        with pytest.raises(WorkerLost, match="killed by SIGKILL, perhaps out of memory"):
            list(ordered(group, _die_on, range(40), depth=2))


def test_a_failing_initializer_is_raised_in_the_main_process():
    with WorkerGroup(1, _broken_initializer) as group:
        ticket = group.submit(_square, (2,))
        with pytest.raises(RuntimeError, match="cannot load the tokenizer"):
            ticket.get()


def test_submit_respects_depth_and_leaves_the_job_to_the_caller():
    with WorkerGroup(1) as group:
        first = group.submit(_square, (1,), depth=1)
        second = group.submit(_square, (2,), depth=1)  # None unless the first was answered in between
        assert first is not None and first.get()[:2] == (1, 1)
        assert second is None or second.get()[:2] == (2, 4)
        third = group.submit(_square, (3,), depth=1)
        assert third is not None and third.get()[:2] == (3, 9)


def test_what_one_process_exports_reaches_the_others():
    jobs = [i % 10 for i in range(200)]  # ten values, each asked twenty times
    fresh = {}
    for exchange in (None, (_export, _import)):
        _STATE.clear()
        with WorkerGroup(1, exchange=exchange) as group:
            out = list(ordered(group, _learn, jobs, depth=2))
        assert [value for value, _ in out] == [x * x for x in jobs]
        fresh[exchange is not None] = [i for i, (_, shared) in enumerate(out) if not shared]
    assert sorted({jobs[i] for i in fresh[True]}) == list(range(10))  # each value computed at least once
    assert len(fresh[True]) < len(fresh[False])  # without the exchange both processes compute most values
    assert max(fresh[True]) < 30  # after a few jobs every value is known in both processes
    assert set(_STATE["known"]) == set(range(10))  # the main process imported what the worker learnt
