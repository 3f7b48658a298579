"""`aligndata inspect DIR`: what a training run on these shards will see, before it spends GPU hours.

    manifest.json ---------------------------------> summary, counts by reason
    shards (memory-mapped, record batch by batch) -> per-row lengths -> percentiles, histogram,
                                                      padding vs packing, end-of-turn and pair checks
    a few rows + the tokenizer ---------------------> token pieces (trained / masked) -> rich renderables

The library functions return plain dataclasses (`inspect_shards`, `show_records`); the `render_*`
functions and `plot_lengths` only draw them. No split is ever converted to Python lists whole:
every statistic is computed with numpy on the flattened Arrow buffers of one record batch at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aligndata.errors import InputError
from aligndata.report.lint import Finding, RowLocator, ShardChecks, percentiles, print_warnings, shard_findings
from aligndata.write.shards import SCHEMAS, SPLITS, ShardError, open_split, read_manifest

DEFAULT_BATCH_SIZE = 8
HIST_BINS = 12
CONTEXT_TOKENS = 3  # tokens decoded before each shown token, for tokenizers whose text depends on them
LENGTH_COLUMNS = {"sft": ("prompt", "completion", "total"), "dpo": ("prompt", "chosen", "rejected", "total")}


# -- pure numbers ----------------------------------------------------------------------------------

def padded_share(widths: np.ndarray, batch_size: int, real_tokens: int, sequences_per_row: int = 1) -> float:
    """Share of tokens that are padding when consecutive rows form batches of `batch_size`, each row
    padded to the longest in its batch (the last batch may be smaller; it is not dropped).

    `widths` is each row's padded width (DPO: prompt + the longer completion) and a row holds
    `sequences_per_row` sequences (DPO: 2, chosen and rejected, as aligntrain collates them).
    """
    n = len(widths)
    if n == 0:
        return 0.0
    full = n // batch_size * batch_size
    padded = int(widths[:full].reshape(-1, batch_size).max(axis=1).sum()) * batch_size if full else 0
    if full < n:
        padded += int(widths[full:].max()) * (n - full)
    padded *= sequences_per_row
    return (padded - real_tokens) / padded if padded else 0.0


def pack_count(lengths: np.ndarray, capacity: int) -> int:
    """How many sequences of `capacity` tokens best-fit-decreasing packing needs (no sequence is split).

    Items of one length are placed together: bins are kept only as counts per free room, so the cost
    grows with the number of distinct lengths, not with the number of rows.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > capacity:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens cannot be packed into {capacity}")
    sizes, counts = np.unique(lengths[lengths > 0], return_counts=True)
    free = np.zeros(capacity + 1, dtype=np.int64)  # free[c]: open bins with exactly c tokens of room
    bins = 0
    for s, k in zip(sizes[::-1].tolist(), counts[::-1].tolist()):  # k items of length s, longest first
        while k:
            room = np.flatnonzero(free[s:])
            c, have = (s + int(room[0]), int(free[s + int(room[0])])) if room.size else (capacity, None)
            per_bin = c // s  # the best fit stays the best fit until less than s is left in it
            full, rest = divmod(k, per_bin)
            if have is not None and full >= have:  # fill every bin with this much room, then look again
                free[c] -= have
                free[c - per_bin * s] += have
                k -= have * per_bin
                continue
            used = full + (1 if rest else 0)
            if have is None:
                bins += used  # new bins
            else:
                free[c] -= used
            free[c - per_bin * s] += full
            if rest:
                free[c - rest * s] += 1
            k = 0
    return bins


def packed_share(lengths: np.ndarray, capacity: int) -> tuple[float, int]:
    """(share of padding tokens, number of sequences) when `lengths` are packed into `capacity`-token rows."""
    n = pack_count(lengths, capacity)
    total = n * capacity
    return ((total - int(np.sum(lengths))) / total if total else 0.0), n


