"""The work on one chunk of records, done by whichever process takes it (see workers.py):

    ChunkJob (records, or raw JSON Lines)  --ChunkEncoder.encode: parse, check, encode in one batch-->  ChunkResult

A result carries the kept rows column by column, one flat array per column (far cheaper to pickle
than arrays per row), and the records that were not kept, in order, with where they fall.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from aligndata.encode.encoder import Encoder
from aligndata.encode.results import EncodeError
from aligndata.errors import Problem
from aligndata.options import ConvertOptions
from aligndata.read.formats import FORMATS, detect_shape
from aligndata.read.reader import LineParser, RawRecord
from aligndata.read.validate import Checked, check_value
from aligndata.write.jsonl import reject_line
from aligndata.write.shards import SCHEMAS, list_columns

# Encoder failures that are a length-policy decision, not a defect of the record.
DROP_REASONS = {"too-long"}


class LineChunk(NamedTuple):
    """Consecutive JSON Lines, not parsed yet: the main process only reads their bytes."""

    first: int  # index of the first record
    linenos: list[int]
    lines: list[bytes]


class ChunkJob(NamedTuple):
    """One chunk of one input file."""

    file: str  # the input's display name
    format: str  # the file's format: every record is checked against it
    records: list[RawRecord] | LineChunk


@dataclass
class NotKept:
    """A record of a chunk that is not kept: dropped by the length policy, or rejected."""

    kept_before: int  # kept records of the chunk before this one (where it falls between the kept rows)
    kind: str  # "reject" | "drop"
    reason: str | None = None
    problems: list[Problem] = field(default_factory=list)
    fatal: bool = False
    reject_line: str | None = None  # the rejects-file line, made where the chunk was encoded, under --on-error skip
    length: int | None = None  # a record dropped as too long: its length in tokens


@dataclass
class ChunkResult:
    """What comes back for one chunk: the kept rows column by column, and the other records in order."""

    records: int
    index: np.ndarray  # record index of each kept row
    columns: dict[str, tuple[np.ndarray, np.ndarray]]  # id-list column -> (flat values, per-row lengths)
    truncated: list[tuple[int, str]]  # (kept row, how) for the truncated ones
    not_kept: list[NotKept]
    mismatch: bool = False  # a record of the chunk has the shape of another format than the one converted


def single_threaded_tokenizers() -> None:
    """Worker initializer: the processes share the cores, the tokenizers library must not add threads."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class ChunkEncoder:
    """A process's means to encode chunks: the options and one Encoder.

    The main process builds it with the encoder it made; forked workers inherit it as it is. Pickling
    it (for a spawned worker) sends the options only: the copy builds its own encoder when first used.
    """

    def __init__(self, options: ConvertOptions, encoder: Encoder | None = None):
        self.options = options
        self._encoder = encoder
        self._columns = list_columns(SCHEMAS[options.task])

    def __reduce__(self) -> tuple:
        return (ChunkEncoder, (self.options,))

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            from aligndata.encode.template import resolve_chat_template
            from aligndata.encode.tokenizer import load_tokenizer

            tok = load_tokenizer(self.options.tokenizer, trust_remote_code=self.options.trust_remote_code,
                                 eos_token=self.options.eos_token)
            self._encoder = Encoder(tok, resolve_chat_template(tok, self.options.chat_template),
                                    **self.options.encoder_arguments())
        return self._encoder

    def encode(self, job: ChunkJob) -> ChunkResult:
        """Parse a chunk (JSON Lines arrive as raw lines), check it, encode the valid records in one batch."""
        options = self.options
        fmt = FORMATS[job.format]
        raws = _raw_records(job)
        if options.input_format == "auto" and any(raw.error is None and detect_shape(raw.value) not in (None, job.format)
                                                  for raw in raws):
            return ChunkResult(len(raws), np.zeros(0, dtype=np.int64), {}, [], [], mismatch=True)
        checked = [check_value(raw, fmt, job.file) for raw in raws]
        valid = [c.record for c in checked if c.ok]
        batch = self.encoder.encode_sft_batch if options.task == "sft" else self.encoder.encode_dpo_batch
        encoded = iter(batch(valid)) if valid else iter(())
        skip = options.on_error == "skip"
        kept: list[Any] = []
        index: list[int] = []
        truncated: list[tuple[int, str]] = []
        not_kept: list[NotKept] = []
        for c in checked:
            raw = c.raw
            if c.ok:
                enc = next(encoded)
                if isinstance(enc, EncodeError):
                    kind = "drop" if enc.reason in DROP_REASONS else "reject"
                    problems = [Problem(job.file, raw.line, raw.index, enc.path, str(enc.message), enc.reason)]
                    not_kept.append(NotKept(len(kept), kind, enc.reason, problems, length=enc.length))
                    if kind == "reject" and skip:
                        not_kept[-1].reject_line = reject_line(Checked(raw, job.format, None, problems), job.file)
                    continue
                if enc.truncated:
                    truncated.append((len(kept), enc.truncated))
                kept.append(enc)
                index.append(raw.index)
            else:
                other = NotKept(len(kept), "reject", problems=c.problems, fatal=raw.fatal)
                if skip and not raw.fatal:
                    other.reject_line = reject_line(c, job.file)
                not_kept.append(other)
        columns = {col: _flat([getattr(e, col) for e in kept], dtype) for col, dtype in self._columns.items()}
        return ChunkResult(len(raws), np.array(index, dtype=np.int64), columns, truncated, not_kept)

    def tokenizer_identity(self) -> dict[str, Any]:
        """The manifest's `tokenizer` entry (hashing a large vocabulary takes a while: a worker can do it)."""
        from aligndata.encode.tokenizer import tokenizer_identity

        return tokenizer_identity(self.encoder.tokenizer, self.options.tokenizer)

    def learnt_pieces(self) -> dict[str, Any]:
        return self.encoder.learnt_pieces()

    def add_pieces(self, pieces: dict[str, Any]) -> None:
        self.encoder.add_pieces(pieces)


def _raw_records(job: ChunkJob) -> list[RawRecord]:
    if not isinstance(job.records, LineChunk):
        return job.records
    first, linenos, lines = job.records
    parse = LineParser(job.file)
    return [parse(first + i, lineno, line) for i, (lineno, line) in enumerate(zip(linenos, lines))]


def _flat(seqs: list[Any], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(x) for x in seqs), dtype=np.int64, count=len(seqs))
    if all(type(x) is list for x in seqs):
        values: list[int] = []
        for x in seqs:
            values.extend(x)
        return np.array(values, dtype=dtype), lengths
    if not seqs:
        return np.zeros(0, dtype=dtype), lengths
    return np.concatenate([np.asarray(x, dtype=dtype) for x in seqs]), lengths
