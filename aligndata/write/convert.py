"""`aligndata convert --to sft|dpo`: raw records -> validated -> tokenized -> Arrow shards + manifest.

    read (main process)  ->  parse + check + encode (chunks of records: chunks.py)  ->  split + write (main process)

With `num_proc` N, N-1 worker processes and the main process itself encode chunks (the main process
takes one whenever each worker has two unanswered; see workers.py); JSON Lines travel to the workers
as raw line bytes and results come back as one flat array per column per chunk. Results are consumed
in input order, so the shards are byte-identical for any `num_proc`. Everything is written into a
staging directory next to the output and moved into place only after the manifest is written: a failed
or interrupted run leaves the previous output untouched and removes its `.NAME.partial` directory (a
killed one leaves it, and the next run removes it and says so). Where it may write is checked first
(targets.py), and the output is locked for the run (lock.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from aligndata import __version__
from aligndata.encode.encoder import Encoder
from aligndata.encode.template import TemplateInfo, resolve_chat_template
from aligndata.encode.tokenizer import load_tokenizer, tokenizer_identity
from aligndata.errors import InputError, InvalidRecordError
from aligndata.options import ConvertOptions
from aligndata.progress import FileProgress
from aligndata.read.reader import RawRecord, RecordStream, display_name, require_file
from aligndata.report.shard_checks import row_hashes
from aligndata.report.stats import first_trained, percentiles
from aligndata.read.detect import materialized, refuse_if_mixed, require_task, start_format
from aligndata.write.atomic import AtomicOutput
from aligndata.write.lock import hold_lock, lock_path_for
from aligndata.write.targets import refuse_foreign_files, refuse_overlaps, shard_output
from aligndata.write.chunks import ChunkEncoder, ChunkJob, ChunkResult, LineChunk, single_threaded_tokenizers
from aligndata.write.shards import (FORMAT_VERSION, INCOMPLETE, MANIFEST, ShardError, ShardWriter, dpo_trained_tokens,
                                    finish_output, prepare_output, read_manifest, sha256_file, verify_shards)
from aligndata.write.workers import Ticket, WorkerGroup, ordered

CHUNK = 64  # records per chunk of work
CHUNK_BYTES = 1 << 18  # and at most this many bytes of JSON Lines (long records): a chunk and its result
                       # then fit a worker's pipe twice over (see workers.py)


@dataclass
class ConvertResult:
    manifest: dict[str, Any]
    skipped: bool
    out_dir: Path
    rejects_path: Path | None = None
    notes: list[str] = field(default_factory=list)  # said after the summary: what the run found on the way


def convert(inputs: list[str], out_dir: Path, task: str, tokenizer: str, **options: Any) -> ConvertResult:
    """`convert_files` for Python callers: the keywords are ConvertOptions' fields."""
    return convert_files(inputs, out_dir, ConvertOptions(task=task, tokenizer=tokenizer, **options))


def convert_files(inputs: list[str], out_dir: Path, options: ConvertOptions) -> ConvertResult:
    """Convert raw files into shards in `out_dir` (see docs/SHARDS.md). Library entry point of the CLI.

    One run at a time per output: a second run on the same output is refused (LockHeld, exit 2)."""
    out_dir = shard_output(str(out_dir))
    _refuse_unusable_output(inputs, out_dir, options)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = load_tokenizer(options.tokenizer, trust_remote_code=options.trust_remote_code, eos_token=options.eos_token)
    template = resolve_chat_template(tok, options.chat_template)
    roles = [(p, "train") for p in inputs] + ([(options.eval_file, "eval")] if options.eval_file else [])
    with ExitStack() as inputs_open:
        if [p for p, _ in roles].count("-") > 1:
            raise InputError("standard input (-) can be given only once")
        real_paths = [inputs_open.enter_context(materialized(p)) for p, _ in roles]
        sources = [{"path": display_name(p), "sha256": _source_sha256(real, display_name(p)), "role": role}
                   for (p, role), real in zip(roles, real_paths)]
        made = _make_parents(out_dir)
        try:
            with hold_lock(lock_path_for(out_dir), f"the output {out_dir}"):
                return _convert_locked(out_dir, options, tok, template, roles, real_paths, sources)
        except BaseException:
            for d in made:  # a failed run leaves no directory it made behind (they are empty by now)
                _rmdir_if_empty(d)
            raise