def nice_histogram(values: np.ndarray, bins: int = HIST_BINS) -> dict[str, list[int]]:
    """Counts over bins of a round width (1, 2 or 5 x 10^k). Bin i holds lo[i] <= value <= hi[i]."""
    values = np.asarray(values, dtype=np.int64)
    if values.size == 0:
        return {"lo": [], "hi": [], "counts": []}
    lo_v, hi_v = int(values.min()), int(values.max())
    need = max(1, math.ceil((hi_v - lo_v + 1) / bins))
    width = next(m * 10**e for e in range(0, 19) for m in (1, 2, 5) if m * 10**e >= need)
    start = lo_v // width * width
    counts = np.bincount((values - start) // width)
    lows = [start + i * width for i in range(len(counts))]
    return {"lo": lows, "hi": [x + width - 1 for x in lows], "counts": counts.tolist()}


# -- the report --------------------------------------------------------------------------------------

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
    report.warnings = shard_findings(manifest["task"], {n: st.checks for n, st in splits.items()},
                                     " or ".join(eot.tokens) or "?", truncated)
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
            first = _first_trained(m, off, lens)
            cols["total"].append(lens)
            cols["prompt"].append(first)
            cols["completion"].append(lens - first)
            trained += int(np.count_nonzero(m))
            tokens += int(lens.sum())
            acc.sft_batch(start, v, m, off, lens, eot)
        else:
            pv, pl, po = _list_column(batch, "prompt_ids")
            cv, cl, co = _list_column(batch, "chosen_ids")
            rv, rl, ro = _list_column(batch, "rejected_ids")
            cols["prompt"].append(pl)
            cols["chosen"].append(cl)
            cols["rejected"].append(rl)
            cols["total"].append(pl + np.maximum(cl, rl))
            trained += int(cl.sum() + rl.sum())
            tokens += int(2 * pl.sum() + cl.sum() + rl.sum())
            acc.dpo_batch(start, (pv, po), (cv, co, cl), (rv, ro, rl), eot)
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


def _first_trained(mask: np.ndarray, off: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Per row: index of the first trained token (the row length when nothing is trained), as convert counts it.

    Works on span starts (a trained token whose predecessor in the row is not trained), which are few,
    rather than on every trained token.
    """
    on = mask != 0
    before = np.zeros(on.size, dtype=bool)
    before[1:] = on[:-1]
    before[off[:-1][lens > 0]] = False  # a row's first token has no predecessor
    starts = np.flatnonzero(on & ~before)
    first = lens.copy()
    if starts.size:
        rows = np.searchsorted(off, starts, side="right") - 1
        new_row = np.ones(rows.size, dtype=bool)
        new_row[1:] = rows[1:] != rows[:-1]
        first[rows[new_row]] = starts[new_row] - off[rows[new_row]]
    return first


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


# -- records, token by token ---------------------------------------------------------------------------

@dataclass
class Piece:
    """One displayed token (or a few, when a character spans several byte tokens)."""

    ids: list[int]
    text: str
    trained: bool
    special: bool

    def to_json(self) -> dict[str, Any]:
        return {"ids": self.ids, "text": self.text, "trained": self.trained, "special": self.special}


@dataclass
class ShownRecord:
    task: str
    split: str
    row: int
    source: str
    record: int
    parts: dict[str, list[Piece]]  # sft: {"tokens"}; dpo: {"prompt", "chosen", "rejected"}

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "row": self.row, "source": self.source, "record": self.record,
                **{k: [p.to_json() for p in v] for k, v in self.parts.items()}}


def pick_rows(n_rows: int, show: int, index: int | None = None, random: bool = False,
              seed: int | None = None, split: str = "train") -> list[int]:
    """Which rows `--show N [--index I | --random [--seed S]]` means (I is a 0-based row of the split)."""
    if show < 1:
        raise InputError(f"--show {show}: must be at least 1")
    if random:
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(n_rows, size=min(show, n_rows), replace=False).tolist())
    start = index or 0
    if not 0 <= start < n_rows:
        raise InputError(f"--index {start}: the {split} split has {n_rows} rows (0 to {n_rows - 1})")
    return list(range(start, min(n_rows, start + show)))


def records_to_show(report: ShardReport, split: str, show: int, index: int | None = None, random: bool = False,
                    seed: int | None = None) -> list[ShownRecord]:
    """`--show N [--index I | --random [--seed S]] [--split NAME]` as records ready to render."""
    if split not in report.splits:
        raise InputError(f"--split {split}: the shards have {', '.join(report.splits)}")
    return show_records(report, pick_rows(report.splits[split].rows, show, index, random, seed, split), split)


def show_records(report: ShardReport, rows: list[int], split: str = "train") -> list[ShownRecord]:
    """Decode the given rows of a split into trained / masked token pieces (needs the tokenizer)."""
    tok = report.tokenizer
    if tok is None:
        raise InputError("--show needs the tokenizer: " + "; ".join(report.notes))
    if split not in report.splits:
        raise InputError(f"--split {split}: the shards have {', '.join(report.splits)}")
    table = open_split(report.path, split, report.manifest)
    picked = table.take(pa.array(rows, type=pa.int64())).to_pylist()  # a few rows only
    sources = [s.get("path", "?") for s in report.manifest.get("sources", [])]
    out = []
    for row, r in zip(rows, picked):
        if report.task == "sft":
            parts = {"tokens": token_pieces(tok, r["input_ids"], r["loss_mask"])}
        else:
            # every completion token is trained, no prompt token is (docs/SHARDS.md)
            parts = {"prompt": token_pieces(tok, r["prompt_ids"], [0] * len(r["prompt_ids"])),
                     "chosen": token_pieces(tok, r["chosen_ids"], [1] * len(r["chosen_ids"])),
                     "rejected": token_pieces(tok, r["rejected_ids"], [1] * len(r["rejected_ids"]))}
        src = sources[r["source"]] if 0 <= r["source"] < len(sources) else "?"
        out.append(ShownRecord(report.task, split, row, src, r["source_index"], parts))
    return out


def token_pieces(tok: Any, ids: list[int], mask: list[int]) -> list[Piece]:
    """Each token's own text, decoded in the context of the tokens before it.

    Decoding a token alone loses what depends on its neighbours (sentencepiece drops the leading
    space of "▁the"); so a token's text is decode(context + token) minus decode(context). Tokens that
    hold part of a character are joined until the character is whole.
    """
    special = set(getattr(tok, "all_special_ids", []) or [])

    def decode(x: list[int]) -> str:
        return tok.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces: list[Piece] = []
    start = 0
    for end in range(1, len(ids) + 1):
        group = ids[start:end]
        context = ids[max(0, start - CONTEXT_TOKENS):start]
        base = decode(context) if context else ""
        full = decode(context + group)
        text = full[len(base):] if full.startswith(base) else decode(group)
        if text.endswith("\ufffd") and len(group) < 4 and end < len(ids):
            continue  # an incomplete UTF-8 sequence: the next token completes it
        if not text:
            text = "".join(tok.convert_ids_to_tokens(group)) or "∅"
        pieces.append(Piece(group, text, bool(mask[start]), any(x in special for x in group)))
        start = end
    return pieces


# -- rendering -------------------------------------------------------------------------------------------

# Trained vs masked is the background hue; alternating shades of it mark token boundaries;
# special tokens get a yellow foreground. The colours are xterm-256 ones, so that 256-colour terminals
# show them exactly and 16-colour ones still get green vs black/grey.
TRAINED_STYLES = ("#ffffff on #005f00", "#ffffff on #008700")
MASKED_STYLES = ("#bcbcbc on #262626", "#bcbcbc on #444444")
SPECIAL_FG = "bold #ffd75f"
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # plain-text stand-ins for the trained colour


def _visible(text: str) -> str:
    return text.replace("\r", "␍").replace("\t", "⇥").replace("\n", "↵")


def pieces_text(pieces: list[Piece], *, ids: bool = False, marks: bool = False) -> Any:
    """A rich Text: one styled span per token. `marks` brackets trained runs for plain-text output."""
    from rich.style import Style
    from rich.text import Text

    out = Text()
    trained_run = False
    for k, p in enumerate(pieces):
        if marks and p.trained != trained_run:
            out.append(MARK_OPEN if p.trained else MARK_CLOSE)
            trained_run = p.trained
        base = (TRAINED_STYLES if p.trained else MASKED_STYLES)[k % 2]
        style = Style.parse(base) + Style.parse(SPECIAL_FG) if p.special else Style.parse(base)
        out.append(_visible(p.text), style=style)
        if ids:
            out.append("|" + ",".join(str(i) for i in p.ids), style=style + Style(dim=True))
        if "\n" in p.text:
            out.append("\n" * p.text.count("\n"))
    if marks and trained_run:
        out.append(MARK_CLOSE)
    if out.plain.endswith("\n"):
        out.right_crop(1)  # the ↵ already shows it
    return out


def legend(marks: bool) -> Any:
    from rich.text import Text

    if marks:
        return Text(f"{MARK_OPEN}trained{MARK_CLOSE} masked · ↵ newline · token|id with --ids")
    t = Text()
    t.append("trained", style=TRAINED_STYLES[0]).append(" tokens", style=TRAINED_STYLES[1]).append("  ")
    t.append("masked", style=MASKED_STYLES[0]).append(" tokens", style=MASKED_STYLES[1]).append("  ")
    t.append("<|special|>", style=MASKED_STYLES[0] + " " + SPECIAL_FG).append("  ↵ newline")
    return t


def render_record(rec: ShownRecord, *, ids: bool = False, marks: bool = False) -> Any:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    where = Text(f"{rec.split} row {rec.row} · {rec.source} record {rec.record}", style="bold")
    if rec.task == "sft":
        pieces = rec.parts["tokens"]
        n = sum(len(p.ids) for p in pieces)
        k = sum(len(p.ids) for p in pieces if p.trained)
        return Group(where, Panel(pieces_text(pieces, ids=ids, marks=marks), title=f"{n} tokens, {k} trained",
                                  title_align="left"))
    counts = {side: sum(len(p.ids) for p in rec.parts[side]) for side in ("prompt", "chosen", "rejected")}
    prompt = Panel(pieces_text(rec.parts["prompt"], ids=ids, marks=marks),
                   title=f"prompt · {counts['prompt']} tokens (masked)", title_align="left")
    pair = Table(expand=True, padding=(0, 1))
    pair.add_column(f"chosen · {counts['chosen']} tokens (trained)", ratio=1)
    pair.add_column(f"rejected · {counts['rejected']} tokens (trained)", ratio=1)
    pair.add_row(pieces_text(rec.parts["chosen"], ids=ids, marks=marks),
                 pieces_text(rec.parts["rejected"], ids=ids, marks=marks))
    return Group(where, prompt, pair)


def _bar(count: int, most: int, width: int = 30) -> str:
    eighths = round(count / most * width * 8) if most else 0
    if count and not eighths:
        eighths = 1
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


def render_report(report: ShardReport, console: Any, *, ids: bool = False, marks: bool = False) -> None:
    """The whole text report: manifest, counts, each split, notes and warnings, then the shown records."""
    _render_manifest(report, console)
    for s in report.splits.values():
        _render_split(s, report.task, console)
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
    print_warnings(report.warnings, console, "checks: every completion ends with the end-of-turn token; no warnings")
    if report.records:
        console.print(legend(marks))
        for rec in report.records:
            console.print(render_record(rec, ids=ids, marks=marks))


def _render_manifest(report: ShardReport, console: Any) -> None:
    from rich.table import Table

    m = report.manifest
    tk, tp = m.get("tokenizer") or {}, m.get("chat_template") or {}
    console.print(f"{report.task} shards in {report.path}", markup=False, style="bold")
    head = Table(show_header=False)
    head.add_column("what")
    head.add_column("value", overflow="fold")
    head.add_row("created by", str(m.get("created_by")))
    head.add_row("tokenizer", f"{tk.get('name_or_path')} (sha256 {str(tk.get('sha256'))[:12]}, "
                              f"vocab {tk.get('vocab_size')}, eos {tk.get('eos_token_id')}, "
                              f"pad {tk.get('pad_token_id')})")
    head.add_row("chat template", f"{tp.get('source')} (sha256 {str(tp.get('sha256'))[:12]})")
    head.add_row("end of turn", f"{', '.join(report.end_of_turn.tokens)} "
                                f"(ids {', '.join(map(str, report.end_of_turn.ids))}; {report.end_of_turn.how})")
    settings = m.get("settings") or {}
    head.add_row("settings", ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None))
    for s in m.get("sources", []):
        head.add_row(f"source ({s.get('role')})", f"{s.get('path')}: {s.get('records')} {s.get('format')} records")
    if m.get("reference"):
        head.add_row("reference log-probs", str(m["reference"].get("model")))
    console.print(head)

    c = m.get("counts") or {}
    counts = Table()
    counts.add_column("records")
    counts.add_column("count", justify="right")
    counts.add_row("read", str(c.get("read")))
    counts.add_row("kept", str(c.get("kept")))
    for group in ("rejected", "dropped", "truncated"):
        for reason, n in sorted((c.get(group) or {}).items()):
            counts.add_row(f"{group}: {reason}", str(n))
    console.print(counts)


def _render_split(s: SplitStats, task: str, console: Any) -> None:
    from rich.table import Table

    console.print(f"{s.name}: {s.rows} rows, {s.tokens} tokens, {s.trained_share:.1%} trained",
                  markup=False, style="bold")
    t = Table(caption=f"percentiles from the {s.lengths_from}", caption_justify="left")
    t.add_column("tokens")
    for q in ("p50", "p90", "p99", "max"):
        t.add_column(q, justify="right")
    for col in LENGTH_COLUMNS[task]:
        t.add_row(col, *(str(s.lengths[col][q]) for q in ("p50", "p90", "p99", "max")))
    console.print(t)
    p = s.padding
    seqs = f" ({p['sequences_per_row']} sequences a row)" if p["sequences_per_row"] > 1 else ""
    console.print(f"padding: batches of {p['batch_size']} rows{seqs} padded to their longest: "
                  f"{p['padded_batches_share']:.1%} of tokens are padding; packed into "
                  f"{p['pack_length']}-token sequences ({p['pack_length_from']}): {p['packed_share']:.1%}",
                  markup=False)
    h = s.histogram
    most = max(h["counts"], default=0)
    console.print(f"{s.name} total length (tokens)", markup=False)
    span = len(str(h["hi"][-1])) if h["hi"] else 1
    for lo, hi, n in zip(h["lo"], h["hi"], h["counts"]):
        console.print(f"  {lo:>{span}}–{hi:<{span}} {_bar(n, most):<31}{n:>6}", markup=False)


def plot_lengths(report: ShardReport, path: str | Path) -> None:
    """Histograms of every length column, one panel each, splits overlaid; written as an image."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install matplotlib") from None
    cols = LENGTH_COLUMNS[report.task]
    ncols = 2 if len(cols) == 4 else len(cols)
    nrows = math.ceil(len(cols) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.4 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    max_length = (report.manifest.get("settings") or {}).get("max_length")
    colours = {"train": "#2e7d40", "eval": "#d08c2c"}
    for ax, col in zip(axes, cols):
        both = np.concatenate([s.values[col] for s in report.splits.values()])
        h = nice_histogram(both, bins=30)
        edges = np.array(h["lo"] + [h["hi"][-1] + 1]) if h["lo"] else np.array([0, 1])
        for s in report.splits.values():
            colour = colours.get(s.name, "#555555")
            ax.hist(s.values[col], bins=edges, alpha=0.7, color=colour, edgecolor="white", linewidth=0.5,
                    label=f"{s.name}: {s.rows} rows")
            for q, ls in (("p50", "--"), ("p99", ":")):
                ax.axvline(s.lengths[col][q], color=colour, linestyle=ls, linewidth=1.2,
                           label=f"{s.name} {q} = {s.lengths[col][q]}")
        if max_length and col != "prompt":
            ax.axvline(max_length, color="#b03030", linewidth=1.2, label=f"max_length {max_length}")
        ax.set_title(f"{col} length")
        ax.set_xlabel("tokens")
        ax.set_ylabel("rows")
        ax.legend(fontsize="small", frameon=False)
    for ax in axes[len(cols):]:
        ax.set_visible(False)
    tokenizer = Path(str((report.manifest.get("tokenizer") or {}).get("name_or_path"))).name
    fig.suptitle(f"{report.path.name}: {report.task} token lengths ({tokenizer} tokenizer)")
    try:
        fig.savefig(str(path), dpi=110)
    except (OSError, ValueError) as e:
        raise InputError(f"--plot {path}: cannot write the image ({e})") from None
