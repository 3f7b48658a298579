"""End-of-turn and preference-pair checks on converted shards, over token ids, batch by batch.

    shard record batches -> ShardChecks (numpy over the flat id buffers) -> finish() per split -> shard_findings

Nothing here loads a tokenizer: the end-of-turn ids come from the caller (shard_stats.end_of_turn).
The warnings are the raw-file lint's (lint.py), on what a run will actually train on:

- a completion (DPO) or trained span (SFT) that does not end with the end-of-turn token,
- an SFT row without a trained token,
- identical chosen and rejected token ids, prompts that occur more than once (hash of the ids),
- length bias: chosen longer than rejected, in tokens, in far more (or far fewer) pairs than half.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from aligndata.report.findings import EXAMPLES, TOP_DUPLICATES, Finding, LengthBias, length_biased, plural


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
        self.length = LengthBias()  # in tokens
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
        self.length.longer += int((cl > rl).sum())
        self.length.shorter += int((cl < rl).sum())
        self.length.same += int((cl == rl).sum())
        self.identical.append(equal_rows((cv, co), (rv, ro)) + start)
        self.prompt_keys.append(row_hashes(pv, po))

    def finish(self, where: RowLocator) -> dict[str, Any]:
        """The split's results as `inspect --json` prints them (`where` names each example row's record)."""
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
        return {
            "end_of_turn": {"chosen_without": self.bad_chosen, "rejected_without": self.bad_rejected,
                            "rows_without": int(bad_rows.size), "examples": where.rows(bad_rows[:EXAMPLES])},
            "identical": {"rows": int(identical.size), "examples": where.rows(identical[:EXAMPLES])},
            "duplicate_prompts": {
                "prompts": int(repeated.size), "repeat_rows": int((counts[repeated] - 1).sum()),
                "top": [{"count": int(counts[g]), "examples": where.rows(np.flatnonzero(inverse == g)[:EXAMPLES])}
                        for g in top]},
            "length_bias_tokens": self.length.to_json(),
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
            what = (f"{plural(e['spans_without'], 'trained span')} in {plural(e['rows_without'], 'row')} "
                    f"not ending with {eot}" if task == "sft" else
                    f"{plural(e['rows_without'], 'row')} with a completion not ending with {eot} "
                    f"(chosen {e['chosen_without']}, rejected {e['rejected_without']})")
            hint = (f"; {plural(truncated_completions, 'completion')} cut by --length-policy truncate"
                    if truncated_completions else "")
            out.append(Finding("end-of-turn", f"{split}: {what}, e.g. {name(e['examples'][0])}{hint}: "
                                              "the model may not learn to stop"))
        if task == "sft" and e["rows_untrained"]:
            out.append(Finding("untrained", f"{split}: {plural(e['rows_untrained'], 'row')} without a trained token"))
        if task != "dpo":
            continue
        if c["identical"]["rows"]:
            out.append(Finding("identical-pair", f"{split}: {plural(c['identical']['rows'], 'row')} with identical "
                                                 f"chosen and rejected tokens, e.g. "
                                                 f"{name(c['identical']['examples'][0])}"))
        dup = c["duplicate_prompts"]
        if dup["prompts"]:
            top = dup["top"][0]
            out.append(Finding("duplicate-prompt", f"{split}: {plural(dup['prompts'], 'prompt')} occurring more "
                                                   f"than once ({dup['repeat_rows']} repeats); most often "
                                                   f"{top['count']}x: "
                                                   + ", ".join(name(x) for x in top["examples"][:3])))
        bias = c["length_bias_tokens"]["share_chosen_longer"]
        if length_biased(bias):
            out.append(Finding("length-bias", f"{split}: chosen is longer than rejected in {bias:.0%} of the pairs "
                                              "that differ in length (tokens)"))
    return out
