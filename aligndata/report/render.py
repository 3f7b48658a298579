"""Drawing the reports: rich text for the terminal and the length histograms as an image.

Nothing here computes: the numbers come from shard_stats.py and lint.py, the tokens from token_view.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from aligndata.errors import InputError
from aligndata.report.findings import Finding, record_list
from aligndata.report.lint import LintReport
from aligndata.report.shard_stats import LENGTH_COLUMNS, ShardReport, SplitStats
from aligndata.report.stats import nice_histogram
from aligndata.report.token_view import Piece, ShownRecord


# -- shards ------------------------------------------------------------------------------------------------

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


# -- raw files ---------------------------------------------------------------------------------------------

def render_lint(report: LintReport, console: Any) -> None:
    """The raw-file lint: what the file holds, the most repeated prompts, the first problems, the warnings."""
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
    t.add_row("empty system prompts", str(r.empty_system.count))
    t.add_row("prompts seen more than once", f"{r.duplicates.prompts} ({r.duplicates.repeats} repeats)")
    if r.task == "dpo":
        pairs = r.pairs
        t.add_row("identical / near-identical pairs", f"{pairs.identical.count} / {pairs.near_identical.count}")
        bias = pairs.length.share
        t.add_row("chosen longer than rejected", "n/a" if bias is None else
                  f"{bias:.0%} ({pairs.length.longer} vs {pairs.length.shorter}, {pairs.length.same} equal)")
    console.print(t)
    if r.duplicates.top:
        d = Table(title="most repeated prompts", title_justify="left")
        d.add_column("times", justify="right")
        d.add_column("records")
        d.add_column("last prompt message")
        for g in r.duplicates.top:
            d.add_row(str(g["count"]), record_list(g["records"], g["count"]), g["preview"])
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
