"""Lint a raw chat / preference file before conversion: statistics and warnings, no tokenizer.

    raw file -> read_records (schema + rules, per record) -> canonical records -> counters -> LintReport

Invalid records are counted by problem kind, never raised (`aligndata validate` prints each one).
Warnings are findings about *valid* data that still deserve a look before training:

- identical / near-identical chosen and rejected replies (difflib ratio >= NEAR_IDENTICAL),
- prompts that occur more than once (hash of the whitespace-normalised prompt messages),
- length bias: chosen longer than rejected in far more (or far fewer) pairs than half,
- a system field or system message that is present but empty.

The same checks on converted shards, over token ids, are in shard_checks.py.
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

from aligndata.read.control_strings import COMMON_CONTROL_STRINGS, ControlStrings, record_messages
from aligndata.read.formats import FORMATS
from aligndata.read.formats.common import Issues
from aligndata.read.validate import Checked, FileCheck, read_records
from aligndata.records import Conversation, Message, PreferencePair, Record
from aligndata.report.findings import (BIAS_HIGH, BIAS_LOW, EXAMPLES, TOP_DUPLICATES, Examples, Finding, LengthBias,
                                       length_biased, plural, record_list)
from aligndata.report.stats import percentiles

NEAR_IDENTICAL = 0.9
# Replies are compared on at most this many leading characters: difflib is quadratic in the worst case.
SIMILARITY_CHARS = 1000
_WS = re.compile(r"\s+")


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
class PairStats:
    """Preference pairs only: identical and near-identical replies, and the length bias in characters."""

    count: int = 0
    identical: Examples = field(default_factory=Examples)  # record numbers
    near_identical: Examples = field(default_factory=Examples)  # (record number, similarity)
    length: LengthBias = field(default_factory=LengthBias)

    def to_json(self) -> dict[str, Any]:
        return {
            "pairs": self.count,
            "identical": {"records": self.identical.count, "examples": self.identical.examples},
            "near_identical": {"records": self.near_identical.count, "threshold": NEAR_IDENTICAL,
                               "examples": [{"record": r, "ratio": round(x, 4)}
                                            for r, x in self.near_identical.examples]},
            "length_bias": {**self.length.to_json(), "warn_below": BIAS_LOW, "warn_above": BIAS_HIGH},
        }


@dataclass
class RepeatedPrompts:
    """Prompts seen more than once: how many distinct ones, how many records repeat one, the most repeated."""

    prompts: int = 0
    repeats: int = 0
    top: list[dict[str, Any]] = field(default_factory=list)  # {"count", "records" (the first ones), "preview"}

    def to_json(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "repeat_records": self.repeats, "top": self.top}


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
    empty_system: Examples = field(default_factory=Examples)  # record numbers
    control_strings: Examples = field(default_factory=Examples)  # {"record", "string", "path"}
    duplicates: RepeatedPrompts = field(default_factory=RepeatedPrompts)
    pairs: PairStats = field(default_factory=PairStats)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def invalid(self) -> int:
        return self.records - self.valid

    def share(self, n: int) -> float:
        return n / self.valid if self.valid else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "raw", "file": self.file, "format": self.format, "task": self.task,
            "records": self.records, "valid": self.valid, "invalid": self.invalid,
            "problems_by_kind": dict(self.problems_by_kind), "mixed_formats": self.mixed,
            "turns": self.turns, "roles": dict(self.roles),
            "with_system": {"records": self.with_system, "share": self.share(self.with_system)},
            "with_tools": {"records": self.with_tools, "share": self.share(self.with_tools)},
            "empty_system": {"records": self.empty_system.count, "examples": self.empty_system.examples},
            "control_strings": {"records": self.control_strings.count, "examples": self.control_strings.examples},
            "duplicate_prompts": self.duplicates.to_json(),
            "pairs": self.pairs.to_json() if self.task == "dpo" else None,
            "warnings": [w.to_json() for w in self.warnings],
        }


class _SeenPrompts:
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

    def repeated(self) -> RepeatedPrompts:
        top = sorted(self.groups.values(), key=lambda g: (-g["count"], g["records"][0]))[:TOP_DUPLICATES]
        return RepeatedPrompts(len(self.groups), sum(g["count"] - 1 for g in self.groups.values()), top)


def lint_file(path: str, input_format: str = "auto") -> LintReport:
    """Read one raw file once and collect its statistics and warnings. Raises InputError if unreadable."""
    fc = FileCheck(path, input_format)
    report = LintReport(fc.name)
    turns = array("i")
    seen = _SeenPrompts()
    control = ControlStrings(list(COMMON_CONTROL_STRINGS))
    for checked in read_records(fc, allow_mixed=True):
        if report.records == 0 or checked.mixed:
            report.format = fc.format
            report.task = FORMATS[fc.format].task if fc.format else None
            if checked.mixed:
                report.mixed = checked.mixed.message
        report.records += 1
        n = checked.raw.index
        if checked.raw.error is None and has_empty_system(checked.raw.value):
            report.empty_system.add(n)
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
        found = control.find(record_messages(record))
        if found is not None:
            report.control_strings.add({"record": n, "string": found[0], "path": found[1]})
        prompt = prompt_of(record)
        seen.add(prompt_key(prompt), n, prompt)
        if isinstance(record, PreferencePair):
            _check_pair(report.pairs, record, n)
    report.turns = percentiles(turns)
    report.duplicates = seen.repeated()
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


def _check_pair(stats: PairStats, pair: PreferencePair, n: int) -> None:
    stats.count += 1
    chosen = normalize_text(message_text(pair.chosen[-1])) if pair.chosen else ""
    rejected = normalize_text(message_text(pair.rejected[-1])) if pair.rejected else ""
    if chosen == rejected:
        stats.identical.add(n)
    else:
        ratio = similarity(chosen, rejected)
        if ratio >= NEAR_IDENTICAL:
            stats.near_identical.add((n, ratio))
    stats.length.add(sum(len(message_text(m)) for m in pair.chosen), sum(len(message_text(m)) for m in pair.rejected))


def _warnings(r: LintReport) -> list[Finding]:
    out = []
    if r.invalid:
        kinds = ", ".join(f"{k}: {v}" for k, v in r.problems_by_kind.most_common())
        out.append(Finding("invalid", f"{r.invalid} of {r.records} records are invalid ({kinds}); "
                                       f"run `aligndata validate {r.file}` for every problem"))
    if r.mixed:
        out.append(Finding("mixed-format", r.mixed))
    empty = r.empty_system
    if empty.count:
        out.append(Finding("empty-system", f"{plural(empty.count, 'record')} with an empty system prompt: "
                                            f"records {record_list(empty.examples, empty.count)}"))
    control = r.control_strings
    if control.count:
        first = control.examples[0]
        out.append(Finding("control-string", f"{plural(control.count, 'record')} with a chat template's control "
                                              f"string inside a message, e.g. record {first['record']} "
                                              f"{first['path']}: {first['string']!r}; `aligndata convert` refuses "
                                              "them where the string is a special token of the tokenizer "
                                              "(--control-strings)"))
    same = r.pairs.identical
    if same.count:
        out.append(Finding("identical-pair", f"{plural(same.count, 'pair')} with the same chosen and rejected "
                                              f"reply: records {record_list(same.examples, same.count)}"))
    near = r.pairs.near_identical
    if near.count:
        recs = ", ".join(f"{n} ({x:.2f})" for n, x in near.examples)
        more = ", ..." if near.count > len(near.examples) else ""
        out.append(Finding("near-identical-pair",
                            f"{plural(near.count, 'pair')} with nearly the same chosen and rejected reply "
                            f"(similarity >= {NEAR_IDENTICAL}): records {recs}{more}"))
    dups = r.duplicates
    if dups.prompts:
        top = dups.top[0]
        out.append(Finding("duplicate-prompt",
                            f"{plural(dups.prompts, 'prompt')} occurring more than once ({dups.repeats} "
                            "repeats); "
                            f"most often: {top['count']}x, records {record_list(top['records'], top['count'])}"))
    lengths = r.pairs.length
    if length_biased(lengths.share):
        bias = lengths.share
        longer = "longer" if bias > BIAS_HIGH else "shorter"
        share = bias if bias > BIAS_HIGH else 1 - bias
        out.append(Finding("length-bias",
                            f"chosen is {longer} than rejected in {share:.0%} of the pairs that differ in length "
                            f"({lengths.longer} longer, {lengths.shorter} shorter, {lengths.same} equal): "
                            "a DPO model can learn length instead of quality"))
    return out
