"""`aligndata convert --to sft|dpo`: raw records -> validated -> tokenized -> Arrow shards + manifest.

    read (main process)  ->  parse + check + encode (chunks of records)  ->  split + write (main process)

With `num_proc` N, N-1 worker processes and the main process itself encode chunks (the main process
takes one whenever each worker has two unanswered; see workers.py); JSON Lines travel to the workers
as raw line bytes and results come back as one flat array per column per chunk. Results are consumed
in input order, so the shards are byte-identical for any `num_proc`. Everything is written into a
staging directory next to the output and moved into place only after the manifest is written: a failed
or killed run leaves the previous output untouched plus a `.NAME.partial` directory that the next run
removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from aligndata import __version__
from aligndata.errors import InputError, InvalidRecordError, Problem
from aligndata.read.formats import FORMATS, check_format_option, detect_shape
from aligndata.write.jsonl import AtomicOutput, check_on_error, reject_line
from aligndata.progress import FileProgress
from aligndata.read.reader import LineParser, RawRecord, RecordStream, display_name, require_file
from aligndata.write.shards import (FORMAT_VERSION, INCOMPLETE, MANIFEST, SCHEMAS, ShardError, ShardWriter, finish_output,
                     list_columns, prepare_output, read_manifest, sha256_file, verify_shards)
from aligndata.read.validate import Checked, check_value, materialized, refuse_if_mixed, require_task, start_format
from aligndata.write.workers import WorkerGroup, ordered

CHUNK = 64  # records per chunk of work
CHUNK_BYTES = 1 << 18  # and at most this many bytes of JSON Lines (long records): a chunk and its result
                       # then fit a worker's pipe twice over (see workers.py)
POLICIES = ("drop", "truncate")
# Encoder failures that are a length-policy decision, not a defect of the record.
DROP_REASONS = {"too-long"}


@dataclass
class ConvertResult:
    manifest: dict[str, Any]
    skipped: bool
    out_dir: Path
    rejects_path: Path | None = None


@dataclass
class _Other:
    """A record of a chunk that is not kept: dropped by the length policy, or rejected."""

    kept_before: int  # kept records of the chunk before this one (where it falls between the kept rows)
    kind: str  # "reject" | "drop"
    reason: str | None = None
    problems: list[Problem] = field(default_factory=list)
    fatal: bool = False
    reject_line: str | None = None  # the rejects-file line, made in the worker under --on-error skip


@dataclass
class _Result:
    """What a worker sends back for one chunk: the kept rows column by column, one array per column
    (far cheaper to pickle than arrays per row), and the other records in order."""

    records: int
    index: np.ndarray  # record index of each kept row
    columns: dict[str, tuple[np.ndarray, np.ndarray]]  # id-list column -> (flat values, per-row lengths)
    truncated: list[tuple[int, str]]  # (kept row, how) for the truncated ones
    others: list[_Other]
    mismatch: bool = False  # a record of the chunk has the shape of another format than the one converted


# -- the per-chunk work, run in workers --------------------------------------------------------------

_ENCODER = None


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


def _raw_records(job: tuple) -> list[RawRecord]:
    name, payload = job[0], job[5]
    if job[4] == "records":
        return payload
    first, linenos, lines = payload
    parse = LineParser(name)
    return [parse(first + i, lineno, line) for i, (lineno, line) in enumerate(zip(linenos, lines))]


def _work(job: tuple) -> _Result:
    """Parse a chunk (JSON Lines arrive as raw lines), check it, encode the valid records in one batch."""
    from aligndata.encode.results import EncodeError

    name, fmt_name, task, on_error = job[:4]
    fmt = FORMATS[fmt_name]
    raws = _raw_records(job)
    if job[6] and any(raw.error is None and detect_shape(raw.value) not in (None, fmt_name) for raw in raws):
        return _Result(len(raws), np.zeros(0, dtype=np.int64), {}, [], [], mismatch=True)
    checked = [check_value(raw, fmt, name) for raw in raws]
    valid = [c.record for c in checked if c.ok]
    batch = _ENCODER.encode_sft_batch if task == "sft" else _ENCODER.encode_dpo_batch
    encoded = iter(batch(valid)) if valid else iter(())
    kept: list[Any] = []
    index: list[int] = []
    truncated: list[tuple[int, str]] = []
    others: list[_Other] = []
    for c in checked:
        raw = c.raw
        if c.ok:
            enc = next(encoded)
            if isinstance(enc, EncodeError):
                kind = "drop" if enc.reason in DROP_REASONS else "reject"
                problems = [Problem(name, raw.line, raw.index, "$", str(enc.message), enc.reason)]
                others.append(_Other(len(kept), kind, enc.reason, problems))
                if kind == "reject" and on_error == "skip":
                    others[-1].reject_line = reject_line(Checked(raw, fmt_name, None, problems), name)
                continue
            if enc.truncated:
                truncated.append((len(kept), enc.truncated))
            kept.append(enc)
            index.append(raw.index)
        else:
            other = _Other(len(kept), "reject", problems=c.problems, fatal=raw.fatal)
            if on_error == "skip" and not raw.fatal:
                other.reject_line = reject_line(c, name)
            others.append(other)
    columns = {col: _flat([getattr(e, col) for e in kept], dtype) for col, dtype in list_columns(SCHEMAS[task]).items()}
    return _Result(len(raws), np.array(index, dtype=np.int64), columns, truncated, others)


def _init_worker(spec: str, chat_template: str | None, trust_remote_code: bool, kwargs: dict[str, Any]) -> None:
    global _ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _ENCODER is None:  # spawn start method: build it here; with fork it was inherited
        from aligndata.encode.template import resolve_chat_template
        from aligndata.encode.tokenizer import load_tokenizer
        from aligndata.encode.encoder import Encoder

        tok = load_tokenizer(spec, trust_remote_code=trust_remote_code)
        _ENCODER = Encoder(tok, resolve_chat_template(tok, chat_template), **kwargs)


# -- orchestration -----------------------------------------------------------------------------------

def _check_options(task: str, length_policy: str, train_on: str, eval_fraction: float, eval_file: str | None,
                   num_proc: int, shard_rows: int, on_error: str, max_length: int | None,
                   max_prompt_length: int | None) -> None:
    if task not in ("sft", "dpo"):
        raise InputError(f"--to {task!r}: choose sft or dpo")
    if length_policy not in POLICIES:
        raise InputError(f"--length-policy {length_policy!r}: choose drop or truncate")
    if train_on not in ("all", "last"):
        raise InputError(f"--train-on {train_on!r}: choose all or last")
    check_on_error(on_error)
    if not 0.0 <= eval_fraction < 1.0:
        raise InputError(f"--eval-fraction {eval_fraction}: must be at least 0 and below 1")
    if eval_file and eval_fraction:
        raise InputError("--eval-fraction and --eval-file exclude each other: pick one way to make the eval split")
    if num_proc < 1 or shard_rows < 1:
        raise InputError("--num-proc and --shard-rows must be at least 1")
    if max_length is not None and max_length < 2:
        raise InputError(f"--max-length {max_length}: must be at least 2")
    if max_prompt_length is not None:
        if max_length is not None and max_prompt_length >= max_length:
            raise InputError(f"--max-prompt-length {max_prompt_length} must be below --max-length {max_length}")
        if task != "dpo":
            raise InputError("--max-prompt-length applies to --to dpo only")
    if length_policy == "truncate" and max_length is None:
        raise InputError("--length-policy truncate needs --max-length")


def _in_eval(seed: int, source_sha: str, index: int, fraction: float) -> bool:
    """Seeded per-record choice: stable under any process count and any record order."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}:{source_sha}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < fraction


