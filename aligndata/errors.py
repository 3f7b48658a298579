"""Problems found in input data, the errors both command lines expect, and their exit codes.

Exit codes, the same for `aligndata` and `aligntrain` (documented in the README):
  0    everything valid / done
  1    the data (or a training config) is wrong: invalid records (validate, or a conversion stopped on
       one with --on-error fail), shards that do not fit the config or tokenizer, a bad config key
  2    usage or I/O error: missing file, a directory, unknown or undetectable format, not JSON at all,
       shards missing, incomplete or damaged, a tokenizer or chat template that cannot be loaded or
       used, a full disk
  3    a training run stopped itself (a NaN/Inf loss; the last good checkpoint is kept)
  130  interrupted (Ctrl-C)
  143  a training run stopped on SIGTERM or SIGUSR1 after saving a checkpoint (resume it with --resume)
`exit_code` is the one table from an exception to its code.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_INPUT = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process killed by it


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record (or with a whole file when `index` is 0).

    `kind` groups problems in summaries: json, schema, role-order, empty-content, ...
    `path` is a JSONPath into the record (``$.conversations[3].from``), or ``$`` for the record.
    """

    file: str
    line: int
    index: int
    path: str
    message: str
    kind: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        if self.index:
            where += f" (record {self.index})"
        return f"{where} {self.path}: {self.message}"

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "line": self.line,
            "record": self.index,
            "path": self.path,
            "message": self.message,
            "kind": self.kind,
        }


class InputError(Exception):
    """The input cannot be read as data at all, or the command cannot run as asked (exit code 2).
    The message names the file or the option."""


class InvalidDataError(Exception):
    """The data, or a config, is readable but wrong in a way the user must fix in it (exit code 1)."""


class RunStopped(Exception):
    """A run stopped itself to protect what it made, e.g. on a non-finite loss (exit code 3)."""


class Terminated(Exception):
    """A training run stopped on a scheduler's signal after saving a checkpoint (exit code 143)."""


class InvalidRecordError(InvalidDataError):
    """Raised with --on-error fail at the first invalid record (exit code 1)."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# Order matters: the first matching type decides. OSError comes last (none of the types above is one).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidDataError, EXIT_INVALID),
    (InputError, EXIT_INPUT),
    (RunStopped, EXIT_STOPPED),
    (Terminated, EXIT_TERMINATED),
    (KeyboardInterrupt, EXIT_INTERRUPTED),
    (OSError, EXIT_INPUT),  # disk full, quota, read-only output: an I/O error, not a traceback
)


def exit_code(exc: BaseException) -> int | None:
    """The exit code of an expected error; None for anything else, which is a bug and should raise."""
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), None)


def os_error_message(e: OSError) -> str:
    """`FILE: reason` of an I/O error, or the reason alone when it names no file."""
    what = e.strerror or str(e)
    return f"{e.filename}: {what}" if e.filename else what
