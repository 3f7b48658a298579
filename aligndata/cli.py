"""The `aligndata` command line: a thin layer over the library.

Exit codes: 0 success / all valid; 1 invalid records (validate) or a conversion stopped by one;
2 usage or I/O error (missing file, directory, unknown format, not JSON at all, bad option).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aligndata import __version__
from aligndata.errors import EXIT_INPUT, EXIT_OK, InputError, InvalidRecordError, exit_code, os_error_message
from aligndata.options import ConvertOptions
from aligndata.usage import Command, add_version_option
from aligndata.read.formats import FORMATS, schema_dir
from aligndata.read.validate import FileSummary, validate_files

app = typer.Typer(
    name="aligndata",
    help="Validate and convert chat / preference JSON into token-exact Arrow shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
add_version_option(app, "aligndata", __version__, out)

FORMAT_HELP = f"Input format: auto (decided per file from all records) or one of: {', '.join(FORMATS)}."


def _fail(message: str, code: int) -> None:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def handle_errors(fn: Callable[[], int], writing: str | None = None) -> int:
    """Expected errors become `error: <one line>` and their exit code (errors.exit_code, the table both
    command lines share); anything else is a bug and raises.

    `writing` names the output, for write errors (disk full, read-only) that carry no file name.
    """
    try:
        return fn()
    except BaseException as e:
        code = exit_code(e)
        if code is None:
            raise
        if isinstance(e, InvalidRecordError):
            for p in e.problems:
                err.print(f"error: {p}", markup=False)
            err.print("(stopped at the first invalid record; --on-error skip writes invalid records to a rejects file)",
                      markup=False)
            raise typer.Exit(code)
        if isinstance(e, KeyboardInterrupt):
            _fail("interrupted", code)
        if isinstance(e, OSError) and writing:
            _fail(f"{writing}: cannot write ({e.strerror or e}); the previous output is left as it was", code)
        _fail(os_error_message(e) if isinstance(e, OSError) else str(e), code)
    return EXIT_OK


@app.command(cls=Command)
def validate(
    files: List[str] = typer.Argument(..., help="Input files (.json, .jsonl, .ndjson, optionally .gz), or - for stdin."),
    format: str = typer.Option("auto", "--format", "-f", help=FORMAT_HELP),
    max_errors: int = typer.Option(50, "--max-errors", help="Print at most this many problems (counts stay complete)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document for machines instead of text."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Check records against their format's JSON Schema and the semantic rules.

    Every problem is printed as FILE:LINE (record N) $.json.path: message.

    \b
    Examples:
      aligndata validate data.jsonl
      aligndata validate raw.json --format sharegpt-preference --max-errors 10
      cat data.jsonl | aligndata validate - --json
    """
    try:
        result = validate_files(
            files, format, max_errors=max_errors, progress=not quiet and not as_json,
            on_problem=None if as_json else lambda p: out.print(str(p), markup=False),
            on_error=None if as_json else lambda message: err.print(f"error: {message}", markup=False))
    except InputError as e:
        _fail(str(e), EXIT_INPUT)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
        raise typer.Exit(result.exit_code)
    if result.total > max_errors:
        out.print(f"... {result.total - max_errors} more problems not shown (--max-errors {max_errors})", markup=False)
    _print_validate_summary(result.files)
    raise typer.Exit(result.exit_code)


def _print_validate_summary(summaries: list[FileSummary]) -> None:
    table = Table(title="validation summary", title_justify="left")
    table.add_column("file", overflow="fold")
    for col in ("format", "records", "valid", "invalid"):
        table.add_column(col, justify="left" if col == "format" else "right")
    for s in summaries:
        if s.error:
            table.add_row(s.file, "error", "-", "-", "-")
        else:
            table.add_row(s.file, s.format or "?", str(s.records), str(s.valid), str(s.records - s.valid))
    out.print(table)
    for s in summaries:
        if s.control_strings:
            out.print(f"note: {s.file}: {s.control_strings} valid record(s) hold a chat template's control string "
                      f"inside a message, first {s.first_control_string}; `aligndata convert` refuses those that are "
                      "special tokens of its tokenizer unless --control-strings text|allow", markup=False)
    kinds: Counter = Counter()
    for s in summaries:
        kinds.update(s.by_kind)
    if kinds:
        kt = Table(title="problems by kind", title_justify="left")
        kt.add_column("kind")
        kt.add_column("count", justify="right")
        for kind, n in kinds.most_common():
            kt.add_row(kind, str(n))
        out.print(kt)


