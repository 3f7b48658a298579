"""One format per input file: given with --format, or (auto) the one its records show.

Under --format auto a reader starts from the first record's shape (`start_format`) and checks every
record's shape against it on the way; only a file that turns out mixed is read whole (`decide_format`)
for the error that names every format found. A mixed file is refused, never guessed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from aligndata.errors import InputError, InvalidRecordError, Problem
from aligndata.read.formats import FORMATS, check_format_option, detect_shape
from aligndata.read.reader import RecordStream


@dataclass
class Detection:
    """The shapes of a whole file's records: how many of each, and where each first shows."""

    format: str | None
    shapes: Counter = field(default_factory=Counter)
    first: dict[str, tuple[int, int]] = field(default_factory=dict)  # shape -> (record, line)
    records: int = 0

    @property
    def mixed(self) -> bool:
        return len(self.shapes) > 1


@contextmanager
def materialized(path: str) -> Iterator[str]:
    """Standard input is copied to a temporary file so it can be read twice (format detection)."""
    if path != "-":
        yield path
        return
    fd, tmp = tempfile.mkstemp(prefix="aligndata-stdin-")
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
        yield tmp
    finally:
        os.unlink(tmp)


def detect_format(path: str, name: str | None = None) -> Detection:
    """Classify every record by its top-level keys; the file's format is the one shape present."""
    det = Detection(None)
    with RecordStream(path, name) as stream:
        for raw in stream:
            det.records += 1
            if raw.error is not None:
                continue
            shape = detect_shape(raw.value)
            if shape is None:
                continue
            det.shapes[shape] += 1
            det.first.setdefault(shape, (raw.index, raw.line))
    if len(det.shapes) == 1:
        det.format = next(iter(det.shapes))
    elif det.shapes:
        det.format = det.shapes.most_common(1)[0][0]
    return det


def sniff_format(path: str, name: str | None = None) -> str | None:
    """The shape of the first record that has one (None: no record has one, or there are none).

    What readers start from under --format auto (start_format), so that a large file is not read twice:
    they check every record's shape against it, and only when one differs read the whole file with
    `decide_format` for the error that names the formats found (a mixed file is refused, never guessed)."""
    with RecordStream(path, name) as stream:
        for raw in stream:
            if raw.error is None:
                shape = detect_shape(raw.value)
                if shape is not None:
                    return shape
    return None


def start_format(path: str, name: str, input_format: str) -> str:
    """The format to start reading `path` as: the one given, or (auto) the first record's shape; a file
    with no record of a known shape gets decide_format's error. Readers under auto check each record's
    shape against it and call refuse_if_mixed when one differs."""
    if input_format == "auto":
        shape = sniff_format(path, name)
        if shape is not None:
            return shape
    return decide_format(path, name, input_format)[0]


def refuse_if_mixed(path: str, name: str) -> None:
    """Read the whole file for its formats; raise the error naming them if there is more than one."""
    _, det = decide_format(path, name, "auto")
    if det is not None and det.mixed:
        raise InvalidRecordError([mixed_problem(name, det)])


def decide_format(path: str, name: str, input_format: str) -> tuple[str, Detection | None]:
    """The format to read `path` as: the one given, or the one its records show (auto)."""
    if input_format != "auto":
        check_format_option(input_format)
        return input_format, None
    det = detect_format(path, name)
    if det.records == 0:
        raise InputError(f"{name}: holds no records (an empty JSON array)")
    if det.format is None:
        raise InputError(f"{name}: cannot detect the format: no record looks like any of "
                         f"{', '.join(FORMATS)} (pass --format to see why each record fails)")
    return det.format, det


def mixed_problem(name: str, det: Detection) -> Problem:
    """The file-level problem of a mixed file: every format found, how often, and where it first shows."""
    parts = []
    for shape, n in det.shapes.most_common():
        rec, line = det.first[shape]
        parts.append(f"{shape} ({n} record{'s' if n != 1 else ''}, first: record {rec} at line {line})")
    minority = min(det.first[s] for s in det.shapes if s != det.format)
    return Problem(name, minority[1], 0, "$",
                   "records match different formats: " + ", ".join(parts)
                   + "; split the file by format or pass --format", "mixed-format")


def require_task(name: str, fmt: str, task: str, to: str) -> None:
    """A file of conversations cannot become preference data and vice versa (exit 2, names the file)."""
    if FORMATS[fmt].task != task:
        holds = "conversations" if FORMATS[fmt].task == "sft" else "preference pairs"
        needs = "conversations" if task == "sft" else "preference pairs"
        raise InputError(f"{name}: holds {holds} ({fmt}); --to {to} needs {needs}")
