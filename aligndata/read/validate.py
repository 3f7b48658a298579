"""Validation: JSON Schema first, then the adapters and semantic rules, with exact locations.

`check_value` checks one parsed record; `FileCheck` streams one input file and yields a `Checked` per
record, its format decided as `detect.py` says (given, or under auto from the records themselves);
`read_records` is how callers iterate a file: it fails a mixed-format file (or, for the callers that
report it, hands its problem over) and drives the progress bar. `validate_files` is `aligndata validate`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from jsonschema.exceptions import ValidationError

from aligndata.errors import EXIT_INPUT, EXIT_INVALID, EXIT_OK, InputError, InvalidRecordError, Problem
from aligndata.progress import FileProgress
from aligndata.read.control_strings import COMMON_CONTROL_STRINGS, ControlStrings, record_messages
from aligndata.read.detect import Detection, decide_format, materialized, mixed_problem, refuse_if_mixed, start_format
from aligndata.read.formats import FORMATS, Format, check_format_option, detect_shape
from aligndata.read.formats.common import Issues
from aligndata.read.reader import RawRecord, RecordStream, display_name
from aligndata.read.rules import check_conversation, check_pair
from aligndata.records import Conversation, Record, Source

MAX_SCHEMA_ERRORS = 20
# A str character that is half a surrogate pair: json decodes a lone \ud83d escape to one.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Checked:
    """One record after the checks: the canonical record if it is valid, else its problems."""

    raw: RawRecord
    format: str | None
    record: Record | None
    problems: list[Problem]
    # The file's mixed-format problem, on the record where a second format first shows (read_records,
    # allow_mixed): a problem of the whole file, so it is not among this record's own.
    mixed: Problem | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


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


def _scalars(value: Any, path: str = "$") -> Iterator[tuple[str, Any]]:
    """(JSONPath, value) of every scalar in a record, and of every object key (at its value's path).
    A key that holds a lone surrogate is written JSON-escaped in the path, which must stay printable."""
    if isinstance(value, dict):
        for k, v in value.items():
            key = k if _LONE_SURROGATE.search(k) is None else json.dumps(k)[1:-1]
            yield f"{path}.{key}", k
            yield from _scalars(v, f"{path}.{key}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _scalars(v, f"{path}[{i}]")
    else:
        yield path, value


def _nonfinite_paths(value: Any) -> Iterator[str]:
    return (path for path, v in _scalars(value) if isinstance(v, float) and not math.isfinite(v))


def _lone_surrogates(value: Any) -> Iterator[tuple[str, str]]:
    """(JSONPath, message) for every string (or key) that holds half a surrogate pair, alone."""
    for path, v in _scalars(value):
        lone = _LONE_SURROGATE.search(v) if isinstance(v, str) else None
        if lone is not None:
            yield path, (f"lone surrogate escape \\u{ord(lone.group()):04x}: half of a UTF-16 pair, not a "
                         "character, so this text cannot be encoded as UTF-8 (to tokenize, hash or write it)")


def check_value(raw: RawRecord, fmt: Format, file: str) -> Checked:
    """Schema, then adapter, then semantic rules for one parsed record."""
    src = Source(file, raw.line, raw.index)
    if raw.error is not None:
        return Checked(raw, fmt.name, None, [Problem(file, raw.line, raw.index, "$", raw.error, "json")])
    problems = schema_problems(fmt, raw.value, src)
    if raw.nonfinite:
        problems += [Problem(file, raw.line, raw.index, p, "NaN and Infinity are not valid JSON", "json")
                     for p in _nonfinite_paths(raw.value)]
    if raw.surrogates:
        problems += [Problem(file, raw.line, raw.index, p, m, "lone-surrogate") for p, m in _lone_surrogates(raw.value)]
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
        the whole file is read for its formats: `detection` then says mixed (read_records reports it from
        the record where it shows), `format` becomes the most common, and each record is checked against
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


def read_records(fc: FileCheck, progress: FileProgress | None = None, *,
                 allow_mixed: bool = False) -> Iterator[Checked]:
    """Every checked record of one file, in order, with the progress bar kept up to date.

    A mixed-format file raises its error (InvalidRecordError) at the record where the second format
    shows; with `allow_mixed` (validate and lint report it instead) that record carries it as `mixed`."""
    started = announced = False
    for checked in fc.records():
        if fc.is_mixed and not announced:
            announced = True
            problem = mixed_problem(fc.name, fc.detection)
            if not allow_mixed:
                raise InvalidRecordError([problem])
            checked.mixed = problem
        if progress is not None:
            if not started and fc.stream is not None:
                progress.start_file(fc.stream, fc.name)
            progress.update()
        started = True
        yield checked


# -- aligndata validate ----------------------------------------------------------------------------------

@dataclass
class FileSummary:
    """One validated file: its format, record counts and problems by kind, or why it could not be read."""

    file: str
    format: str | None = None
    records: int = 0
    valid: int = 0
    by_kind: Counter = field(default_factory=Counter)
    error: str | None = None
    # Valid records with a common template's control string inside a message (not a problem: convert decides).
    control_strings: int = 0
    first_control_string: str | None = None  # where the first one is, as a problem would name it

    def to_json(self) -> dict:
        return {"file": self.file, "format": self.format, "records": self.records, "valid": self.valid,
                "invalid": self.records - self.valid, "problems_by_kind": dict(self.by_kind), "error": self.error,
                "control_strings": {"records": self.control_strings, "first": self.first_control_string}}


@dataclass
class Validation:
    """What `validate_files` found: a summary per file and the first problems (`total` counts them all)."""

    files: list[FileSummary]
    problems: list[Problem]
    total: int

    @property
    def exit_code(self) -> int:
        """2 when a file could not be read, 1 when a record is invalid, else 0."""
        if any(s.error for s in self.files):
            return EXIT_INPUT
        return EXIT_INVALID if any(s.by_kind for s in self.files) else EXIT_OK

    def to_json(self) -> dict:
        return {"valid": self.exit_code == EXIT_OK, "exit_code": self.exit_code,
                "files": [s.to_json() for s in self.files], "problems": [p.to_json() for p in self.problems],
                "problems_shown": len(self.problems), "problems_total": self.total}


def _note_control_string(summary: FileSummary, checked: Checked, control: ControlStrings) -> None:
    if not checked.ok:
        return
    hit = control.find(record_messages(checked.record))
    if hit is not None:
        summary.control_strings += 1
        if summary.first_control_string is None:
            raw = checked.raw
            summary.first_control_string = f"{summary.file}:{raw.line} (record {raw.index}) {hit[1]}: {hit[0]!r}"


def validate_files(paths: list[str], input_format: str = "auto", *, max_errors: int = 50, progress: bool = False,
                   on_problem: Callable[[Problem], None] | None = None,
                   on_error: Callable[[str], None] | None = None) -> Validation:
    """Check every record of every file; a file that cannot be read is summarised with its error.

    Each of the first `max_errors` problems goes to `on_problem` as it is found, and each file's error
    to `on_error`, so a caller can print them while a large file is still being read.
    A bad `input_format` raises InputError before any file is read."""
    check_format_option(input_format)
    result = Validation([], [], 0)

    def found(p: Problem) -> None:
        if result.total < max_errors:
            result.problems.append(p)
            if on_problem is not None:
                on_problem(p)
        result.total += 1

    bar = FileProgress(progress)
    control = ControlStrings(list(COMMON_CONTROL_STRINGS))
    try:
        for path in paths:
            fc = FileCheck(path, input_format)
            s = FileSummary(fc.name)
            result.files.append(s)
            try:
                for checked in read_records(fc, bar, allow_mixed=True):
                    s.format = fc.format
                    s.records += 1
                    s.valid += checked.ok
                    for p in ([checked.mixed] if checked.mixed else []) + checked.problems:
                        s.by_kind[p.kind] += 1
                        found(p)
                    _note_control_string(s, checked, control)
            except InputError as e:
                s.error = str(e)
                if on_error is not None:
                    on_error(s.error)
    finally:
        bar.close()
    return result
