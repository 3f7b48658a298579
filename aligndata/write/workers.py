"""Worker processes driven from the calling thread: each worker has its own pipes, no helper threads.

Why not `multiprocessing.Pool`: its task and result handler threads live in the main process, and the
main process of `convert` is busy encoding chunks itself. A pipe carries 64 KiB at a time, so every
chunk of lines going out and every result coming back takes several reads or writes, and between them
the handler thread waits for the GIL (up to the 5 ms switch interval) while the main thread encodes.
Measured on `bench_convert.py`: the worker sat idle about 8% of the run waiting for its next chunk.
Here the main thread itself writes a job into the worker's pipe and reads results between its own
chunks; on Linux the pipes are widened to 1 MiB so that a job or a result is one write and one read.

No deadlock: a write could block only on a full pipe, so a job goes to a worker only while the bytes
of its unanswered jobs fit in the pipe (or when it has none: then it is reading). A worker that dies
(killed, out of memory) is an error naming its exit status, not a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import signal
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator

from aligndata.errors import InputError

PIPE_BYTES = 1 << 20  # asked for on Linux (the default /proc/sys/fs/pipe-max-size)
DEFAULT_PIPE_BYTES = 1 << 14  # assumed where the size cannot be read (macOS pipes start at 16 KiB)


class WorkerLost(InputError):
    """A worker process exited in the middle of the run (exit code 2, as an I/O error would be)."""


def _pipe_capacity(conn: Any) -> int:
    try:
        import fcntl

        fd = conn.fileno()
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # a lower system limit: keep what the pipe has
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except (ImportError, AttributeError, OSError):  # not Linux
        return DEFAULT_PIPE_BYTES


def _worker_main(jobs: Any, results: Any, initializer: Callable[..., None] | None, initargs: tuple,
                 exchange: "tuple[Callable[..., Any], Callable[..., None]] | None", state: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops us
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException as e:  # noqa: BLE001 - reported by the main process
        _send(results, (-1, False, e, None))
        return
    while True:
        try:
            message = jobs.recv_bytes()
        except (EOFError, OSError):
            return
        if not message:
            return
        seq, fn, args, shared = pickle.loads(message)
        try:
            for payload in shared:
                _call(exchange[1], state, (payload,))
            out = (seq, True, _call(fn, state, args))
        except BaseException as e:  # noqa: BLE001 - raised again in the main process, in its turn
            out = (seq, False, e)
        _send(results, out + (_call(exchange[0], state, ()) if exchange is not None else None,))


def _call(fn: Callable[..., Any], state: Any, args: tuple) -> Any:
    """fn(*args), or fn(state, *args) in a group that has a state."""
    return fn(*args) if state is None else fn(state, *args)


def _send(conn: Any, out: tuple) -> None:
    try:
        data = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001 - an exception that cannot be pickled: send its text
        data = pickle.dumps((out[0], False, RuntimeError(f"{type(out[2]).__name__}: {out[2]} ({e})"), None))
    conn.send_bytes(data)


class Ticket:
    """A job's result to come, with the interface of the pool's AsyncResult (ready, get)."""

    __slots__ = ("_group", "done", "ok", "value")

    def __init__(self, group: "WorkerGroup | None"):
        self._group, self.done, self.ok, self.value = group, False, False, None

    def ready(self) -> bool:
        return self.done

    def get(self) -> Any:
        while not self.done:
            self._group.collect(block=True)
        if not self.ok:
            raise self.value
        return self.value


class _Worker:
    def __init__(self, ctx: Any, initializer: Callable[..., None] | None, initargs: tuple, exchange: Any,
                 state: Any):
        job_r, self.jobs = ctx.Pipe(duplex=False)
        self.results, result_w = ctx.Pipe(duplex=False)
        self.capacity = min(_pipe_capacity(self.jobs), _pipe_capacity(self.results))
        self.process = ctx.Process(target=_worker_main,
                                   args=(job_r, result_w, initializer, initargs, exchange, state), daemon=True)
        self.process.start()
        job_r.close()
        result_w.close()
        self.tickets: dict[int, tuple[Ticket, int]] = {}  # unanswered jobs: seq -> (ticket, bytes sent)
        self.bytes = 0  # of the unanswered jobs
        self.shared: list[Any] = []  # what the others exported since this worker's last job


class WorkerGroup:
    """n worker processes; jobs are (function, args), the functions picklable by name (module-level
    functions, or functions of module-level classes such as ChunkEncoder.encode).

    `initializer(*initargs)` runs first in every worker.

    `state`, when given, is the object the jobs work with (convert: the encoder): every job runs as
    fn(state, *args), in this process with `state` itself and in a worker with its copy. A forked worker
    starts with this process's memory, so its copy costs nothing; a spawned one unpickles it (the
    state's class decides what that sends).

    `exchange`, a pair of module-level functions (export, import), shares state that makes work faster
    but does not change results (convert: the piece cache). After each job a worker calls export(); the
    main process imports a non-empty export itself and queues it for every other worker, which imports
    it before its next job. After a job done in the main process (`ordered`), its export is queued too.
    With a `state`, both take it first: export(state), import(state, payload).
    """

    def __init__(self, n: int, initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 exchange: tuple[Callable[..., Any], Callable[..., None]] | None = None, state: Any = None):
        self._exchange = exchange
        self.state = state
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(method)
        self.workers: list[_Worker] = []
        self._seq = 0
        try:
            for _ in range(n):
                self.workers.append(_Worker(ctx, initializer, initargs, exchange, state))
        except BaseException:
            self.terminate()
            raise

    def __enter__(self) -> "WorkerGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def submit(self, fn: Callable[..., Any], args: tuple, depth: int | None = None) -> Ticket | None:
        """Send a job to the least-loaded worker with fewer than `depth` unanswered jobs (any, when depth
        is None) whose pipe has room for it; None when there is none: then the caller does the job."""
        self.collect()
        self._seq += 1
        for worker in sorted(self.workers, key=lambda w: len(w.tickets)):
            if depth is not None and len(worker.tickets) >= depth:
                break
            data = pickle.dumps((self._seq, fn, args, worker.shared), protocol=pickle.HIGHEST_PROTOCOL)
            if worker.tickets and worker.bytes + len(data) > worker.capacity:
                continue  # it might block: wait until the worker has answered
            worker.shared = []
            ticket = Ticket(self)
            worker.tickets[self._seq] = (ticket, len(data))
            worker.bytes += len(data)
            worker.jobs.send_bytes(data)
            return ticket
        return None

    def collect(self, block: bool = False) -> None:
        """Take in the results that have arrived (at least one when `block`, if any job is unanswered)."""
        busy = [w for w in self.workers if w.tickets]
        if not busy:
            return
        ready = wait([w.results for w in busy], timeout=None if block else 0)
        for worker in busy:
            if worker.results in ready:
                self._receive(worker)

    def _receive(self, worker: _Worker) -> None:
        while worker.tickets and worker.results.poll():
            try:
                seq, ok, value, exported = pickle.loads(worker.results.recv_bytes())
            except (EOFError, OSError):  # the worker is gone (a partial message counts as none)
                worker.process.join()
                raise WorkerLost(f"a conversion worker process exited unexpectedly "
                                 f"({_exit_status(worker.process.exitcode)}); the previous output is left as it was")
            if seq == -1:  # the initializer failed
                raise value
            ticket, size = worker.tickets.pop(seq)
            worker.bytes -= size
            ticket.ok, ticket.value, ticket.done = ok, value, True
            if exported:
                _call(self._exchange[1], self.state, (exported,))
                self.share(exported, but=worker)

    def run_here(self, fn: Callable[..., Any], *args: Any) -> Ticket:
        """Do a job in this process now (with this process's state) and queue what it exported for the
        workers; its result or exception as a Ticket (the exception is raised by get, in its turn)."""
        ticket = Ticket(None)
        try:
            ticket.value, ticket.ok = _call(fn, self.state, args), True
        except Exception as e:  # noqa: BLE001 - raised when its turn comes, as a worker's would be
            ticket.value = e
        ticket.done = True
        if self._exchange is not None:
            self.share(_call(self._exchange[0], self.state, ()))
        return ticket

    def share(self, exported: Any, but: _Worker | None = None) -> None:
        """Queue an export for import() in every worker (except `but`, where it came from)."""
        if exported:
            for other in self.workers:
                if other is not but:
                    other.shared.append(exported)

    def terminate(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in self.workers:
            worker.process.join()
            worker.jobs.close()
            worker.results.close()
        self.workers = []


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (", perhaps out of memory" if -code == signal.SIGKILL else "")
    return f"exit status {code}"


def ordered(group: WorkerGroup, fn: Callable[[Any], Any], jobs: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """fn(job) for every job, in order, from the workers and from this process.

    A job goes to a worker while one has fewer than `depth` unanswered; otherwise this process does it
    itself, so with n workers and this process on n+1 cores no core idles while this process also reads
    the input and writes the output. Memory stays bounded: at most `limit` results wait for their turn.
    """
    limit = 4 * depth * len(group.workers) + 8
    pending: deque[Ticket] = deque()
    for job in jobs:
        ticket = group.submit(fn, (job,), depth)
        if ticket is None:
            ticket = group.run_here(fn, job)
        pending.append(ticket)
        group.collect()
        while pending and (pending[0].ready() or len(pending) >= limit):
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