@app.command(cls=Command)
def convert(
    files: List[str] = typer.Argument(..., help="Input files, or - for stdin."),
    to: str = typer.Option(..., "--to", help="openai | preference (canonical JSONL) or sft | dpo (tokenized Arrow shards)."),
    out_path: str = typer.Option(..., "--out", "-o", help="Output: a .jsonl file (openai/preference; - for stdout) or a directory (sft/dpo)."),
    format: str = typer.Option(ConvertOptions.input_format, "--format", "-f", help=FORMAT_HELP),
    on_error: str = typer.Option(ConvertOptions.on_error, "--on-error", help="fail: stop at the first invalid record; skip: write it to the rejects file and go on."),
    rejects: Optional[str] = typer.Option(ConvertOptions.rejects, "--rejects", help="Rejects file for --on-error skip (default: OUT.rejects.jsonl, or OUT/rejects.jsonl for shards)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="sft/dpo: tokenizer directory, .gguf file, or hub name."),
    max_length: Optional[int] = typer.Option(ConvertOptions.max_length, "--max-length", help="sft/dpo: longest sequence in tokens (prompt + completion); default: no limit."),
    max_prompt_length: Optional[int] = typer.Option(ConvertOptions.max_prompt_length, "--max-prompt-length", help="dpo with --length-policy truncate only: prompt budget in tokens."),
    length_policy: str = typer.Option(ConvertOptions.length_policy, "--length-policy", help="drop: records over --max-length are dropped (counted); truncate: cut old prompt turns, then completions."),
    chat_template: Optional[str] = typer.Option(ConvertOptions.chat_template, "--chat-template", help="A Jinja file or a built-in name (chatml, llama3, hh); default: the tokenizer's own."),
    train_on: str = typer.Option(ConvertOptions.train_on, "--train-on", help="sft only: train every assistant turn (all) or only the last one (last)."),
    reasoning: str = typer.Option(ConvertOptions.reasoning, "--reasoning", help="sft/dpo, templates whose generation prompt opens <think>: keep the data's reasoning (reasoning_content, reasoning or thinking field, or <think> in the content; an empty block where there is none) or write an empty block (empty)."),
    control_strings: str = typer.Option(ConvertOptions.control_strings, "--control-strings", help="sft/dpo: a special token of the tokenizer written inside a message (<|im_end|>, ...): refuse the record (refuse), tokenize it as plain text (text; byte-level BPE tokenizers) or encode it as that token (allow)."),
    eval_fraction: float = typer.Option(ConvertOptions.eval_fraction, "--eval-fraction", help="Share of records held out as the eval split (seeded, per record)."),
    eval_file: Optional[str] = typer.Option(ConvertOptions.eval_file, "--eval-file", help="A raw file converted as the eval split instead of --eval-fraction."),
    shard_rows: int = typer.Option(ConvertOptions.shard_rows, "--shard-rows", help="Rows per Arrow shard file."),
    num_proc: int = typer.Option(ConvertOptions.num_proc, "--num-proc", help="Processes that validate and tokenize, this one included (output is identical for any value)."),
    seed: int = typer.Option(ConvertOptions.seed, "--seed", help="Seed of the eval split."),
    overwrite: bool = typer.Option(ConvertOptions.overwrite, "--overwrite", help="Replace an existing output: shards made with different settings, or an existing .jsonl file (only files aligndata writes are ever removed)."),
    eos_token: Optional[str] = typer.Option(ConvertOptions.eos_token, "--eos-token", help="sft/dpo: the end-of-sequence token (one token of the vocabulary), for a tokenizer that defines none, such as a bare tokenizer.json."),
    trust_remote_code: bool = typer.Option(ConvertOptions.trust_remote_code, "--trust-remote-code", help="Allow tokenizer code from the model repo (off by default)."),
    fast_tokenize: bool = typer.Option(ConvertOptions.fast_tokenize, "--fast-tokenize/--no-fast-tokenize", help="sft/dpo: byte-level BPE tokenizers go through a spot-checked piece cache (same tokens, 3-4x faster); --no-fast-tokenize uses the tokenizers library for every text."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Convert raw records to canonical JSONL (--to openai|preference) or to shards (--to sft|dpo).

    Every record read is either written or (with --on-error skip) rejected with its reasons;
    the summary prints read = written + rejected. Without --max-length nothing is dropped or cut
    for its length.

    Refused (exit 2): --max-prompt-length without --length-policy truncate or with --to sft;
    --length-policy truncate without --max-length; --train-on last with --to dpo;
    --eval-fraction with --eval-file.

    \b
    Examples:
      aligndata convert chats.json --to openai --out chats.jsonl
      aligndata convert pairs.jsonl --to preference --out pairs.jsonl --on-error skip
      aligndata convert pairs.json --to dpo --tokenizer ./tok --max-length 1024 --out shards/
    """
    if to in ("openai", "preference"):
        from aligndata.write.jsonl import normalize

        def run() -> int:
            counts = normalize(files, out_path, to, on_error=on_error, rejects=rejects, input_format=format,
                               progress=not quiet, overwrite=overwrite)
            msg = f"read {counts.read} = written {counts.written} + rejected {counts.rejected}"
            if counts.rejected:
                msg += f" ({', '.join(f'{k}: {v}' for k, v in counts.reasons.most_common())})"
            err.print(msg, markup=False)
            return EXIT_OK

        raise typer.Exit(handle_errors(run, writing=out_path))
    if to not in ("sft", "dpo"):
        _fail(f"--to {to!r}: choose openai, preference, sft or dpo", EXIT_INPUT)

    def run_shards() -> int:
        options = ConvertOptions(
            task=to, tokenizer=tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
            length_policy=length_policy, train_on=train_on, reasoning=reasoning, control_strings=control_strings,
            chat_template=chat_template, eval_fraction=eval_fraction,
            eval_file=eval_file, seed=seed, shard_rows=shard_rows, input_format=format, on_error=on_error,
            rejects=rejects, num_proc=num_proc, overwrite=overwrite, progress=not quiet,
            trust_remote_code=trust_remote_code, fast_tokenize=fast_tokenize, eos_token=eos_token,
        )
        from aligndata.report.render import print_warnings
        from aligndata.report.shard_stats import inspect_shards
        from aligndata.write.convert import convert_files, print_summary

        result = convert_files(files, Path(out_path), options)
        print_summary(result, err)
        # The one check of `aligndata inspect` that says the run trained the wrong thing: said here too.
        ends = [w for w in inspect_shards(result.out_dir).warnings if w.kind == "end-of-turn"]
        if ends:
            print_warnings(ends, err, "")
        return EXIT_OK

    raise typer.Exit(handle_errors(run_shards, writing=out_path))


@app.command(cls=Command)
def inspect(
    path: str = typer.Argument(..., help="A shard directory (aligndata convert --to sft|dpo), or a raw file to lint."),
    show: int = typer.Option(0, "--show", help="Shards: render N records token by token, trained vs masked."),
    index: Optional[int] = typer.Option(None, "--index", help="With --show: first row to show (0-based row of the split)."),
    random_rows: bool = typer.Option(False, "--random", help="With --show: N random rows instead of consecutive ones."),
    seed: Optional[int] = typer.Option(None, "--seed", help="With --random: seed of the choice."),
    split: str = typer.Option("train", "--split", help="With --show: the split to show rows of (train or eval)."),
    ids: bool = typer.Option(False, "--ids", help="With --show: print each token's id after it (token|id)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Shards: rows per padded batch in the padding estimate [default: 8]."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Shards: write the length histograms to this image (.png)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="Shards: tokenizer to decode with, if not the manifest's path."),
    format: str = typer.Option("auto", "--format", "-f", help="Raw files: " + FORMAT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document with every number instead of text."),
) -> None:
    """See what a run will train on: statistics, warnings, and records token by token.

    A shard directory gets its manifest summary, counts by reason, token-length percentiles per
    split, trained share, padding waste (padded batches vs packing) and a length histogram; a raw
    .json/.jsonl file gets the lint only (format, turns, roles, preference-pair warnings).

    \b
    Examples:
      aligndata inspect shards/
      aligndata inspect shards/ --show 2 --random --seed 1 --ids
      aligndata inspect shards/ --plot lengths.png --batch-size 16 --json
      aligndata inspect raw_pairs.jsonl
    """
    from aligndata.report.lint import lint_file
    from aligndata.report.render import plot_lengths, render_lint, render_report
    from aligndata.report.shard_stats import DEFAULT_BATCH_SIZE, inspect_shards
    from aligndata.report.token_view import records_to_show

    shown_only = [name for name, given in (("--index", index is not None), ("--random", random_rows),
                                           ("--ids", ids)) if given]
    if shown_only and not show:
        _fail(f"{shown_only[0]} goes with --show N", EXIT_INPUT)
    if index is not None and random_rows:
        _fail("--index and --random exclude each other: show consecutive rows from I, or random ones", EXIT_INPUT)
    if seed is not None and not random_rows:
        _fail("--seed goes with --random", EXIT_INPUT)
    console = Console(highlight=False)
    marks = console.no_color or console.color_system is None  # plain text: bracket the trained tokens

    def run() -> int:
        target = Path(path)
        if path != "-" and not target.exists():
            raise InputError(f"{path}: no such file or directory")
        if path == "-" or target.is_file():
            shard_only = [flag for flag, given in (("--show", show), ("--plot", plot), ("--tokenizer", tokenizer),
                                                   ("--batch-size", batch_size is not None),
                                                   ("--split", split != "train")) if given]
            if shard_only:
                raise InputError(f"{shard_only[0]} needs a shard directory; {path} is a raw file "
                                 "(convert it with `aligndata convert --to sft|dpo` first)")
            lint = lint_file(path, format)
            if as_json:
                sys.stdout.write(json.dumps(lint.to_json(), indent=2, ensure_ascii=False) + "\n")
            else:
                render_lint(lint, console)
            return EXIT_OK
        if format != "auto":
            raise InputError("--format applies to raw files, not to a shard directory")
        rows_per_batch = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        report = inspect_shards(target, batch_size=rows_per_batch, tokenizer=tokenizer, verify_tokenizer=bool(show))
        if show:
            report.records = records_to_show(report, split, show, index, random_rows, seed)
        if plot:
            plot_lengths(report, plot)
            err.print(f"wrote {plot}", markup=False)
        if as_json:
            sys.stdout.write(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
        else:
            render_report(report, console, ids=ids, marks=marks)
        return EXIT_OK

    raise typer.Exit(handle_errors(run))


@app.command(cls=Command)
def formats() -> None:
    """List the supported input formats and where their JSON Schemas are."""
    table = Table(title="input formats", title_justify="left")
    table.add_column("format")
    table.add_column("task")
    table.add_column("shape")
    for f in FORMATS.values():
        table.add_row(f.name, f.task, escape(f.summary))
    out.print(table)
    out.print(f"JSON Schemas: {schema_dir()}", markup=False)




def main() -> None:
    app()


if __name__ == "__main__":
    main()
