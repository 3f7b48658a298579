"""Problems found in input data, and the exit codes of the CLI.

Exit codes (documented in the README):
  0  everything valid / done
  1  invalid records were found (validate), or a conversion stopped on one (--on-error fail)
  2  usage or I/O error: missing file, a directory, unknown or undetectable format, not JSON at all
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_INPUT = 2


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
    """The input cannot be read as data at all (exit code 2). The message names the file."""


class InvalidRecordError(Exception):
    """Raised with --on-error fail at the first invalid record (exit code 1)."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
