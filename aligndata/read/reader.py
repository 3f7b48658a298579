"""Stream raw JSON records out of files, keeping line numbers, in bounded memory.

Containers: JSON Lines (`.jsonl`, `.ndjson`, or any file whose first line is a whole
JSON value followed by more), a JSON document holding one top-level array of records
(streamed element by element, so a file larger than RAM works) or one object, any of
them gzip-compressed (detected by magic bytes), and ``-`` for standard input.

A record that cannot be parsed comes out as a RawRecord with `error` set, so callers
count and report it like any other invalid record. Inside a JSON array there is no way
to find the next record after a syntax error, so such an error is `fatal`: the stream
ends there and the caller must fail the file rather than lose the rest silently.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from aligndata.errors import InputError

CHUNK_CHARS = 1 << 20
MAX_RECORD_CHARS = 256 << 20
_WS = re.compile(r"[ \t\n\r]*")
# An error this close to the end of the buffer may only mean the record continues in the next chunk.
_TAIL = 16
# A \uD800-\uDFFF escape: half of a UTF-16 surrogate pair. Alone it decodes to a str that no UTF-8 writer
# (tokenizers, hashes, output files) accepts, so records with one are searched for it (validate.py).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass
class RawRecord:
    index: int  # 1-based position of the record in its file
    line: int  # 1-based line where the record starts
    value: Any = None
    error: str | None = None  # set when the record is not valid JSON
    text: str | None = None  # the raw text of an unparseable record, for rejects files
    nonfinite: bool = False  # the JSON used NaN / Infinity literals, or a number that overflows to infinity
    surrogates: bool = False  # the JSON has surrogate escapes (pairs, or lone halves that are no characters)
    fatal: bool = False  # the rest of the file cannot be read after this error


class _ConstantFlag:
    """parse_constant hook: NaN/Infinity are not JSON; remember that we saw one.

    Also the parse_float hook, because a number too large for a double (1e400) parses as
    infinity too, and would be written back out as the non-JSON literal Infinity.
    """

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, name: str) -> float:
        self.seen = True
        return float(name)

    def parse_float(self, text: str) -> float:
        value = float(text)
        if math.isinf(value):
            self.seen = True
        return value


class TooLong(bytes):
    """The first bytes of a JSON Lines record longer than MAX_RECORD_CHARS bytes (the rest was never kept)."""


def too_long_message() -> str:
    """The one message for a record over the size cap, in a JSON array or in JSON Lines."""
    cap = MAX_RECORD_CHARS
    return f"record larger than {cap >> 20} MiB" if cap % (1 << 20) == 0 else f"record larger than {cap} bytes"


class LineParser:
    """One JSON Lines record from its raw bytes: UTF-8 and JSON errors become RawRecords with `error` set.

    Raises InputError when the first record of the file is not JSON at all (not an object or array):
    such a file is not JSON Lines, and every line would be reported as a bad record.
    """

    def __init__(self, name: str):
        self.name = name
        self.flag = _ConstantFlag()
        self.decoder = json.JSONDecoder(parse_constant=self.flag, parse_float=self.flag.parse_float)
        self.parsed_any = False

    def __call__(self, index: int, lineno: int, raw_line: bytes) -> RawRecord:
        if isinstance(raw_line, TooLong):
            return RawRecord(index, lineno, error=too_long_message(), text=raw_line.decode("utf-8", "replace") + "...")
        try:
            # Without its line break, so a syntax error at the end of the line gets that line's column.
            text = raw_line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            return RawRecord(index, lineno, error=f"invalid UTF-8 at byte {e.start + 1} of the line",
                             text=raw_line.decode("utf-8", "replace").rstrip("\r\n"))
        flag = self.flag
        flag.seen = False
        try:
            value = self.decoder.decode(text)
        except json.JSONDecodeError as e:
            if not self.parsed_any and index == 1 and text.lstrip()[:1] not in ("{", "["):
                raise InputError(f"{self.name}:{lineno}: not JSON ({e.msg} at column {e.colno})") from None
            return RawRecord(index, lineno, error=f"invalid JSON: {e.msg} (column {e.colno})", text=text)
        except RecursionError:
            return RawRecord(index, lineno, error="invalid JSON: nested too deeply", text=text[:200])
        self.parsed_any = True
        return RawRecord(index, lineno, value=value, nonfinite=flag.seen,
                         surrogates=_SURROGATE_ESCAPE.search(text) is not None)


def _refuse_array_over_lines(name: str, head: bytes) -> None:
    """A pretty-printed JSON array saved under a JSON Lines name: its first line, `[` or `[{`, is no JSON value
    (a JSON Lines record that is a list fits on its line). Said once, not as one invalid record per line."""
    newline = head.find(b"\n")
    if not head.startswith(b"[") or newline < 0:
        return
    try:
        json.loads(head[:newline])
    except RecursionError:
        return  # a whole value, only nested too deeply: that line's record reports it
    except ValueError:
        raise InputError(f"{name}: this looks like a JSON array spread over several lines, not JSON Lines (one "
                         f"record per line); name it .json") from None


def display_name(path: str) -> str:
    return "<stdin>" if path == "-" else str(path)


class RecordStream:
    """Iterate the records of one input. Raises InputError for files that are not data at all."""

    def __init__(self, path: str, name: str | None = None):
        self.path = path
        self.name = name or display_name(path)
        self._raw, self.total_bytes = _open_raw(path, self.name)
        head = _read_head(self._raw)
        binary = _chain(head, self._raw)
        if head[:2] == b"\x1f\x8b":
            gz = gzip.GzipFile(fileobj=binary, mode="rb")
            try:
                head = _read_head(gz)  # type: ignore[arg-type]
            except (OSError, EOFError) as e:
                raise InputError(f"{self.name}: not a readable gzip file ({e})") from None
            binary = _chain(head, gz)  # type: ignore[arg-type]
        self._binary = binary
        self.mode = self._sniff(head)
        self.records_read = 0

    def bytes_read(self) -> int:
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        if self._raw is not sys.stdin.buffer:
            self._raw.close()

    def __enter__(self) -> "RecordStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sniff(self, head: bytes) -> str:
        stem = self.name[:-3] if self.name.endswith(".gz") else self.name
        body = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
        stripped = body.lstrip(b" \t\r\n")
        if not stripped:
            raise InputError(f"{self.name}: file is empty (no records)")
        if stem.endswith((".jsonl", ".ndjson")):
            _refuse_array_over_lines(self.name, stripped)
            return "lines"
        first = stripped[:1]
        if first not in (b"[", b"{"):
            raise InputError(
                f"{self.name}: not JSON (starts with {stripped[:20]!r}); expected a JSON array, an object or JSON Lines"
            )
        newline = stripped.find(b"\n")
        if newline > 0 and stripped[newline:].strip():
            try:
                json.loads(stripped[:newline])
                return "lines"
            except (ValueError, RecursionError):
                pass
        return "document"

    def __iter__(self) -> Iterator[RawRecord]:
        try:
            if self.mode == "lines":
                yield from self._iter_lines()
            else:
                yield from self._iter_document()
        except (OSError, EOFError) as e:  # truncated gzip, I/O errors
            raise InputError(f"{self.name}: read error after record {self.records_read}: {e}") from None

    # -- JSON Lines ---------------------------------------------------------------------------
    def _iter_lines(self) -> Iterator[RawRecord]:
        parse = LineParser(self.name)
        for index, lineno, raw_line in self._lines():
            yield parse(index, lineno, raw_line)

    def raw_lines(self) -> Iterator[tuple[int, int, bytes]]:
        """JSON Lines only: (record index, line number, bytes) of each record line, not yet decoded.

        `LineParser` turns them into exactly the RawRecords that iterating the stream gives, so the
        parsing can happen elsewhere (in the worker processes of `convert`).
        """
        if self.mode != "lines":
            raise ValueError(f"{self.name}: raw_lines() needs JSON Lines, not a JSON document")
        try:
            yield from self._lines()
        except (OSError, EOFError) as e:  # truncated gzip, I/O errors
            raise InputError(f"{self.name}: read error after record {self.records_read}: {e}") from None

    def _lines(self) -> Iterator[tuple[int, int, bytes]]:
        """Lines up to MAX_RECORD_CHARS bytes; a longer one is skipped unread (in bounded memory) and comes
        out as its first bytes marked `TooLong`, for LineParser to report."""
        lineno = 0
        while raw_line := self._binary.readline(MAX_RECORD_CHARS + 1):
            lineno += 1
            if lineno == 1 and raw_line.startswith(b"\xef\xbb\xbf"):
                raw_line = raw_line[3:]
            if len(raw_line) > MAX_RECORD_CHARS and not raw_line.endswith(b"\n"):
                while (rest := self._binary.readline(CHUNK_CHARS)) and not rest.endswith(b"\n"):
                    pass
                raw_line = TooLong(raw_line[:200])
            elif not raw_line.strip():
                continue
            self.records_read += 1
            yield self.records_read, lineno, raw_line

    # -- one JSON document: an array of records, or a single record ----------------------------
    def _iter_document(self) -> Iterator[RawRecord]:
        scanner = _DocumentScanner(self._binary)
        for rec in scanner:
            if not rec.fatal:
                self.records_read += 1
            yield rec


class _DocumentScanner:
    """Incremental parser for one JSON document that is either an array of records or one record."""

    def __init__(self, binary: BinaryIO):
        self.binary = binary
        # Decoded here rather than by a TextIOWrapper so that invalid UTF-8 can be placed on its line.
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self.bad_utf8: UnicodeDecodeError | None = None
        self.bad_utf8_line = 0
        self.buf = ""
        self.pos = 0
        self.line = 1  # line number of self.buf[self.pos]
        self.eof = False
        self.flag = _ConstantFlag()
        self.decoder = json.JSONDecoder(parse_constant=self.flag, parse_float=self.flag.parse_float)
        self.index = 0

    def _fill(self, n: int = CHUNK_CHARS) -> bool:
        if self.eof:
            return False
        if self.pos > CHUNK_CHARS:
            self.buf = self.buf[self.pos:]
            self.pos = 0
        if self.bad_utf8 is not None:
            raise self.bad_utf8
        while True:
            raw = self.binary.read(n)
            try:
                chunk = self.utf8.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                # Keep the valid text before the bad byte, so the records in it still come out;
                # the error is raised when the scanner asks for more.
                self.bad_utf8 = e
                self.bad_utf8_line = self.line + self.buf.count("\n", self.pos) + e.object[: e.start].count(b"\n")
                chunk = e.object[: e.start].decode("utf-8")
                if not chunk:
                    raise
            if chunk:
                self.buf += chunk
                return True
            if not raw:
                self.eof = True
                return False

    def _advance(self, new_pos: int) -> None:
        self.line += self.buf.count("\n", self.pos, new_pos)
        self.pos = new_pos

    def _skip_ws(self) -> str:
        """Skip whitespace and return the next character ('' at end of input)."""
        while True:
            m = _WS.match(self.buf, self.pos)
            self._advance(m.end())
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def _fatal(self, message: str) -> RawRecord:
        return RawRecord(self.index + 1, self.line, error=message, fatal=True)

    def _decode_value(self) -> tuple[Any, bool, bool] | RawRecord:
        """Decode the value at self.pos, reading more input while it is incomplete."""
        want = CHUNK_CHARS
        while True:
            self.flag.seen = False
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                near_end = e.pos >= len(self.buf) - _TAIL or e.msg.startswith("Unterminated string")
                if near_end and not self.eof:
                    if len(self.buf) - self.pos > MAX_RECORD_CHARS:
                        return self._fatal(f"{too_long_message()} (or an unterminated string)")
                    self._fill(want)
                    want = min(want * 2, 64 * CHUNK_CHARS)
                    continue
                line = self.line + self.buf.count("\n", self.pos, e.pos)
                what = "file ends inside a record (truncated?)" if self.eof and near_end else e.msg
                return RawRecord(self.index + 1, line, error=f"invalid JSON: {what}", fatal=True)
            except RecursionError:
                return self._fatal("invalid JSON: nested too deeply")
            nonfinite = self.flag.seen
            surrogates = _SURROGATE_ESCAPE.search(self.buf, self.pos, end) is not None
            self._advance(end)
            return value, nonfinite, surrogates

    def __iter__(self) -> Iterator[RawRecord]:
        try:
            yield from self._scan()
        except UnicodeDecodeError as e:
            line = self.bad_utf8_line
            yield RawRecord(self.index + 1, line, error=f"invalid UTF-8 on line {line} ({e.reason})", fatal=True)

    def _scan(self) -> Iterator[RawRecord]:
        first = self._skip_ws()
        if first != "[":
            start = self.line
            got = self._decode_value()
            if isinstance(got, RawRecord):
                yield got
                return
            self.index = 1
            yield RawRecord(1, start, value=got[0], nonfinite=got[1], surrogates=got[2])
            if self._skip_ws():
                yield self._fatal("extra data after the top-level JSON value")
            return
        self._advance(self.pos + 1)
        if self._skip_ws() == "]":
            self._advance(self.pos + 1)
        else:
            while True:
                start = self.line
                got = self._decode_value()
                if isinstance(got, RawRecord):
                    yield got
                    return
                self.index += 1
                yield RawRecord(self.index, start, value=got[0], nonfinite=got[1], surrogates=got[2])
                sep = self._skip_ws()
                if sep == ",":
                    self._advance(self.pos + 1)
                    if self._skip_ws() == "]":
                        yield self._fatal("invalid JSON: trailing comma before ']'")
                        return
                    continue
                if sep == "]":
                    self._advance(self.pos + 1)
                    break
                if sep == "":
                    yield self._fatal("invalid JSON: file ends inside the top-level array (truncated?)")
                else:
                    yield self._fatal(f"invalid JSON: expected ',' or ']' between records, found {sep!r}")
                return
        if self._skip_ws():
            yield self._fatal("extra data after the top-level JSON array")


def require_file(path: str | Path, name: str) -> Path:
    """The path of an input file, or InputError naming it (missing, or a directory)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{name}: no such file")
    if p.is_dir():
        raise InputError(f"{name}: is a directory, not a file")
    return p