def _convert_locked(out_dir: Path, options: ConvertOptions, tok: Any, template: TemplateInfo,
                    roles: list[tuple[str, str]], real_paths: list[str], sources: list[dict[str, Any]]) -> ConvertResult:
    """The conversion proper, holding the output's lock: compare with an earlier output, convert into
    the staging directory, swap it in. The staging directory never outlives a failed run."""
    earlier = (out_dir / MANIFEST).exists() and not options.overwrite  # an output to compare the settings with
    # Nothing to compare with and workers to come: one of them hashes the tokenizer (its first job,
    # ~0.2 s for a 150k vocabulary) while this process starts on the records.
    hash_later = options.num_proc > 1 and not earlier
    manifest = _new_manifest(options, None if hash_later else tokenizer_identity(tok, options.tokenizer),
                             template, sources)
    if earlier:
        done = _earlier_output(out_dir, manifest)
        if done is not None:
            return done
    if out_dir.is_dir():
        refuse_foreign_files(out_dir)
    staging, notes = _fresh_staging(out_dir)
    try:
        rejects_path = Path(options.rejects) if options.rejects else out_dir / "rejects.jsonl"
        staged_rejects = Path(options.rejects) if options.rejects else staging / "rejects.jsonl"
        encoder = ChunkEncoder(options, Encoder(tok, template, **options.encoder_arguments()))
        with Conversion(staging, options, encoder, staged_rejects,
                        reasons_if_nothing_kept=out_dir.with_name(f"{out_dir.name}.rejects.jsonl")) as conversion:
            identity = conversion.later(ChunkEncoder.tokenizer_identity) if hash_later else None
            for src_i, ((path, role), real) in enumerate(zip(roles, real_paths)):
                conversion.convert_source(src_i, path, real, role, sources[src_i])
            if identity is not None:
                manifest["tokenizer"] = identity.get()
                _settings_sha256(manifest)
            conversion.finish(manifest)
        finish_output(staging, manifest)
        _commit(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    notes += conversion.overlap.notes(options.eval_file)
    return ConvertResult(manifest, False, out_dir, rejects_path if options.on_error == "skip" else None, notes)


# -- one run -------------------------------------------------------------------------------------

@dataclass
class _Counts:
    """The manifest's `counts`: read = kept + rejected + dropped; truncated rows are kept rows."""

    read: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "rejected": dict(self.rejected), "dropped": dict(self.dropped),
                "truncated": dict(self.truncated)}


