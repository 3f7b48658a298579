"""Lint chat / preference data: raw files before conversion, and the token ids of converted shards.

    raw file -> FileCheck (schema + rules, per record) -> canonical records -> counters -> LintReport
    shard record batches -> ShardChecks (numpy over the flat id buffers)     -> shard_findings

Nothing here loads a tokenizer (the shard checks get the end-of-turn ids from the caller). Invalid
records are counted by problem kind, never raised (`aligndata validate` prints each one). Warnings
are findings about *valid* data that still deserve a look before training:

- identical / near-identical chosen and rejected replies (difflib ratio >= NEAR_IDENTICAL),
- prompts that occur more than once (hash of the whitespace-normalised prompt messages, or of the ids),
- length bias: chosen longer than rejected in far more (or far fewer) pairs than half,
- a system field or system message that is present but empty,
- shards: a completion (DPO) or trained span (SFT) that does not end with the end-of-turn token.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from aligndata.read.formats import FORMATS
from aligndata.read.formats.common import Issues
from aligndata.records import Conversation, Message, PreferencePair, Record
from aligndata.read.validate import Checked, FileCheck, read_records

NEAR_IDENTICAL = 0.9
# Replies are compared on at most this many leading characters: difflib is quadratic in the worst case.
SIMILARITY_CHARS = 1000
# Chosen longer than rejected in more than BIAS_HIGH (or fewer than BIAS_LOW) of the pairs is a bias.
BIAS_LOW, BIAS_HIGH = 0.35, 0.65
EXAMPLES = 10  # record numbers kept per finding
TOP_DUPLICATES = 5
_WS = re.compile(r"\s+")


def percentiles(values: Any) -> dict[str, int]:
    """p50/p90/p99/max by nearest rank (round half up), the definition `convert` writes to the manifest."""
    s = np.sort(np.asarray(values, dtype=np.int64))
    if not s.size:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}

    def at(q: float) -> int:
        return int(s[min(s.size - 1, int(q * (s.size - 1) + 0.5))])

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": int(s[-1])}


# -- pure helpers --------------------------------------------------------------------------------

def normalize_text(text: str) -> str:
    return _WS.sub(" ", text).strip()


def message_text(m: Message) -> str:
    """What a reply says: its content, or its tool calls when it has no text."""
    if m.content.strip() or not m.tool_calls:
        return m.content
    return json.dumps(m.tool_calls, sort_keys=True, ensure_ascii=False)


def similarity(a: str, b: str, limit: int = SIMILARITY_CHARS) -> float:
    """difflib ratio of two texts in [0, 1], computed on at most `limit` leading characters each.

    Exact at or above NEAR_IDENTICAL. Below it the value may be only an upper bound: the cheap bounds
    (length ratio, then difflib's quick ratios) settle most pairs without the quadratic matching, so
    long, clearly different replies cost almost nothing.
    """
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    bound = 2 * min(len(a), len(b)) / (len(a) + len(b))
    if bound < NEAR_IDENTICAL:
        return bound  # an upper bound is enough to say "not near-identical"
    sm = difflib.SequenceMatcher(None, a[:limit], b[:limit], autojunk=False)
    if sm.real_quick_ratio() < NEAR_IDENTICAL or sm.quick_ratio() < NEAR_IDENTICAL:
        return sm.quick_ratio()
    return sm.ratio()


def prompt_key(messages: list[Message]) -> bytes:
    """A 16-byte digest of the prompt messages, insensitive to whitespace differences."""
    parts = [[m.role, normalize_text(m.content), m.tool_calls or None] for m in messages]
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=16).digest()


def prompt_of(record: Record) -> list[Message]:
    """The prompt of a pair; for a conversation, everything before its last assistant turn."""
    if isinstance(record, PreferencePair):
        return record.prompt
    msgs = record.messages
    last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=len(msgs))
    return msgs[:last]


def has_empty_system(value: Any) -> bool:
    """A `system` field, or a system message, that is present but holds no text (raw record)."""
    lists: list[Any] = []
    if isinstance(value, dict):
        if "system" in value and _blank(value["system"]):
            return True
        lists = [value.get(k) for k in ("messages", "prompt", "conversations")]
    elif isinstance(value, list):
        lists = [value]
    for msgs in lists:
        if not isinstance(msgs, list):
            continue
        for m in msgs:
            if isinstance(m, dict) and "system" in (m.get("role"), m.get("from")):
                if _blank(m.get("content", m.get("value"))):
                    return True
    return False


def _blank(v: Any) -> bool:
    return v is None or v == [] or (isinstance(v, str) and not v.strip())


def _preview(messages: list[Message], width: int = 60) -> str:
    text = normalize_text(next((m.content for m in reversed(messages) if m.content.strip()), ""))
    return text if len(text) <= width else text[: width - 1] + "…"


# -- the report ----------------------------------------------------------------------------------

@dataclass
class Finding:
    kind: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.message}


@dataclass
class LintReport:
    file: str
    format: str | None = None
    task: str | None = None
    records: int = 0
    valid: int = 0
    problems_by_kind: Counter = field(default_factory=Counter)
    first_problems: list[str] = field(default_factory=list)
    mixed: str | None = None
    turns: dict[str, int] = field(default_factory=dict)
    roles: Counter = field(default_factory=Counter)
    with_system: int = 0
    with_tools: int = 0
    empty_system: list[int] = field(default_factory=list)  # record numbers
    empty_system_count: int = 0
    # preference pairs only
    pairs: int = 0
    identical: list[int] = field(default_factory=list)
    identical_count: int = 0
    near_identical: list[tuple[int, float]] = field(default_factory=list)
    near_identical_count: int = 0
    chosen_longer: int = 0
    chosen_shorter: int = 0
    same_length: int = 0
    duplicate_prompts: int = 0  # distinct prompts seen more than once
    duplicate_records: int = 0  # records whose prompt was seen before
    top_duplicates: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def invalid(self) -> int:
        return self.records - self.valid

    @property
    def length_bias(self) -> float | None:
        """Share of pairs (of those with different lengths) whose chosen reply is longer, in characters."""
        n = self.chosen_longer + self.chosen_shorter
        return self.chosen_longer / n if n else None

    def share(self, n: int) -> float:
        return n / self.valid if self.valid else 0.0

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": "raw", "file": self.file, "format": self.format, "task": self.task,
            "records": self.records, "valid": self.valid, "invalid": self.invalid,
            "problems_by_kind": dict(self.problems_by_kind), "mixed_formats": self.mixed,
            "turns": self.turns, "roles": dict(self.roles),
            "with_system": {"records": self.with_system, "share": self.share(self.with_system)},
            "with_tools": {"records": self.with_tools, "share": self.share(self.with_tools)},
            "empty_system": {"records": self.empty_system_count, "examples": self.empty_system},
            "duplicate_prompts": {"prompts": self.duplicate_prompts, "repeat_records": self.duplicate_records,
                                  "top": self.top_duplicates},
            "pairs": None,
            "warnings": [w.to_json() for w in self.warnings],
        }
        if self.task == "dpo":
            doc["pairs"] = {
                "pairs": self.pairs,
                "identical": {"records": self.identical_count, "examples": self.identical},
                "near_identical": {"records": self.near_identical_count, "threshold": NEAR_IDENTICAL,
                                   "examples": [{"record": r, "ratio": round(x, 4)} for r, x in self.near_identical]},
                "length_bias": {"chosen_longer": self.chosen_longer, "chosen_shorter": self.chosen_shorter,
                                "same_length": self.same_length, "share_chosen_longer": self.length_bias,
                                "warn_below": BIAS_LOW, "warn_above": BIAS_HIGH},
            }
        return doc


class _Duplicates:
    """Prompt digests -> first record number; groups kept only for prompts seen twice or more."""

    def __init__(self) -> None:
        self.first: dict[bytes, int] = {}
        self.groups: dict[bytes, dict[str, Any]] = {}

    def add(self, key: bytes, record: int, prompt: list[Message]) -> None:
        first = self.first.setdefault(key, record)
        if first == record:
            return
        group = self.groups.setdefault(key, {"count": 1, "records": [first], "preview": _preview(prompt)})
        group["count"] += 1
        if len(group["records"]) < EXAMPLES:
            group["records"].append(record)


def lint_file(path: str, input_format: str = "auto") -> LintReport:
    """Read one raw file once and collect its statistics and warnings. Raises InputError if unreadable."""
    fc = FileCheck(path, input_format)
    report = LintReport(fc.name)
    turns = array("i")
    dups = _Duplicates()
    for checked in read_records(fc, allow_mixed=True):
        if report.records == 0 or checked.mixed:
            report.format = fc.format
            report.task = FORMATS[fc.format].task if fc.format else None
            if checked.mixed:
                report.mixed = checked.mixed.message
        report.records += 1
        n = checked.raw.index
        if checked.raw.error is None and has_empty_system(checked.raw.value):
            report.empty_system_count += 1
            if len(report.empty_system) < EXAMPLES:
                report.empty_system.append(n)
        record = checked.record if checked.ok else _identical_only(checked)
        if checked.ok:
            report.valid += 1
        else:
            report.problems_by_kind.update(p.kind for p in checked.problems)
            if len(report.first_problems) < 3:
                report.first_problems.append(str(checked.problems[0]))
        if record is None:
            continue
        _count_shape(report, record, turns)
        prompt = prompt_of(record)
        dups.add(prompt_key(prompt), n, prompt)
        if isinstance(record, PreferencePair):
            _check_pair(report, record, n)
    report.turns = percentiles(turns)
    report.duplicate_prompts = len(dups.groups)
    report.duplicate_records = sum(g["count"] - 1 for g in dups.groups.values())
    top = sorted(dups.groups.values(), key=lambda g: (-g["count"], g["records"][0]))[:TOP_DUPLICATES]
    report.top_duplicates = top
    report.warnings = _warnings(report)
    return report


def _identical_only(checked: Checked) -> Record | None:
    """Records the rules refuse *only* as identical pairs still count for the lint: that is a finding."""
    if checked.raw.error is not None or not checked.problems or checked.format is None:
        return None
    if any(p.kind != "identical-pair" for p in checked.problems):
        return None
    return FORMATS[checked.format].adapt(checked.raw.value, Issues())


def _count_shape(report: LintReport, record: Record, turns: array) -> None:
    if isinstance(record, Conversation):
        msgs = record.messages
        turns.append(len(msgs))
        every = msgs
    else:
        msgs = record.prompt + record.chosen
        turns.append(len(msgs))
        every = record.prompt + record.chosen + record.rejected
    report.roles.update(m.role for m in every)
    if msgs and msgs[0].role == "system":
        report.with_system += 1
    if record.tools or any(m.tool_calls or m.role == "tool" for m in every):
        report.with_tools += 1


def _check_pair(report: LintReport, pair: PreferencePair, n: int) -> None:
    report.pairs += 1
    chosen = normalize_text(message_text(pair.chosen[-1])) if pair.chosen else ""
    rejected = normalize_text(message_text(pair.rejected[-1])) if pair.rejected else ""
    if chosen == rejected:
        report.identical_count += 1
        if len(report.identical) < EXAMPLES:
            report.identical.append(n)
    else:
        ratio = similarity(chosen, rejected)
        if ratio >= NEAR_IDENTICAL:
            report.near_identical_count += 1
            if len(report.near_identical) < EXAMPLES:
                report.near_identical.append((n, ratio))
    lc = sum(len(message_text(m)) for m in pair.chosen)
    lr = sum(len(message_text(m)) for m in pair.rejected)
    if lc > lr:
        report.chosen_longer += 1
    elif lc < lr:
        report.chosen_shorter += 1
    else:
        report.same_length += 1


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _records(numbers: list[int], total: int) -> str:
    shown = ", ".join(str(i) for i in numbers)
    return shown + (", ..." if total > len(numbers) else "")


def _warnings(r: LintReport) -> list[Finding]:
    out = []
    if r.invalid:
        kinds = ", ".join(f"{k}: {v}" for k, v in r.problems_by_kind.most_common())
        out.append(Finding("invalid", f"{r.invalid} of {r.records} records are invalid ({kinds}); "
                                       f"run `aligndata validate {r.file}` for every problem"))
    if r.mixed:
        out.append(Finding("mixed-format", r.mixed))
    if r.empty_system_count:
        out.append(Finding("empty-system", f"{_n(r.empty_system_count, 'record')} with an empty system prompt: "
                                            f"records {_records(r.empty_system, r.empty_system_count)}"))
    if r.identical_count:
        out.append(Finding("identical-pair", f"{_n(r.identical_count, 'pair')} with the same chosen and rejected "
                                              f"reply: records {_records(r.identical, r.identical_count)}"))
    if r.near_identical_count:
        recs = ", ".join(f"{n} ({x:.2f})" for n, x in r.near_identical)
        more = ", ..." if r.near_identical_count > len(r.near_identical) else ""
        out.append(Finding("near-identical-pair",
                            f"{_n(r.near_identical_count, 'pair')} with nearly the same chosen and rejected reply "
                            f"(similarity >= {NEAR_IDENTICAL}): records {recs}{more}"))
    if r.duplicate_prompts:
        top = r.top_duplicates[0]
        out.append(Finding("duplicate-prompt",
                            f"{_n(r.duplicate_prompts, 'prompt')} occurring more than once ({r.duplicate_records} "
                            "repeats); "
                            f"most often: {top['count']}x, records {_records(top['records'], top['count'])}"))
    bias = r.length_bias
    if bias is not None and not BIAS_LOW <= bias <= BIAS_HIGH:
        longer = "longer" if bias > BIAS_HIGH else "shorter"
        share = bias if bias > BIAS_HIGH else 1 - bias
        out.append(Finding("length-bias",
                            f"chosen is {longer} than rejected in {share:.0%} of the pairs that differ in length "
                            f"({r.chosen_longer} longer, {r.chosen_shorter} shorter, {r.same_length} equal): "
                            "a DPO model can learn length instead of quality"))
    return out


# -- the same checks on shards (token ids, one record batch at a time) -----------------------------

def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a fixed pseudo-random 64-bit value per input (wrapping uint64 arithmetic)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


_WEIGHTS = _mix(np.arange(4096))


def _weights(n: int) -> np.ndarray:
    """_mix(0..n-1), computed once and grown by doubling."""
    global _WEIGHTS
    if n > _WEIGHTS.size:
        _WEIGHTS = _mix(np.arange(max(n, 2 * _WEIGHTS.size)))
    return _WEIGHTS


def _positions(lengths: np.ndarray) -> np.ndarray:
    """0, 1, ..., len-1 for each row, concatenated."""
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)


def row_hashes(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """A 64-bit fingerprint per list row: a sum of pseudo-random weights (one per position) times the
    ids, so equal rows get equal hashes and two different rows collide with a chance of about 2^-64."""
    lengths = np.diff(offsets)
    pos = _positions(lengths)
    terms = _weights(int(lengths.max(initial=0)))[pos] * (values.astype(np.uint64) + np.uint64(1))
    cums = np.concatenate([np.zeros(1, np.uint64), np.cumsum(terms, dtype=np.uint64)])
    return (cums[offsets[1:]] - cums[offsets[:-1]]) ^ _mix(lengths + (1 << 40))


def equal_rows(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Rows (as local indices) where list column a equals list column b; each is (values, offsets).
    Only rows of equal length are compared, token by token."""
    (av, ao), (bv, bo) = a, b
    al, bl = np.diff(ao), np.diff(bo)
    cand = np.flatnonzero(al == bl)
    lens = al[cand]
    pos = _positions(lens)
    differs = av[np.repeat(ao[cand], lens) + pos] != bv[np.repeat(bo[cand], lens) + pos]
    counts = np.concatenate([np.zeros(1, np.int64), np.cumsum(differs, dtype=np.int64)])
    ends = np.cumsum(lens)
    return cand[counts[ends] == counts[ends - lens]]


class ShardChecks:
    """End-of-turn and (DPO) pair checks, accumulated batch by batch."""

    def __init__(self, task: str):
        self.task = task
        self.spans = 0
        self.bad_spans = 0
        self.bad_rows: list[np.ndarray] = []  # split row numbers
        self.untrained = 0
        self.bad_chosen = 0
        self.bad_rejected = 0
        self.longer = self.shorter = self.equal = 0
        self.identical: list[np.ndarray] = []
        self.prompt_keys: list[np.ndarray] = []

    def sft_batch(self, start: int, v: np.ndarray, m: np.ndarray, off: np.ndarray, lens: np.ndarray,
                  eot: np.ndarray) -> None:
        nxt = np.zeros(m.size, dtype=bool)
        nxt[:-1] = m[1:] != 0
        nxt[off[1:][lens > 0] - 1] = False  # a row's last token ends its span whatever follows
        ends = np.flatnonzero((m != 0) & ~nxt)
        bad = ends[~np.isin(v[ends], eot)]
        self.spans += ends.size
        self.bad_spans += bad.size
        self.bad_rows.append(np.unique(np.searchsorted(off, bad, side="right") - 1) + start)
        trained_rows = np.unique(np.searchsorted(off, ends, side="right") - 1)
        self.untrained += int(lens.size - trained_rows.size)

    def dpo_batch(self, start: int, prompt: tuple, chosen: tuple, rejected: tuple, eot: np.ndarray) -> None:
        (pv, po), (cv, co, cl), (rv, ro, rl) = prompt, chosen, rejected
        chosen_bad, rejected_bad = _misses_end(cv, co, cl, eot), _misses_end(rv, ro, rl, eot)
        self.bad_chosen += int(chosen_bad.sum())
        self.bad_rejected += int(rejected_bad.sum())
        self.bad_rows.append(np.flatnonzero(chosen_bad | rejected_bad) + start)
        self.longer += int((cl > rl).sum())
        self.shorter += int((cl < rl).sum())
        self.equal += int((cl == rl).sum())
        self.identical.append(equal_rows((cv, co), (rv, ro)) + start)
        self.prompt_keys.append(row_hashes(pv, po))

    def finish(self, where: RowLocator) -> dict[str, Any]:
        bad_rows = np.concatenate(self.bad_rows) if self.bad_rows else np.zeros(0, np.int64)
        if self.task == "sft":
            return {"end_of_turn": {"spans": self.spans, "spans_without": self.bad_spans,
                                    "rows_without": int(bad_rows.size), "rows_untrained": self.untrained,
                                    "examples": where.rows(bad_rows[:EXAMPLES])}}
        identical = np.concatenate(self.identical) if self.identical else np.zeros(0, np.int64)
        keys = np.concatenate(self.prompt_keys) if self.prompt_keys else np.zeros(0, np.uint64)
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        repeated = np.flatnonzero(counts > 1)
        top = repeated[np.argsort(-counts[repeated], kind="stable")][:TOP_DUPLICATES]
        n = self.longer + self.shorter
        return {
            "end_of_turn": {"chosen_without": self.bad_chosen, "rejected_without": self.bad_rejected,
                            "rows_without": int(bad_rows.size), "examples": where.rows(bad_rows[:EXAMPLES])},
            "identical": {"rows": int(identical.size), "examples": where.rows(identical[:EXAMPLES])},
            "duplicate_prompts": {
                "prompts": int(repeated.size), "repeat_rows": int((counts[repeated] - 1).sum()),
                "top": [{"count": int(counts[g]), "examples": where.rows(np.flatnonzero(inverse == g)[:EXAMPLES])}
                        for g in top]},
            "length_bias_tokens": {"chosen_longer": self.longer, "chosen_shorter": self.shorter,
                                   "same_length": self.equal, "share_chosen_longer": self.longer / n if n else None},
        }


def _misses_end(values: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, eot: np.ndarray) -> np.ndarray:
    """Per row: True when the list is empty or its last id is not an end-of-turn id."""
    last = np.full(lengths.size, -1, dtype=np.int64)
    last[lengths > 0] = values[offsets[1:][lengths > 0] - 1]
    return ~np.isin(last, eot)


class RowLocator:
    """Split row numbers -> {"row", "source", "record"}: where the user finds the record in the raw files."""

    def __init__(self, table: pa.Table, sources: list[str]):
        self.table = table
        self.sources = sources

    def rows(self, rows: np.ndarray) -> list[dict[str, Any]]:
        if rows.size == 0:
            return []
        picked = self.table.select(["source", "source_index"]).take(pa.array(rows, type=pa.int64()))
        return [{"row": int(r), "source": self._name(s), "record": int(i)}
                for r, s, i in zip(rows.tolist(), picked.column(0).to_pylist(), picked.column(1).to_pylist())]

    def _name(self, source: int) -> str:
        return self.sources[source] if 0 <= source < len(self.sources) else f"source {source}"


def shard_findings(task: str, checks: dict[str, dict[str, Any]], eot: str,
                   truncated_completions: int = 0) -> list[Finding]:
    """Warnings from the per-split `ShardChecks` results; `eot` names the end-of-turn token(s)."""
    out: list[Finding] = []

    def name(ex: dict[str, Any]) -> str:
        return f"row {ex['row']} ({ex['source']} record {ex['record']})"

    for split, c in checks.items():
        e = c["end_of_turn"]
        if e["rows_without"]:
            what = (f"{_n(e['spans_without'], 'trained span')} in {_n(e['rows_without'], 'row')} not ending "
                    f"with {eot}" if task == "sft" else
                    f"{_n(e['rows_without'], 'row')} with a completion not ending with {eot} "
                    f"(chosen {e['chosen_without']}, rejected {e['rejected_without']})")
            hint = (f"; {_n(truncated_completions, 'completion')} cut by --length-policy truncate"
                    if truncated_completions else "")
            out.append(Finding("end-of-turn", f"{split}: {what}, e.g. {name(e['examples'][0])}{hint}: "
                                              "the model may not learn to stop"))
        if task == "sft" and e["rows_untrained"]:
            out.append(Finding("untrained", f"{split}: {_n(e['rows_untrained'], 'row')} without a trained token"))
        if task != "dpo":
            continue
        if c["identical"]["rows"]:
            out.append(Finding("identical-pair", f"{split}: {_n(c['identical']['rows'], 'row')} with identical "
                                                 f"chosen and rejected tokens, e.g. "
                                                 f"{name(c['identical']['examples'][0])}"))
        dup = c["duplicate_prompts"]
        if dup["prompts"]:
            top = dup["top"][0]
            out.append(Finding("duplicate-prompt", f"{split}: {_n(dup['prompts'], 'prompt')} occurring more than once "
                                                   f"({dup['repeat_rows']} repeats); most often {top['count']}x: "
                                                   + ", ".join(name(x) for x in top["examples"][:3])))
        bias = c["length_bias_tokens"]["share_chosen_longer"]
        if bias is not None and not BIAS_LOW <= bias <= BIAS_HIGH:
            out.append(Finding("length-bias", f"{split}: chosen is longer than rejected in {bias:.0%} of the pairs "
                                              "that differ in length (tokens)"))
    return out


# -- rendering -----------------------------------------------------------------------------------

def render_lint(report: LintReport, console: Any) -> None:
    from rich.table import Table

    r = report
    console.print(f"{r.file}: {r.format} ({'preference pairs' if r.task == 'dpo' else 'conversations'})",
                  markup=False, style="bold")
    t = Table(show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("records", str(r.records))
    t.add_row("valid / invalid", f"{r.valid} / {r.invalid}")
    tp = r.turns
    t.add_row("turns per record", f"p50 {tp['p50']}, p90 {tp['p90']}, p99 {tp['p99']}, max {tp['max']}")
    t.add_row("messages by role", ", ".join(f"{k} {v}" for k, v in sorted(r.roles.items())))
    t.add_row("with a system prompt", f"{r.with_system} ({r.share(r.with_system):.0%})")
    t.add_row("with tools", f"{r.with_tools} ({r.share(r.with_tools):.0%})")
    t.add_row("empty system prompts", str(r.empty_system_count))
    t.add_row("prompts seen more than once", f"{r.duplicate_prompts} ({r.duplicate_records} repeats)")
    if r.task == "dpo":
        t.add_row("identical / near-identical pairs", f"{r.identical_count} / {r.near_identical_count}")
        bias = r.length_bias
        t.add_row("chosen longer than rejected", "n/a" if bias is None else
                  f"{bias:.0%} ({r.chosen_longer} vs {r.chosen_shorter}, {r.same_length} equal)")
    console.print(t)
    if r.top_duplicates:
        d = Table(title="most repeated prompts", title_justify="left")
        d.add_column("times", justify="right")
        d.add_column("records")
        d.add_column("last prompt message")
        for g in r.top_duplicates:
            d.add_row(str(g["count"]), _records(g["records"], g["count"]), g["preview"])
        console.print(d)
    for p in r.first_problems:
        console.print(f"  invalid: {p}", markup=False)
    print_warnings(r.warnings, console, "no warnings")


def print_warnings(warnings: list[Finding], console: Any, none_text: str) -> None:
    """Findings as `warning [kind]: message` lines (shared by the raw-file lint and the shard report)."""
    if not warnings:
        console.print(none_text, markup=False)
    for w in warnings:
        console.print(f"warning [{w.kind}]: {w.message}", markup=False, style="yellow")
