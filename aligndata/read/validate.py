"""Validation: JSON Schema first, then the adapters and semantic rules, with exact locations.

`check_file` streams one input and yields a `Checked` per record. In `--format auto` mode it
first decides the file's format from *all* its records (a cheap pass over top-level keys);
a file whose records look like different formats gets a file-level `mixed-format` problem.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from jsonschema.exceptions import ValidationError

from aligndata.errors import InputError, InvalidRecordError, Problem
from aligndata.read.formats import FORMATS, Format, check_format_option, detect_shape
from aligndata.read.formats.common import Issues
from aligndata.read.reader import RawRecord, RecordStream, display_name
from aligndata.records import Conversation, Record, Source
from aligndata.read.rules import check_conversation, check_pair

MAX_SCHEMA_ERRORS = 20


@dataclass
class Checked:
    raw: RawRecord
    format: str | None
    record: Record | None
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Detection:
    format: str | None
    shapes: Counter = field(default_factory=Counter)
    first: dict[str, tuple[int, int]] = field(default_factory=dict)  # shape -> (record, line)
    records: int = 0

    @property
    def mixed(self) -> bool:
        return len(self.shapes) > 1


def _short(value: Any, limit: int = 60) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[: limit - 3] + "...")
    if isinstance(value, dict):
        return "an object" if value else "{}"
    if isinstance(value, list):
        return "an array" if value else "[]"
    return repr(value) if value is not None else "None"


def _leaves(error: ValidationError) -> list[ValidationError]:
    """The errors to report for one schema error, looking inside anyOf branches.

    Branches that do not fit the value's type at all ("wrong type at this very spot") are
    ignored, and every error of the branch the user meant (the one with the deepest error)
    is reported, so a record in an anyOf schema (openai: object or bare list) gets all its
    problems, not just one. A value that fits no branch stays one error, described below.
    """
    if not error.context:
        return [error]
    fitting = [e for e in error.context if not (e.validator == "type" and not e.relative_path)]
    if not fitting:
        return [error]
    branch = max(fitting, key=lambda e: len(e.path)).relative_schema_path[0]
    return [leaf for e in fitting if e.relative_schema_path[0] == branch for leaf in _leaves(e)]


def _path_order(error: ValidationError) -> tuple:
    """Document order: $.messages[2] before $.messages[10]."""
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in error.absolute_path)


def _describe(error: ValidationError) -> tuple[str, str]:
    """A compact message for one schema error; huge values never end up in messages."""
    path = error.json_path
    v, inst = error.validator, error.instance
    if v in ("anyOf", "oneOf") and all(e.validator == "type" for e in error.context):
        expected = [t for e in error.context for t in (e.validator_value if isinstance(e.validator_value, list)
                                                         else [e.validator_value])]
        return path, f"{_short(inst)} is not of type {' or '.join(repr(t) for t in expected)}"
    if v == "type":
        expected = error.validator_value
        expected = " or ".join(repr(t) for t in expected) if isinstance(expected, list) else repr(expected)
        return path, f"{_short(inst)} is not of type {expected}"
    if v == "enum":
        return path, f"{_short(inst)} is not one of {error.validator_value!r}"
    if v == "const":
        return path, f"{_short(inst)} must be {error.validator_value!r}"
    if v == "minItems":
        return path, "must not be empty" if error.validator_value == 1 else f"needs at least {error.validator_value} items"
    if v == "minLength":
        return path, "must not be empty"
    message = error.message
    return path, message if len(message) <= 200 else message[:197] + "..."


def schema_problems(fmt: Format, value: Any, where: Source) -> list[Problem]:
    try:
        if fmt.is_valid(value):
            return []
    except (ValueError, OverflowError, RecursionError):
        pass  # values the compiled validator cannot take (huge ints, deep nesting): ask jsonschema
    errors = sorted((leaf for e in fmt.validator.iter_errors(value) for leaf in _leaves(e)),
                    key=lambda e: (_path_order(e), e.validator))
    out = []
    for error in errors[:MAX_SCHEMA_ERRORS]:
        path, message = _describe(error)
        out.append(Problem(where.file, where.line, where.index, path, message, "schema"))
    return out


def _nonfinite_paths(value: Any, path: str = "$") -> Iterator[str]:
    if isinstance(value, float) and not math.isfinite(value):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _nonfinite_paths(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nonfinite_paths(v, f"{path}[{i}]")


def check_value(raw: RawRecord, fmt: Format, file: str) -> Checked:
    """Schema, then adapter, then semantic rules for one parsed record."""
    src = Source(file, raw.line, raw.index)
    if raw.error is not None:
        return Checked(raw, fmt.name, None, [Problem(file, raw.line, raw.index, "$", raw.error, "json")])
    problems = schema_problems(fmt, raw.value, src)
    if raw.nonfinite:
        problems += [Problem(file, raw.line, raw.index, p, "NaN and Infinity are not valid JSON", "json")
                     for p in _nonfinite_paths(raw.value)]
    if problems:
        return Checked(raw, fmt.name, None, problems)
    issues = Issues()
    record = fmt.adapt(raw.value, issues)
    if record is not None and not issues:
        if isinstance(record, Conversation):
            check_conversation(record, issues)
        else:
            check_pair(record, issues)
    if issues:
        return Checked(raw, fmt.name, None,
                       [Problem(file, raw.line, raw.index, p, m, k) for p, m, k in issues.items])
    record.source = src
    return Checked(raw, fmt.name, record, [])


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


def require_task(name: str, fmt: str, task: str, to: str) -> None:
    """A file of conversations cannot become preference data and vice versa (exit 2, names the file)."""
    if FORMATS[fmt].task != task:
        holds = "conversations" if FORMATS[fmt].task == "sft" else "preference pairs"
        needs = "conversations" if task == "sft" else "preference pairs"
        raise InputError(f"{name}: holds {holds} ({fmt}); --to {to} needs {needs}")


def mixed_problem(name: str, det: Detection) -> Problem:
    parts = []
    for shape, n in det.shapes.most_common():
        rec, line = det.first[shape]
        parts.append(f"{shape} ({n} record{'s' if n != 1 else ''}, first: record {rec} at line {line})")
    minority = min(det.first[s] for s in det.shapes if s != det.format)
    return Problem(name, minority[1], 0, "$",
                   "records match different formats: " + ", ".join(parts)
                   + "; split the file by format or pass --format", "mixed-format")


@dataclass
class FileCheck:
    """The records of one input file, checked. Iterate `records()` once."""

    path: str
    input_format: str = "auto"
    name: str = ""
    format: str | None = None
    detection: Detection | None = None
    stream: RecordStream | None = None
    _real: str = field(default="", repr=False)  # the file being read (stdin: its spooled copy)

    def __post_init__(self) -> None:
        self.name = self.name or display_name(self.path)

    def records(self) -> Iterator[Checked]:
        """Under --format auto the file is read once: `format` starts as the first record's, and every
        record's shape is compared with it. At the first that differs, before that record is yielded,
        the whole file is read for its formats: `detection` then says mixed (callers report it from the
        record where it shows), `format` becomes the most common, and each record is checked against
        the format its shape says, as in a file detected whole beforehand."""
        with materialized(self.path) as real:
            self._real = real
            auto = self.input_format == "auto"
            self.format = start_format(real, self.name, self.input_format)
            self.detection = Detection(self.format) if auto else None
            fixed = FORMATS[self.format]
            with RecordStream(real, self.name) as stream:
                self.stream = stream
                for raw in stream:
                    fmt = fixed
                    if auto and raw.error is None:
                        shape = detect_shape(raw.value)
                        if shape is not None and shape != fixed.name and not self.is_mixed:
                            self.format, self.detection = decide_format(real, self.name, "auto")
                            fixed = FORMATS[self.format]
                        fmt = FORMATS.get(shape or "", fixed)
                    yield check_value(raw, fmt, self.name)

    @property
    def is_mixed(self) -> bool:
        """Whether a second format has shown (so far: under auto the file is read whole when it does)."""
        return self.detection is not None and self.detection.mixed

    def refuse_if_mixed(self) -> None:
        """From inside records(), under auto: raise the mixed-format error if the whole file is mixed. For
        errors that the first record's format alone would explain wrongly, such as a file of the other
        task that is in fact mixed."""
        if self.input_format == "auto":
            refuse_if_mixed(self._real, self.name)
