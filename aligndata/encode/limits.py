"""Bounds on the work one record may cause: a hostile or broken record is that record's rejection (or drop),
never a run that hangs, eats the machine's memory or ends in a traceback.

    render     a chat template is a program: each record's rendering gets RENDER_SECONDS and its output
               RENDER_MAX_CHARS characters; past either it is rejected as template-error naming the template
    budget     with --max-length and --length-policy drop, a rendering longer than max_length tokens could
               cover is dropped as too-long before it is tokenized (`CharBudget`)
    tokenizer  a panic of the Rust tokenizer on one text rejects that record (tokenizer-error), not the run

The time limit is a SIGALRM timer, so it stops a template loop that produces nothing too; it works in the
main thread of each process (the encoding workers included) and is skipped in other threads.
"""

from __future__ import annotations

import signal
import threading
from itertools import islice
from typing import Any, Callable, Iterable, TypeVar

from aligndata.encode.results import EncodeError
from aligndata.read.reader import MAX_RECORD_CHARS

RENDER_SECONDS = 10.0
RENDER_MAX_CHARS = MAX_RECORD_CHARS  # a rendering may be as large as a record may be
MIN_CHARS_PER_TOKEN = 100  # WordPiece turns a whole word of up to 100 characters into one [UNK]

T = TypeVar("T")


class _RenderLimit(BaseException):
    """Raised inside the template's code (a BaseException, so the template cannot catch it)."""


def join_bounded(pieces: Iterable[str], source: str) -> str:
    """The rendered text from the output pieces of template `source`; EncodeError once it passes
    RENDER_MAX_CHARS (read in blocks: the check costs nothing next to the rendering)."""
    out: list[str] = []
    size = 0
    it = iter(pieces)
    while block := list(islice(it, 256)):
        text = "".join(block)
        size += len(text)
        if size > RENDER_MAX_CHARS:
            raise EncodeError("template-error", f"the chat template {source} produced more than "
                                                f"{RENDER_MAX_CHARS:,} characters on this record (a limit "
                                                "of aligndata); the record is rejected")
        out.append(text)
    return "".join(out)


class RenderClock:
    """Times each record's rendering. Use it around a batch (`with clock:`), then `clock.render(...)` per record."""

    def __init__(self, template_source: str):
        self.source = template_source
        self._armed = False
        self._active = False
        self._previous: Any = None

    def __enter__(self) -> RenderClock:
        self._active = threading.current_thread() is threading.main_thread()
        if self._active:
            self._previous = signal.signal(signal.SIGALRM, self._expire)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)

    def _expire(self, signum: int, frame: Any) -> None:
        if self._armed:
            raise _RenderLimit(f"ran longer than {RENDER_SECONDS:g} s")

    def render(self, step: Callable[..., T], *args: Any) -> T | EncodeError:
        """step(*args) (a rendering), or the EncodeError of a record that failed or passed a limit."""
        try:
            if self._active:
                self._armed = True
                signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS)
            try:
                return step(*args)
            finally:
                self._armed = False
                if self._active:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except EncodeError as exc:
            return exc
        except _RenderLimit as exc:
            return EncodeError("template-error", f"the chat template {self.source} {exc} on this record (a limit "
                                                 "of aligndata); the record is rejected")


class CharBudget:
    """With a length limit that drops longer records: the characters max_length tokens can cover at most.

    No token of the tokenizer covers more characters than its longest vocabulary entry has (byte-level
    entries have one character per byte; Metaspace and WordPiece entries are longer than the text they
    cover), nor more than MIN_CHARS_PER_TOKEN for an unknown word; twice that is the margin. A rendering
    past the budget has more than max_length tokens, so dropping it untokenized drops what would have been
    dropped anyway, without the minutes and gigabytes a multi-megabyte record costs the tokenizer.
    """

    def __init__(self, tokenizer: Any, max_length: int | None, length_policy: str):
        self.tokenizer = tokenizer
        self.max_length = max_length if length_policy == "drop" else None
        self._chars: int | None = None  # the budget, computed when first needed (reading a vocabulary takes 0.3 s)

    def check(self, rendered: T | EncodeError) -> T | EncodeError:
        """`rendered` itself, or a too-long EncodeError when its longest text is past the budget."""
        if self.max_length is None or isinstance(rendered, EncodeError):
            return rendered
        texts = getattr(rendered, "texts", None) or (rendered.text,)  # type: ignore[attr-defined]
        longest = max(len(t) for t in texts)
        if longest <= 2 * self.max_length * MIN_CHARS_PER_TOKEN:  # within any budget: the common case
            return rendered
        if self._chars is None:
            self._chars = 2 * self.max_length * max(MIN_CHARS_PER_TOKEN, longest_entry(self.tokenizer))
        if longest <= self._chars:
            return rendered
        return EncodeError("too-long", f"{longest} characters rendered, more than max_length {self.max_length} "
                                       "tokens can cover (not tokenized)")


def longest_entry(tokenizer: Any) -> int:
    """Characters of the tokenizer's longest vocabulary entry (added tokens included)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def per_record(step: Callable[[list[Any]], list[T]], items: list[Any]) -> list[T | EncodeError]:
    """step(items), one result per item. When the Rust tokenizer panics on the batch, each item is tried
    alone, and the one it panics on gets EncodeError("tokenizer-error") instead of ending the run."""
    if not items:
        return []
    try:
        return list(step(items))
    except BaseException as exc:
        if not is_panic(exc):
            raise
        if len(items) == 1:
            return [tokenizer_error(exc)]
        return [result for item in items for result in per_record(step, [item])]


def is_panic(exc: BaseException) -> bool:
    """A Rust panic inside a library (pyo3's PanicException derives from BaseException, not Exception)."""
    return type(exc).__name__ == "PanicException"


def tokenizer_error(exc: BaseException) -> EncodeError:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return EncodeError("tokenizer-error", f"the tokenizer failed on this record: {message}")