def _open_raw(path: str, name: str) -> tuple[BinaryIO, int | None]:
    if path == "-":
        return sys.stdin.buffer, None
    p = require_file(path, name)
    try:
        f = open(p, "rb", buffering=CHUNK_CHARS)
    except OSError as e:
        raise InputError(f"{name}: cannot open ({e.strerror})") from None
    try:
        size = os.fstat(f.fileno()).st_size
    except OSError:
        size = None
    return f, size


def _read_head(binary: BinaryIO, limit: int = CHUNK_CHARS) -> bytes:
    """Read enough of the start of a stream to see its first line (for format sniffing)."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = binary.read(1 << 16)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
        content = b"".join(parts).lstrip(b"\xef\xbb\xbf \t\r\n")
        if b"\n" in content:
            break
    return b"".join(parts)


class _Prefixed(io.RawIOBase):
    """A raw stream that replays bytes already read before continuing with the rest."""

    def __init__(self, prefix: bytes, rest: BinaryIO):
        self.prefix = memoryview(prefix)
        self.rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if self.prefix:
            n = min(len(b), len(self.prefix))
            b[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        data = self.rest.read(len(b))
        b[: len(data)] = data
        return len(data)


def _chain(prefix: bytes, rest: BinaryIO) -> BinaryIO:
    return io.BufferedReader(_Prefixed(prefix, rest), buffer_size=CHUNK_CHARS)  # type: ignore[return-value]