def _chunks(stream: Iterable[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    chunk: list[RawRecord] = []
    for raw in stream:
        chunk.append(raw)
        if len(chunk) >= size or raw.fatal:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _line_chunks(lines: Iterable[tuple[int, int, bytes]], size: int,
                 max_bytes: int) -> Iterator[tuple[int, list[int], list[bytes]]]:
    """Raw JSON Lines in chunks of `size` lines, fewer where they reach `max_bytes`:
    (index of the first record, line numbers, line bytes)."""
    first = 0
    linenos: list[int] = []
    chunk: list[bytes] = []
    nbytes = 0
    for index, lineno, line in lines:
        if not chunk:
            first = index
        linenos.append(lineno)
        chunk.append(line)
        nbytes += len(line)
        if len(chunk) >= size or nbytes >= max_bytes:
            yield first, linenos, chunk
            linenos, chunk, nbytes = [], [], 0
    if chunk:
        yield first, linenos, chunk


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if not len(values):
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    s = np.sort(values)

    def at(q: float) -> int:
        return int(s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))])

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": int(s[-1])}


class _Stats:
    """Token-length distributions per split (kept in compact int arrays, never per-row objects)."""

    def __init__(self, task: str):
        self.task = task
        self.cols = ("total", "prompt", "completion") if task == "sft" else ("total", "prompt", "chosen", "rejected")
        self.data: dict[str, dict[str, list[np.ndarray]]] = {}
        self.trained: Counter = Counter()

    def add(self, split: str, columns: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Add rows given as the writer takes them: id-list column -> (flat values, per-row lengths)."""
        d = self.data.setdefault(split, {c: [] for c in self.cols})
        if self.task == "sft":
            ids_len = columns["input_ids"][1]
            mask, lengths = columns["loss_mask"]
            ends = np.cumsum(lengths)
            starts = ends - lengths
            nonzero = np.flatnonzero(mask)
            at = np.searchsorted(nonzero, starts)
            trained = np.searchsorted(nonzero, ends) - at
            # first trained position of each row (its prompt length), or the row's length when none is
            first_trained = nonzero[np.minimum(at, len(nonzero) - 1)] - starts if len(nonzero) else starts
            first = np.where(trained > 0, first_trained, ids_len)  # the prompt's length; all of it when nothing is trained
            d["total"].append(ids_len)
            d["prompt"].append(first)
            d["completion"].append(ids_len - first)
            self.trained[split] += int(trained.sum())
        else:
            p, c, r = (columns[k][1] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
            d["total"].append(p + np.maximum(c, r))
            d["prompt"].append(p)
            d["chosen"].append(c)
            d["rejected"].append(r)
            self.trained[split] += int(c.sum() + r.sum())

    def to_json(self) -> dict[str, Any]:
        out = {}
        for split, d in self.data.items():
            cols = {c: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for c, v in d.items()}
            out[split] = {"rows": len(cols["total"]), "trained_tokens": self.trained[split],
                          "lengths": {c: _percentiles(v) for c, v in cols.items()}}
        return out


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = ("tokenizer.sha256", "chat_template.sha256", "sources", "settings")
    diffs = []
    for key in keys:
        a: Any = old
        b: Any = new
        for part in key.split("."):
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if key == "sources":
            a = [s.get("sha256") for s in a or []]
            b = [s.get("sha256") for s in b or []]
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(key.split(".")[0])
    return ", ".join(diffs) or "settings hash"


def _staging_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def convert(inputs: list[str], out_dir: Path, task: str, tokenizer: str, *, max_length: int | None = None,
            max_prompt_length: int | None = None, length_policy: str = "drop", chat_template: str | None = None,
            eval_fraction: float = 0.0, eval_file: str | None = None, shard_rows: int = 50_000, num_proc: int = 1,
            on_error: str = "fail", seed: int = 0, overwrite: bool = False, input_format: str = "auto",
            train_on: str = "all", progress: bool = False, trust_remote_code: bool = False,
            rejects: str | None = None, fast_tokenize: bool = True) -> ConvertResult:
    """Convert raw files into shards in `out_dir` (see docs/SHARDS.md). Library entry point of the CLI."""
    global _ENCODER
    from aligndata.encode.template import resolve_chat_template
    from aligndata.encode.tokenizer import load_tokenizer, tokenizer_identity
    from aligndata.encode.encoder import Encoder

    _check_options(task, length_policy, train_on, eval_fraction, eval_file, num_proc, shard_rows, on_error,
                   max_length, max_prompt_length)
    check_format_option(input_format)
    out_dir = Path(out_dir)
    if not inputs:
        raise InputError("no input files")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists() \
            and not (out_dir / INCOMPLETE).exists():
        raise InputError(f"{out_dir}: directory is not empty and was not written by aligndata; choose another --out")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    template = resolve_chat_template(tok, chat_template)
    # fast_tokenize changes how, not what: it is not part of the settings (the shards are identical).
    encoder_kwargs = dict(max_length=max_length, max_prompt_length=max_prompt_length, length_policy=length_policy,
                          train_on=train_on, fast_tokenize=fast_tokenize)
    settings = {"max_length": max_length, "max_prompt_length": max_prompt_length, "length_policy": length_policy,
                "train_on": train_on if task == "sft" else None, "eval_fraction": eval_fraction,
                "eval_file": eval_file is not None, "seed": seed, "shard_rows": shard_rows,
                "input_format": input_format}

    roles = [(p, "train") for p in inputs] + ([(eval_file, "eval")] if eval_file else [])
    workers = None
    try:
        with _materialize_all([p for p, _ in roles]) as real_paths:
            sources = []
            for (path, role), real in zip(roles, real_paths):
                name = display_name(path)
                sources.append({"path": name, "sha256": _source_sha256(real, name), "role": role})
            earlier = (out_dir / MANIFEST).exists() and not overwrite  # an output to compare the settings with
            identity_job = None
            if num_proc > 1:
                try:
                    _ENCODER = Encoder(tok, template, **encoder_kwargs)
                except Exception:
                    pass  # raised again below, in its usual place
                else:
                    workers = _start_workers(num_proc, tokenizer, chat_template, trust_remote_code, encoder_kwargs)
                    if not earlier:
                        # Nothing to compare with before converting: a worker hashes the tokenizer (its first
                        # job, ~0.2 s for a 150k vocabulary) while this process starts on the records.
                        identity_job = workers.submit(_identity, (tokenizer,))
            manifest: dict[str, Any] = {
                "format_version": FORMAT_VERSION,
                "task": task,
                "created_by": f"aligndata {__version__}",
                "tokenizer": tokenizer_identity(tok, tokenizer) if identity_job is None else None,
                "chat_template": {"source": template.source, "sha256": template.sha256},
                "settings": settings,
                "sources": sources,
                "settings_sha256": None,
            }
            if identity_job is None:
                _settings_sha256(manifest)

            if earlier:
                try:
                    old = read_manifest(out_dir)
                except ShardError:
                    old = None
                if old is not None and old.get("settings_sha256") == manifest["settings_sha256"]:
                    try:
                        verify_shards(out_dir, old)
                        return ConvertResult(old, True, out_dir)
                    except ShardError:
                        pass  # damaged: rebuild
                elif old is not None:
                    raise InputError(f"{out_dir}: holds shards made with other settings "
                                     f"({_settings_diff(old, manifest)}); "
                                     "pass --overwrite to replace them, or choose another --out")

            staging = _staging_dir(out_dir)
            if staging.exists():
                if not (staging / INCOMPLETE).exists():
                    raise InputError(f"{staging}: exists and is not an unfinished aligndata output; remove it")
                shutil.rmtree(staging)
            prepare_output(staging)
            rejects_path = Path(rejects) if rejects else out_dir / "rejects.jsonl"
            staged_rejects = Path(rejects) if rejects else staging / "rejects.jsonl"

            if _ENCODER is None:
                _ENCODER = Encoder(tok, template, **encoder_kwargs)
            if num_proc > 1 and workers is None:
                workers = _start_workers(num_proc, tokenizer, chat_template, trust_remote_code, encoder_kwargs)
            writer = ShardWriter(staging, task, shard_rows)
            reject_sink = AtomicOutput(staged_rejects) if on_error == "skip" else None
            bar = FileProgress(progress)
            stats = _Stats(task)
            counts = {"read": 0, "kept": 0, "rejected": Counter(), "dropped": Counter(), "truncated": Counter()}
            try:
                for src_i, ((path, role), real) in enumerate(zip(roles, real_paths)):
                    _convert_file(path, real, role, src_i, sources[src_i], task, input_format, workers, writer, stats,
                                  counts, reject_sink, on_error, eval_fraction, seed, bar)
                if identity_job is not None:
                    manifest["tokenizer"] = identity_job.get()
                    _settings_sha256(manifest)
                bar.close()
                manifest["splits"] = writer.close()
                if reject_sink is not None:
                    reject_sink.commit()
                if not manifest["splits"]:
                    # Name the inputs and where the reasons went: the summary table is never printed on this path.
                    names = ", ".join(display_name(p) for p, _ in roles)
                    reasons = f"; the reasons are in {staged_rejects}" if reject_sink is not None else ""
                    raise InputError(f"{names}: no records were kept, nothing to write (read {counts['read']}, "
                                     f"rejected {sum(counts['rejected'].values())}, "
                                     f"dropped {sum(counts['dropped'].values())}){reasons}")
            except BaseException:
                bar.close()
                if reject_sink is not None:
                    reject_sink.abort()
                raise
    finally:
        if workers is not None:
            workers.terminate()
        _ENCODER = None

    kept = counts["kept"]
    manifest["counts"] = {
        "read": counts["read"], "kept": kept, "rejected": dict(counts["rejected"]),
        "dropped": dict(counts["dropped"]), "truncated": dict(counts["truncated"]),
    }
    manifest["stats"] = stats.to_json()
    for split, info in manifest["splits"].items():
        manifest["stats"].setdefault(split, {})["tokens"] = info["tokens"]
    manifest["reference"] = None
    finish_output(staging, manifest)
    _commit(staging, out_dir)
    return ConvertResult(manifest, False, out_dir, rejects_path if on_error == "skip" else None)


def _start_workers(num_proc: int, tokenizer: str, chat_template: str | None, trust_remote_code: bool,
                   encoder_kwargs: dict[str, Any]) -> WorkerGroup:
    """num_proc - 1 workers: the main process encodes too (see workers.ordered). The processes share
    the pieces their piece caches learn, so each common piece is tokenized by the library once."""
    return WorkerGroup(num_proc - 1, _init_worker, (tokenizer, chat_template, trust_remote_code, encoder_kwargs),
                       exchange=(_export_pieces, _import_pieces))


def _identity(spec: str) -> dict[str, Any]:
    """tokenizer_identity of this worker's tokenizer (the main process's own, inherited or loaded alike)."""
    from aligndata.encode.tokenizer import tokenizer_identity

    return tokenizer_identity(_ENCODER.tokenizer, spec)


def _settings_sha256(manifest: dict[str, Any]) -> None:
    """What decides whether an earlier output can stand: the task, the settings and every input's hash."""
    key = {k: manifest[k] for k in ("task", "settings")}
    key.update(tokenizer=manifest["tokenizer"].get("sha256"), template=manifest["chat_template"]["sha256"],
               sources=[s["sha256"] for s in manifest["sources"]])
    manifest["settings_sha256"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _export_pieces() -> dict[str, Any]:
    return _ENCODER.learnt_pieces() if _ENCODER is not None else {}


def _import_pieces(pieces: dict[str, Any]) -> None:
    if _ENCODER is not None:
        _ENCODER.add_pieces(pieces)


def _source_sha256(path: str, name: str) -> str:
    """sha256 of one input; a missing file or a directory is a usage error naming it (exit 2), as in the reader."""
    p = require_file(path, name)
    try:
        return sha256_file(p)
    except OSError as e:
        raise InputError(f"{name}: cannot read ({e.strerror})") from None


def _convert_file(path: str, real: str, role: str, src_i: int, source: dict[str, Any], task: str,
                  input_format: str, workers: Any, writer: ShardWriter, stats: _Stats, counts: dict[str, Any],
                  reject_sink: AtomicOutput | None, on_error: str, eval_fraction: float, seed: int,
                  bar: FileProgress) -> None:
    name = display_name(path)
    auto = input_format == "auto"
    # --format auto: the format of the first record that has one; every record is checked against it on the
    # way (job[6]), and a file that turns out mixed is then read whole for the error that describes it.
    fmt = start_format(real, name, input_format)
    try:
        require_task(name, fmt, task, task)
    except InputError:
        if auto:
            refuse_if_mixed(real, name)
        raise
    source["format"] = fmt
    source["records"] = 0
    with RecordStream(real, name) as stream:
        bar.start_file(stream, name)
        if stream.mode == "lines":  # the workers parse the lines: the main process only reads bytes
            jobs: Iterator[tuple] = ((name, fmt, task, on_error, "lines", chunk, auto)
                                     for chunk in _line_chunks(stream.raw_lines(), CHUNK, CHUNK_BYTES))
        else:
            jobs = ((name, fmt, task, on_error, "records", chunk, auto) for chunk in _chunks(stream, CHUNK))
        results = ordered(workers, _work, jobs) if workers is not None else map(_work, jobs)
        for res in results:
            if res.mismatch:
                refuse_if_mixed(real, name)
                raise InputError(f"{name}: changed while it was being converted")
            counts["read"] += res.records
            source["records"] += res.records
            bar.update(res.records)
            done = 0  # kept rows of this chunk written so far
            for other in res.others:
                if other.kept_before > done:
                    _write_kept(res, done, other.kept_before, role, src_i, source, seed, eval_fraction, writer, stats)
                    done = other.kept_before
                if other.kind == "drop":
                    counts["dropped"][other.reason] += 1
                    continue
                if on_error != "skip" or other.fatal:
                    raise InvalidRecordError(other.problems)
                counts["rejected"][other.problems[0].kind] += 1
                reject_sink.write(other.reject_line)
            if len(res.index) > done:
                _write_kept(res, done, len(res.index), role, src_i, source, seed, eval_fraction, writer, stats)
            counts["kept"] += len(res.index)
            for _, how in res.truncated:
                counts["truncated"][how] += 1


def _write_kept(res: _Result, start: int, stop: int, role: str, src_i: int, source: dict[str, Any], seed: int,
                eval_fraction: float, writer: ShardWriter, stats: _Stats) -> None:
    """Kept rows start..stop of a chunk to their splits' shards and stats."""
    index = res.index[start:stop]
    if role == "eval":
        splits = [("eval", None)]
    elif eval_fraction <= 0:
        splits = [("train", None)]
    else:
        in_eval = np.fromiter((_in_eval(seed, source["sha256"], int(i), eval_fraction) for i in index),
                              dtype=bool, count=len(index))
        splits = [("train", ~in_eval), ("eval", in_eval)]
    offsets = {col: np.concatenate(([0], np.cumsum(lengths))) for col, (_, lengths) in res.columns.items()}
    for split, mask in splits:
        rows = np.arange(start, stop) if mask is None else np.arange(start, stop)[mask]
        if not len(rows):
            continue
        columns: dict[str, Any] = {}
        for col, (values, lengths) in res.columns.items():
            off = offsets[col]
            if mask is None or mask.all():
                columns[col] = (values[off[start]:off[stop]], lengths[start:stop])
            else:
                columns[col] = (np.concatenate([values[off[i]:off[i + 1]] for i in rows]), lengths[rows])
        stats.add(split, columns)
        columns["source"] = np.full(len(rows), src_i, dtype=np.int64)
        columns["source_index"] = res.index[rows]
        writer.write_columns(split, columns, len(rows))


class _materialize_all:
    """Context manager: every input as a real path (stdin copied once to a temporary file)."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._cms: list[Any] = []

    def __enter__(self) -> list[str]:
        if self.paths.count("-") > 1:
            raise InputError("standard input (-) can be given only once")
        out = []
        for p in self.paths:
            cm = materialized(p)
            out.append(cm.__enter__())
            self._cms.append(cm)
        return out

    def __exit__(self, *exc: Any) -> None:
        for cm in reversed(self._cms):
            cm.__exit__(*exc)


def _commit(staging: Path, out_dir: Path) -> None:
    """Swap the finished staging directory into place; the old output is removed only afterwards."""
    trash = out_dir.parent / f".{out_dir.name}.old"
    if trash.exists():
        shutil.rmtree(trash)
    if out_dir.exists():
        os.rename(out_dir, trash)
    os.rename(staging, out_dir)
    if trash.exists():
        shutil.rmtree(trash)


def print_summary(result: ConvertResult, console: Any) -> None:
    from rich.table import Table

    m = result.manifest
    c = m["counts"]
    if result.skipped:
        console.print(f"{result.out_dir}: already converted with the same inputs and settings; nothing to do", markup=False)
    table = Table(title=f"{m['task']} shards in {result.out_dir}", title_justify="left")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("read", str(c["read"]))
    table.add_row("kept", str(c["kept"]))
    for split, info in m["splits"].items():
        table.add_row(f"  {split} rows / tokens", f"{info['rows']} / {info['tokens']}")
    for group in ("rejected", "dropped", "truncated"):
        for reason, n in sorted(c[group].items()):
            table.add_row(f"{group}: {reason}", str(n))
    console.print(table)
    rejected = sum(c["rejected"].values())
    dropped = sum(c["dropped"].values())
    line = f"read {c['read']} = kept {c['kept']} + rejected {rejected} + dropped {dropped}"
    if result.rejects_path is not None and rejected:
        line += f" (rejects: {result.rejects_path})"
    console.print(line, markup=False)
