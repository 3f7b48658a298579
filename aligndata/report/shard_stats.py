"""Numbers over a shard directory: what `aligndata inspect DIR` reports before a run spends GPU hours.

    manifest.json ---------------------------------> summary, counts by reason
    shards (memory-mapped, record batch by batch) -> per-row lengths -> percentiles, histogram,
                                                      padding vs packing (stats.py),
                                                      end-of-turn and pair checks (shard_checks.py)
    the tokenizer + a probe conversation ---------> the template's end-of-turn id

`inspect_shards` returns plain dataclasses; token_view.py decodes rows for `--show`, render.py draws.
No split is ever converted to Python lists whole: every statistic is computed with numpy on the
flattened Arrow buffers of one record batch at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aligndata.errors import InputError
from aligndata.report.findings import Finding
from aligndata.report.shard_checks import RowLocator, ShardChecks, shard_findings
from aligndata.report.stats import first_trained, nice_histogram, packed_share, padded_share, percentiles
from aligndata.write.shards import (SCHEMAS, SPLITS, ShardError, check_contents, count_tokens, dpo_trained_tokens,
                                    open_split, read_manifest, verify_shards)

if TYPE_CHECKING:
    from aligndata.report.token_view import ShownRecord

DEFAULT_BATCH_SIZE = 8
LENGTH_COLUMNS = {"sft": ("prompt", "completion", "total"), "dpo": ("prompt", "chosen", "rejected", "total")}


@dataclass
class EndOfTurn:
    """Token ids a completion (DPO) or trained span (SFT) must end with, and how they were found."""

    ids: list[int]
    tokens: list[str]
    how: str


@dataclass
class SplitStats:
    """One split's numbers. `tokens` counts what the model reads: for DPO the prompt twice (once with
    each completion), as the manifest does, so `trained_share` is trained / read tokens."""

    name: str
    rows: int
    tokens: int
    trained_tokens: int
    lengths: dict[str, dict[str, int]]
    lengths_from: str  # "manifest" or "shards"
    padding: dict[str, Any]
    histogram: dict[str, list[int]]
    checks: dict[str, Any]
    values: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # per-row lengths, for plots

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "tokens": self.tokens, "trained_tokens": self.trained_tokens,
                "trained_share": self.trained_share, "lengths": self.lengths, "lengths_from": self.lengths_from,
                "padding": self.padding, "histogram": {"column": "total", **self.histogram}, "checks": self.checks}


@dataclass
class ShardReport:
    path: Path
    manifest: dict[str, Any]
    splits: dict[str, SplitStats]
    end_of_turn: EndOfTurn
    notes: list[str] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    records: list[ShownRecord] = field(default_factory=list)
    tokenizer: Any = field(default=None, repr=False)

    @property
    def task(self) -> str:
        return self.manifest["task"]

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "kind": "shards", "path": str(self.path), "task": self.task,
            "manifest": {k: m.get(k) for k in ("created_by", "tokenizer", "chat_template", "settings",
                                                "settings_sha256", "sources", "reference")},
            "counts": m.get("counts"),
            "splits": {name: s.to_json() for name, s in self.splits.items()},
            "end_of_turn": {"ids": self.end_of_turn.ids, "tokens": self.end_of_turn.tokens,
                            "how": self.end_of_turn.how},
            "notes": self.notes,
            "warnings": [w.to_json() for w in self.warnings],
            "records": [r.to_json() for r in self.records],
        }


def inspect_shards(path: str | Path, *, batch_size: int = DEFAULT_BATCH_SIZE, tokenizer: str | None = None,
                   verify_tokenizer: bool = False) -> ShardReport:
    """Summary, statistics and checks of a shard directory. Raises ShardError / InputError.

    The tokenizer (the manifest's, or `tokenizer`) finds the template's end-of-turn token; without it
    the checks fall back to the eos id and a note says so.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    path = Path(path)
    manifest = read_manifest(path)
    verify_shards(path, manifest)  # what aligntrain verifies before it trains
    check_contents(path, manifest)
    notes: list[str] = []
    tok = load_shard_tokenizer(manifest, tokenizer, notes, verify_tokenizer)
    eot = end_of_turn(manifest, tok, notes)
    splits = {}
    listed = manifest.get("splits", {})
    for name in [s for s in SPLITS if s in listed] + [s for s in listed if s not in SPLITS]:
        table = open_split(path, name, manifest)
        missing = [c for c in SCHEMAS[manifest["task"]].names if c not in table.column_names]
        if missing:
            raise ShardError(f"{path}: the {name} split lacks the column(s) {', '.join(missing)}")
        splits[name] = scan_split(table, name, manifest, eot.ids, batch_size)
    report = ShardReport(path, manifest, splits, eot, notes, tokenizer=tok)
    truncated = (manifest.get("counts") or {}).get("truncated", {}).get("completion", 0)
    eot_name = " or ".join(eot.tokens) or "an end-of-turn token (the tokenizer defines none)"
    report.warnings = shard_findings(manifest["task"], {n: st.checks for n, st in splits.items()}, eot_name, truncated)
    return report


def _list_column(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat values, per-row lengths, offsets into the values) of one list column, zero-copy where possible."""
    arr = batch.column(name)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return values, lengths, offsets


def scan_split(table: pa.Table, name: str, manifest: dict[str, Any], eot_ids: list[int],
               batch_size: int = DEFAULT_BATCH_SIZE) -> SplitStats:
    """One pass over a split's record batches; only per-row lengths and fingerprints are kept."""
    task = manifest["task"]
    eot = np.asarray(eot_ids, dtype=np.int64)
    cols: dict[str, list[np.ndarray]] = {c: [] for c in LENGTH_COLUMNS[task]}
    trained = tokens = 0
    acc = ShardChecks(task)
    start = 0
    for batch in table.to_batches():
        if task == "sft":
            v, lens, off = _list_column(batch, "input_ids")
            m = batch.column("loss_mask").flatten().to_numpy(zero_copy_only=False)
            first = first_trained(m, lens)
            cols["total"].append(lens)
            cols["prompt"].append(first)
            cols["completion"].append(lens - first)
            trained += int(np.count_nonzero(m))
            summed = {"input_ids": int(lens.sum())}
            acc.sft_batch(start, v, m, off, lens, eot)
        else:
            pv, pl, po = _list_column(batch, "prompt_ids")
            cv, cl, co = _list_column(batch, "chosen_ids")
            rv, rl, ro = _list_column(batch, "rejected_ids")
            cols["prompt"].append(pl)
            cols["chosen"].append(cl)
            cols["rejected"].append(rl)
            cols["total"].append(pl + np.maximum(cl, rl))
            trained += dpo_trained_tokens(int(cl.sum()), int(rl.sum()))
            summed = {"prompt_ids": int(pl.sum()), "chosen_ids": int(cl.sum()), "rejected_ids": int(rl.sum())}
            acc.dpo_batch(start, (pv, po), (cv, co, cl), (rv, ro, rl), eot)
        tokens += count_tokens(task, summed)
        start += batch.num_rows
    values = {c: (np.concatenate(v) if v else np.zeros(0, np.int64)) for c, v in cols.items()}
    stored = (manifest.get("stats") or {}).get(name, {}).get("lengths")
    if stored and all(c in stored for c in cols):
        lengths, source = {c: stored[c] for c in cols}, "manifest"
    else:
        lengths, source = {c: percentiles(v) for c, v in values.items()}, "shards"
    checks = acc.finish(RowLocator(table, [s.get("path", "?") for s in manifest.get("sources", [])]))
    return SplitStats(name, table.num_rows, tokens, trained, lengths, source,
                      _padding(task, values, tokens, batch_size, manifest), nice_histogram(values["total"]),
                      checks, values)


def _padding(task: str, values: dict[str, np.ndarray], tokens: int, batch_size: int,
             manifest: dict[str, Any]) -> dict[str, Any]:
    if task == "sft":
        sequences, per_row = values["total"], 1
    else:
        sequences, per_row = np.concatenate([values["prompt"] + values["chosen"],
                                             values["prompt"] + values["rejected"]]), 2
    longest = int(sequences.max()) if sequences.size else 0
    max_length = (manifest.get("settings") or {}).get("max_length")
    capacity = max(int(max_length or 0), longest, 1)
    share, n_packed = packed_share(sequences, capacity)
    return {
        "batch_size": batch_size, "sequences_per_row": per_row,
        "padded_batches_share": padded_share(values["total"], batch_size, tokens, per_row),
        "pack_length": capacity, "pack_length_from": "max_length" if max_length and max_length >= longest
        else "longest sequence", "packed_share": share, "packed_sequences": n_packed,
    }


# -- tokenizer and end of turn ---------------------------------------------------------------------------

def load_shard_tokenizer(manifest: dict[str, Any], override: str | None, notes: list[str],
                         verify: bool = False) -> Any:
    """The tokenizer the manifest names (or `override`); None with a note when it cannot be loaded.

    `verify` compares its hash with the manifest's (about a second for a large vocabulary), worth it
    only when text is decoded for display.
    """
    from aligndata.encode.tokenizer import TemplateError, load_tokenizer, tokenizer_identity

    spec = override or (manifest.get("tokenizer") or {}).get("name_or_path")
    if not spec:
        notes.append("the manifest names no tokenizer; pass --tokenizer")
        return None
    try:
        tok = load_tokenizer(spec)
    except TemplateError as e:
        notes.append(f"{e}; pass --tokenizer to name it")
        return None
    if verify and tokenizer_identity(tok, spec)["sha256"] != manifest["tokenizer"].get("sha256"):
        notes.append(f"tokenizer {spec!r} differs from the one the shards were made with (sha256): "
                     "decoded text and end-of-turn checks may be wrong")
    return tok


def end_of_turn(manifest: dict[str, Any], tok: Any, notes: list[str]) -> EndOfTurn:
    """The template's end-of-turn id (found by encoding a probe conversation) plus the eos id."""
    eos = (manifest.get("tokenizer") or {}).get("eos_token_id")
    probed = _probe_end_ids(manifest, tok, notes) if tok is not None else []
    ids = set(probed) | ({int(eos)} if eos is not None else set())
    if probed:
        how = "the chat template's end of turn" + (" and eos" if eos is not None else "")
    else:
        how = "the eos token in the manifest" if ids else "unknown: neither a template nor an eos id"
    ordered = sorted(ids)
    if tok is not None:
        tokens = [tok.decode([i], skip_special_tokens=False) for i in ordered]
    else:
        tokens = [f"id {i}" for i in ordered]
    return EndOfTurn(ordered, tokens, how)


def _probe_end_ids(manifest: dict[str, Any], tok: Any, notes: list[str]) -> list[int]:
    from aligndata.records import Conversation, Message
    from aligndata.encode.template import resolve_chat_template
    from aligndata.encode.tokenizer import TemplateError
    from aligndata.encode.encoder import Encoder
    from aligndata.encode.results import EncodeError

    source = (manifest.get("chat_template") or {}).get("source", "")
    if source == "tokenizer":
        name = None
    elif source.startswith("builtin:"):
        name = source.split(":", 1)[1]
    else:
        notes.append(f"chat template {source!r} is not available here: end of turn checked against eos only")
        return []
    try:
        template = resolve_chat_template(tok, name)
        enc = Encoder(tok, template, max_length=None, max_prompt_length=None).encode_sft(Conversation(
            [Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Bye"),
             Message("assistant", "Goodbye")]))
    except (TemplateError, EncodeError, ValueError) as e:
        notes.append(f"cannot render a probe conversation ({e}): end of turn checked against eos only")
        return []
    if template.sha256 != (manifest.get("chat_template") or {}).get("sha256"):
        notes.append("the chat template differs from the one the shards were made with (sha256)")
    mask = enc.loss_mask
    ends = {enc.input_ids[i] for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])}
    if len(ends) != 1:  # "Hello" and "Goodbye" end with different tokens: the template adds no end marker
        notes.append("the chat template writes no end-of-turn token after assistant turns: "
                     "end of turn checked against eos only")
        return []
    return list(ends)
