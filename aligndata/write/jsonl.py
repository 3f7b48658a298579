"""`aligndata convert --to openai|preference`: write canonical records as JSONL.

Conversations become OpenAI `{"messages": [...], "tools"?}` lines; preference pairs become
`{"prompt": [...], "chosen": [...], "rejected": [...], "tools"?}` lines. Output and rejects are
written to temporary files and renamed into place only when the run succeeds, so a failed or
killed run leaves the previous output untouched.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from aligndata.errors import InputError, InvalidRecordError
from aligndata.options import check_on_error
from aligndata.progress import FileProgress
from aligndata.read.detect import require_task
from aligndata.read.validate import Checked, FileCheck, read_records
from aligndata.write.atomic import AtomicOutput, special_file
from aligndata.write.lock import hold_lock, lock_path_for
from aligndata.write.targets import refuse_overlaps

TARGET_TASK = {"openai": "sft", "preference": "dpo"}


@dataclass
class Counts:
    read: int = 0
    written: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)


def reject_line(checked: Checked, file: str) -> str:
    """One rejects-file line: where the record was, why it was rejected, and the record itself."""
    raw = checked.raw
    entry = {
        "file": file,
        "line": raw.line,
        "record": raw.index,
        "reasons": [p.to_json() for p in checked.problems],
    }
    if raw.error is None:
        entry["value"] = raw.value
    else:
        entry["text"] = raw.text
    line = json.dumps(entry, ensure_ascii=False, allow_nan=True)
    if "lone-surrogate" in (p.kind for p in checked.problems):  # no UTF-8 for them: written as \u escapes
        line = json.dumps(entry, allow_nan=True)
    return line


def iter_inputs(inputs: list[str], input_format: str, progress: FileProgress,
                counts: Counts) -> Iterator[tuple[FileCheck, Checked]]:
    """Every checked record of every input, in order. A mixed-format file fails (never guessed)."""
    for path in inputs:
        fc = FileCheck(path, input_format)
        for checked in read_records(fc, progress):
            counts.read += 1
            yield fc, checked


def normalize(inputs: list[str], out: str, to: str, *, on_error: str = "fail", rejects: str | None = None,
              input_format: str = "auto", progress: bool = True, overwrite: bool = False) -> Counts:
    """Write the inputs' records as canonical JSON Lines to `out` (`-`: standard output). An existing
    output file is replaced only with `overwrite`, as shards are; one run at a time per output."""
    if to not in TARGET_TASK:
        raise InputError(f"--to {to!r}: choose openai or preference (or sft/dpo with --tokenizer)")
    check_on_error(on_error)
    if on_error == "skip" and rejects is None:
        if out == "-":
            raise InputError("--on-error skip with --out - needs --rejects PATH (rejected records are never dropped silently)")
        rejects = f"{out}.rejects.jsonl"
    refuse_overlaps(inputs, out_file=out, rejects=rejects if on_error == "skip" else None)
    if out == "-":
        return _normalize(inputs, out, to, on_error, rejects, input_format, progress)
    real = Path(os.path.realpath(out))
    if not overwrite and real.is_file() and real.stat().st_size:
        raise InputError(f"{out}: exists; pass --overwrite to replace it, or choose another --out")
    if special_file(real, out):  # written in place, nothing to lock beside: /dev/stdout, a FIFO
        return _normalize(inputs, out, to, on_error, rejects, input_format, progress)
    real.parent.mkdir(parents=True, exist_ok=True)
    with hold_lock(lock_path_for(real), f"the output {out}"):
        return _normalize(inputs, out, to, on_error, rejects, input_format, progress)


def _normalize(inputs: list[str], out: str, to: str, on_error: str, rejects: str | None, input_format: str,
               progress: bool) -> Counts:
    counts = Counts()
    bar = FileProgress(progress)
    sink = AtomicOutput(out) if out != "-" else None
    reject_sink = AtomicOutput(rejects) if on_error == "skip" else None
    try:
        for fc, checked in iter_inputs(inputs, input_format, bar, counts):
            try:
                require_task(fc.name, fc.format, TARGET_TASK[to], to)
            except InputError:
                fc.refuse_if_mixed()
                raise
            if checked.ok:
                line = json.dumps(checked.record.to_json(), ensure_ascii=False)
                if sink is None:
                    sys.stdout.write(line + "\n")
                else:
                    sink.write(line)
                counts.written += 1
                continue
            if on_error != "skip" or checked.raw.fatal:
                # A fatal error (syntax error inside a JSON array) hides the rest of the file:
                # skipping it would drop those records silently, so it always stops the run.
                raise InvalidRecordError(checked.problems)
            counts.rejected += 1
            counts.reasons.update({p.kind for p in checked.problems})
            if reject_sink is not None:
                reject_sink.write(reject_line(checked, fc.name))
    except BaseException:
        bar.close()
        for s in (sink, reject_sink):
            if s is not None:
                s.abort()
        raise
    bar.close()
    for s in (sink, reject_sink):
        if s is not None:
            s.commit()
    assert counts.read == counts.written + counts.rejected
    return counts