class Conversion:
    """One run into a staging directory: the encoding processes, the shard writer, the rejects file,
    the statistics and the counts. Use it as a context manager: an error leaves no rejects file and no
    worker behind."""

    def __init__(self, staging: Path, options: ConvertOptions, encoder: ChunkEncoder, rejects: Path, *,
                 reasons_if_nothing_kept: Path | None = None):
        self.options = options
        self.encoder = encoder
        self.workers = _start_workers(options.num_proc, encoder) if options.num_proc > 1 else None
        self.writer = ShardWriter(staging, options.task, options.shard_rows)
        self.rejects_path = rejects
        try:
            self.rejects = AtomicOutput(rejects) if options.on_error == "skip" else None
        except BaseException:
            self._stop_workers()
            raise
        self.bar = FileProgress(options.progress)
        self.stats = _Stats(options.task)
        self.counts = _Counts()
        self.overlap = _EvalOverlap(options.eval_file is not None)
        self.dropped_lengths: list[int] = []  # of the records too long: what to say when none is kept
        self.files: list[str] = []
        # Where a staged rejects file goes when nothing is kept: the staging directory goes with the failed run.
        self.reasons_if_nothing_kept = reasons_if_nothing_kept

    def __enter__(self) -> Conversion:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self.bar.close()
            if self.rejects is not None:
                self.rejects.abort()
        self._stop_workers()

    def _stop_workers(self) -> None:
        if self.workers is not None:
            self.workers.terminate()

    def later(self, fn: Any) -> Ticket:
        """fn(encoder) in a worker (there must be workers) while this process goes on with the records."""
        return self.workers.submit(fn, ()) or self.workers.run_here(fn)

    def convert_source(self, src_i: int, path: str, real: str, role: str, source: dict[str, Any]) -> None:
        """Read, encode and write one input; `source` (its manifest entry) gets its format and record count."""
        name = display_name(path)
        self.files.append(name)
        auto = self.options.input_format == "auto"
        # --format auto: the format of the first record that has one; every record is checked against it on the
        # way (ChunkEncoder.encode), and a file that turns out mixed is then read whole for the error that describes it.
        fmt = start_format(real, name, self.options.input_format)
        try:
            require_task(name, fmt, self.options.task, self.options.task)
        except InputError:
            if auto:
                refuse_if_mixed(real, name)
            raise
        source["format"] = fmt
        source["records"] = 0
        with RecordStream(real, name) as stream:
            self.bar.start_file(stream, name)
            if stream.mode == "lines":  # the workers parse the lines: the main process only reads bytes
                jobs: Iterator[ChunkJob] = (ChunkJob(name, fmt, chunk)
                                            for chunk in _line_chunks(stream.raw_lines(), CHUNK, CHUNK_BYTES))
            else:
                jobs = (ChunkJob(name, fmt, chunk) for chunk in _chunks(stream, CHUNK))
            if self.workers is not None:
                results = ordered(self.workers, ChunkEncoder.encode, jobs)
            else:
                results = map(self.encoder.encode, jobs)
            for res in results:
                if res.mismatch:
                    refuse_if_mixed(real, name)
                    raise InputError(f"{name}: changed while it was being converted")
                self.counts.read += res.records
                source["records"] += res.records
                self.bar.update(res.records)
                self._take(res, src_i, role, source["sha256"])

    def _take(self, res: ChunkResult, src_i: int, role: str, source_sha: str) -> None:
        """Write a chunk's kept rows, count the others; stop at a rejected record unless skipping."""
        done = 0  # kept rows of this chunk written so far
        for other in res.not_kept:
            if other.kept_before > done:
                self._write_kept(res, done, other.kept_before, src_i, role, source_sha)
                done = other.kept_before
            if other.kind == "drop":
                self.counts.dropped[other.reason] += 1
                if other.length is not None:
                    self.dropped_lengths.append(other.length)
                continue
            if self.options.on_error != "skip" or other.fatal:
                raise InvalidRecordError(other.problems)
            self.counts.rejected[other.problems[0].kind] += 1
            self.rejects.write(other.reject_line)
        if len(res.index) > done:
            self._write_kept(res, done, len(res.index), src_i, role, source_sha)
        self.counts.kept += len(res.index)
        for _, how in res.truncated:
            self.counts.truncated[how] += 1

    def _write_kept(self, res: ChunkResult, start: int, stop: int, src_i: int, role: str, source_sha: str) -> None:
        """Kept rows start..stop of a chunk to their splits' shards and stats."""
        index = res.index[start:stop]
        fraction, seed = self.options.eval_fraction, self.options.seed
        if role == "eval":
            splits = [("eval", None)]
        elif fraction <= 0:
            splits = [("train", None)]
        else:
            in_eval = np.fromiter((_in_eval(seed, source_sha, int(i), fraction) for i in index),
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
            self.stats.add(split, columns)
            self.overlap.add(role, columns)
            columns["source"] = np.full(len(rows), src_i, dtype=np.int64)
            columns["source_index"] = res.index[rows]
            self.writer.write_columns(split, columns, len(rows))

    def finish(self, manifest: dict[str, Any]) -> None:
        """Close the shards and the rejects file; complete the manifest with splits, counts and statistics."""
        self.bar.close()
        manifest["splits"] = self.writer.close()
        if self.rejects is not None:
            self.rejects.commit()
        if not manifest["splits"]:
            # Name the inputs and where the reasons went: the summary table is never printed on this path.
            reasons = ""
            if self.rejects is not None:
                where = self.rejects_path
                if self.reasons_if_nothing_kept is not None and where.parent == self.writer.out_dir:
                    os.replace(where, self.reasons_if_nothing_kept)
                    where = self.reasons_if_nothing_kept
                reasons = f"; the reasons are in {where}"
            c = self.counts
            raise InputError(f"{', '.join(self.files)}: no records were kept, nothing to write (read {c.read}, "
                             f"rejected {sum(c.rejected.values())}, dropped {sum(c.dropped.values())}){reasons}"
                             f"{self._too_long()}")
        manifest["counts"] = self.counts.to_json()
        manifest["stats"] = self.stats.to_json()
        for split, info in manifest["splits"].items():
            manifest["stats"].setdefault(split, {})["tokens"] = info["tokens"]
        manifest["reference"] = None


    def _too_long(self) -> str:
        """What the records dropped for their length measure, and the two ways to keep them."""
        if not self.dropped_lengths:
            return ""
        p = percentiles(self.dropped_lengths)
        return (f"; {len(self.dropped_lengths)} were longer than --max-length {self.options.max_length} (their lengths: "
                f"p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, longest {p['max']} tokens): raise --max-length, "
                "or cut them with --length-policy truncate")


def _start_workers(num_proc: int, encoder: ChunkEncoder) -> WorkerGroup:
    """num_proc - 1 workers: the main process encodes too (see workers.ordered). The processes share
    the pieces their piece caches learn, so each common piece is tokenized by the library once."""
    return WorkerGroup(num_proc - 1, single_threaded_tokenizers, state=encoder,
                       exchange=(ChunkEncoder.learnt_pieces, ChunkEncoder.add_pieces))


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


def _line_chunks(lines: Iterable[tuple[int, int, bytes]], size: int, max_bytes: int) -> Iterator[LineChunk]:
    """Raw JSON Lines in chunks of `size` lines, fewer where they reach `max_bytes`."""
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
            yield LineChunk(first, linenos, chunk)
            linenos, chunk, nbytes = [], [], 0
    if chunk:
        yield LineChunk(first, linenos, chunk)


# -- statistics ------------------------------------------------------------------------------------

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
            mask, mask_lengths = columns["loss_mask"]
            first = first_trained(mask, mask_lengths)
            d["total"].append(ids_len)
            d["prompt"].append(first)
            d["completion"].append(ids_len - first)
            self.trained[split] += int(np.count_nonzero(mask))
        else:
            p, c, r = (columns[k][1] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
            d["total"].append(p + np.maximum(c, r))
            d["prompt"].append(p)
            d["chosen"].append(c)
            d["rejected"].append(r)
            self.trained[split] += dpo_trained_tokens(int(c.sum()), int(r.sum()))

    def to_json(self) -> dict[str, Any]:
        out = {}
        for split, d in self.data.items():
            cols = {c: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for c, v in d.items()}
            out[split] = {"rows": len(cols["total"]), "trained_tokens": self.trained[split],
                          "lengths": {c: percentiles(v) for c, v in cols.items()}}
        return out


class _EvalOverlap:
    """Rows of the eval file identical, token for token, to a training row: counted for the summary
    (the eval file comes after the training inputs, so its rows are compared with all of theirs)."""

    def __init__(self, active: bool):
        self.active = active
        self.seen: dict[str, list[np.ndarray]] = {"train": [], "eval": []}

    def add(self, role: str, columns: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        if not self.active:
            return
        combined = None
        for values, lengths in columns.values():  # one fingerprint over every id column of the row
            offsets = np.concatenate(([0], np.cumsum(lengths)))
            h = row_hashes(values, offsets)
            combined = h if combined is None else combined * np.uint64(0x100000001B3) ^ h
        self.seen[role].append(combined)

    def notes(self, eval_file: str | None) -> list[str]:
        if not self.active or not self.seen["eval"]:
            return []
        train, held_out = (np.concatenate(v) if v else np.zeros(0, np.uint64) for v in self.seen.values())
        same = int(np.isin(held_out, train).sum())
        if not same:
            return []
        return [f"--eval-file {eval_file}: {same} of its {len(held_out)} kept records are identical to training "
                "records (after tokenization); the eval loss on them measures memorization"]


# -- the output directory and its manifest -------------------------------------------------------------

def _refuse_unusable_output(inputs: list[str], out_dir: Path, options: ConvertOptions) -> None:
    if not inputs:
        raise InputError("no input files")
    refuse_overlaps(inputs, out_dir=out_dir, rejects=options.rejects, eval_file=options.eval_file)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists() \
            and not (out_dir / INCOMPLETE).exists():
        raise InputError(f"{out_dir}: directory is not empty and was not written by aligndata; choose another --out")


def _source_sha256(path: str, name: str) -> str:
    """sha256 of one input; a missing file or a directory is a usage error naming it (exit 2), as in the reader."""
    p = require_file(path, name)
    try:
        return sha256_file(p)
    except OSError as e:
        raise InputError(f"{name}: cannot read ({e.strerror})") from None


def _new_manifest(options: ConvertOptions, tokenizer: dict[str, Any] | None, template: TemplateInfo,
                  sources: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest as far as it is known before converting; `tokenizer` None: hashed later, and the
    settings hash with it."""
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "task": options.task,
        "created_by": f"aligndata {__version__}",
        "tokenizer": tokenizer,
        "chat_template": {"source": template.source, "sha256": template.sha256},
        "settings": options.settings(),
        "sources": sources,
        "settings_sha256": None,
    }
    if tokenizer is not None:
        _settings_sha256(manifest)
    return manifest


def _settings_sha256(manifest: dict[str, Any]) -> None:
    """What decides whether an earlier output can stand: the task, the settings and every input's hash."""
    key = {k: manifest[k] for k in ("task", "settings")}
    key.update(tokenizer=manifest["tokenizer"].get("sha256"), template=manifest["chat_template"]["sha256"],
               sources=[s["sha256"] for s in manifest["sources"]])
    manifest["settings_sha256"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _earlier_output(out_dir: Path, manifest: dict[str, Any]) -> ConvertResult | None:
    """The complete output already there when it was made with the same settings; refuse other settings.
    None: convert (no readable manifest, or damaged shards)."""
    try:
        old = read_manifest(out_dir)
    except ShardError:
        return None
    if old.get("settings_sha256") == manifest["settings_sha256"]:
        try:
            verify_shards(out_dir, old)
            return ConvertResult(old, True, out_dir)
        except ShardError:
            return None  # damaged: rebuild
    raise InputError(f"{out_dir}: holds shards made with other settings ({_settings_diff(old, manifest)}); "
                     "pass --overwrite to replace them, or choose another --out")


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


def _fresh_staging(out_dir: Path) -> tuple[Path, list[str]]:
    """The empty staging directory `.OUT.partial` beside OUT, marked incomplete, and a note naming the
    unfinished run's staging directory when one was removed (its process is gone: we hold the lock)."""
    staging = out_dir.parent / f".{out_dir.name}.partial"
    notes = []
    if staging.exists() or staging.is_symlink():
        if staging.is_symlink() or not (staging / INCOMPLETE).exists():
            raise InputError(f"{staging}: exists and is not an unfinished aligndata output; remove it")
        shutil.rmtree(staging)
        notes.append(f"removed {staging}, left by an interrupted run")
    prepare_output(staging)
    return staging, notes


def _commit(staging: Path, out_dir: Path) -> None:
    """Swap the finished staging directory into place; the old output is removed only afterwards."""
    trash = out_dir.parent / f".{out_dir.name}.old"
    _remove(trash)
    if out_dir.exists():
        os.rename(out_dir, trash)
    os.rename(staging, out_dir)
    _remove(trash)


def _remove(path: Path) -> None:
    """Remove what an earlier run left at `path`: our old output, or a link an older version left there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _make_parents(out_dir: Path) -> list[Path]:
    """Create the missing parents of `out_dir` (the lock file goes beside it); the ones made, deepest first."""
    made = [p for p in out_dir.parents if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return made


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


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
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    if m["settings"]["max_length"] is None:
        longest = max(split["lengths"]["total"]["max"] for split in m["stats"].values())
        console.print(f"no --max-length: no length limit (the longest sequence has {longest} tokens)", markup=False)
