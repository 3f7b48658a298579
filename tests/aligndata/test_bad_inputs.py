"""Every file of the generated bad-input corpus (tests/badinputs.py) through `validate` and `convert`.

For each: no traceback, the documented exit code, a message naming file, line and JSON path, and with
`--on-error skip` nothing lost: read = written + rejected, equal to the lines of the output and rejects files.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from badinputs import INPUT, INVALID, OK, Case, generate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from aligndata.cli import app

runner = CliRunner()
NAMES = [c.name for c in generate("bad-inputs", write=False)]  # test ids only: the corpus is the fixture's
# A subset run through the tokenizer too (convert --to sft): every kind of failure, small files only.
SHARD_CASES = ["truncated.jsonl", "array-cut-mid-record.json", "invalid-utf8.jsonl", "bom.jsonl", "crlf.jsonl",
               "nan-in-message.jsonl", "unknown-role-robot.jsonl", "empty-conversations.jsonl", "null-record.jsonl",
               "sharegpt-int-at-conversations.1.value.jsonl", "deeply-nested.jsonl", "duplicates.jsonl",
               "mixed-formats.jsonl", "empty.jsonl", "a-directory.jsonl", "missing-file.jsonl",
               "nan-literal.jsonl", "empty-preference.jsonl", "text-preference-null-at-chosen.jsonl",
               "lone-surrogate-in-message.jsonl", "lone-surrogate-in-completion.jsonl",
               "lone-surrogate-in-array.json", "surrogate-pair.jsonl"]
SUMMARY = re.compile(r"read (\d+) = written (\d+) \+ rejected (\d+)")
SHARD_SUMMARY = re.compile(r"read (\d+) = kept (\d+) \+ rejected (\d+) \+ dropped (\d+)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Case]:
    return {c.name: c for c in generate(tmp_path_factory.mktemp("bad-inputs"))}


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def assert_names_place(case: Case, output: str) -> None:
    """The first line that names the file also names the line and the JSON path (record errors) or the fault."""
    where = str(case.path)
    lines = [ln for ln in output.splitlines() if where in ln]
    assert lines, f"no message names {where}:\n{output}"
    if case.line is not None:
        located = [ln for ln in lines if f"{where}:{case.line} " in ln]
        assert located, f"no message names {where}:{case.line}:\n{output}"
        if case.field is not None:
            at_field = re.compile(f" {re.escape(case.field)}[.\\[]?\\S*: ")  # the field, or a part of it
            assert any(at_field.search(ln) for ln in located), f"no message names {case.field}:\n{output}"
    if case.message:
        assert any(case.message in ln for ln in lines), f"{case.message!r} not in:\n{output}"


def jsonl_lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_corpus_covers_every_kind_of_bad_input(corpus):
    assert len(corpus) >= 90
    codes = {(c.validate, c.fail, c.skip) for c in corpus.values()}
    assert {(INVALID, INVALID, OK), (INVALID, INVALID, INVALID), (OK, OK, OK), (INPUT, INPUT, INPUT)} <= codes
    assert corpus["ten-megabyte-string.jsonl"].path.stat().st_size > 10 * 1024 * 1024


@pytest.mark.parametrize("name", NAMES)
def test_validate_exit_code_and_location(corpus, name):
    case = corpus[name]
    result = invoke("validate", "-q", case.path)
    assert result.exit_code == case.validate, result.output
    if case.validate != OK:
        assert_names_place(case, result.output)
    as_json = invoke("validate", "--json", case.path)
    assert as_json.exit_code == case.validate
    doc = json.loads(as_json.stdout)
    assert doc["exit_code"] == case.validate
    if case.validate == INVALID and case.field is not None:
        assert any(p["file"] == str(case.path) and p["line"] == case.line and p["path"].startswith(case.field)
                   for p in doc["problems"]), doc["problems"]


@pytest.mark.parametrize("name", NAMES)
def test_convert_on_error_fail_writes_all_or_nothing(corpus, name, tmp_path):
    case = corpus[name]
    out = tmp_path / "out.jsonl"
    result = invoke("convert", "-q", case.path, "--to", case.to, "--out", out)
    assert result.exit_code == case.fail, result.output
    if case.fail != OK:
        assert_names_place(case, result.output)
        assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial output, no temporary left
    else:
        read, written, rejected = map(int, SUMMARY.search(result.output).groups())
        assert (read, written, rejected) == (case.records, case.records, 0)
        assert len(jsonl_lines(out)) == written


@pytest.mark.parametrize("name", NAMES)
def test_convert_on_error_skip_loses_nothing(corpus, name, tmp_path):
    case = corpus[name]
    out, rejects = tmp_path / "out.jsonl", tmp_path / "out.jsonl.rejects.jsonl"
    result = invoke("convert", "-q", case.path, "--to", case.to, "--out", out, "--on-error", "skip")
    assert result.exit_code == case.skip, result.output
    if case.skip != OK:
        assert_names_place(case, result.output)
        assert list(tmp_path.iterdir()) == []
        return
    read, written, rejected = map(int, SUMMARY.search(result.output).groups())
    assert read == written + rejected == case.records
    assert len(jsonl_lines(out)) == written
    rejected_lines = jsonl_lines(rejects)
    assert len(rejected_lines) == rejected
    if case.line is not None:  # the rejected record is kept with where it was and why
        assert [(r["file"], r["line"]) for r in rejected_lines] == [(str(case.path), case.line)]
        assert any(p["path"].startswith(case.field) for p in rejected_lines[0]["reasons"])


@pytest.mark.parametrize("name", SHARD_CASES)
def test_convert_to_shards_has_the_same_exit_codes_and_loses_nothing(corpus, name, tmp_path, tiny_tokenizer_dir):
    case = corpus[name]
    task = case.task  # sft shards from conversations, dpo shards from preference pairs
    for mode, expected in (("fail", case.fail), ("skip", case.skip)):
        out = tmp_path / f"shards-{mode}"
        result = invoke("convert", "-q", case.path, "--to", task, "-t", tiny_tokenizer_dir, "--out", out,
                        "--on-error", mode)
        assert result.exit_code == expected, (mode, result.output)
        if expected != OK:
            assert_names_place(case, result.output)
            assert not out.exists() and not (tmp_path / f".shards-{mode}.partial" / "manifest.json").exists()
            continue
        read, kept, rejected, dropped = map(int, SHARD_SUMMARY.search(result.output).groups())
        assert read == kept + rejected + dropped == case.records and dropped == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["counts"]["kept"] == kept == sum(s["rows"] for s in manifest["splits"].values())
        assert len(jsonl_lines(out / "rejects.jsonl")) == rejected


def run_module(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aligndata", *map(str, args)], input=stdin, capture_output=True,
                          timeout=60)


def test_a_directory_as_input_is_exit_2_without_traceback_from_a_real_process(corpus):
    case = corpus["a-directory.jsonl"]
    proc = run_module("validate", case.path)
    assert proc.returncode == INPUT
    assert b"Traceback" not in proc.stderr + proc.stdout
    assert f"error: {case.path}: is a directory, not a file".encode() in proc.stderr


def test_bad_stdin_is_named_stdin_with_its_line_and_skip_loses_nothing(corpus, tmp_path):
    data = corpus["invalid-utf8.jsonl"].path.read_bytes()
    proc = run_module("validate", "-q", "-", stdin=data)
    assert proc.returncode == INVALID and b"Traceback" not in proc.stderr + proc.stdout
    assert b"<stdin>:3 (record 3) $: invalid UTF-8" in proc.stdout
    out = tmp_path / "out.jsonl"
    proc = run_module("convert", "-q", "-", "--to", "openai", "--out", out, "--on-error", "skip", stdin=data)
    assert proc.returncode == OK, proc.stderr
    assert b"read 3 = written 2 + rejected 1" in proc.stderr
    assert len(jsonl_lines(out)) == 2
    assert [(r["file"], r["line"]) for r in jsonl_lines(tmp_path / "out.jsonl.rejects.jsonl")] == [("<stdin>", 3)]


GOOD_BYTES = "".join(json.dumps(r) + "\n" for r in [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}], "system": "Be brief."},
] * 3).encode()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, len(GOOD_BYTES)), at=st.integers(0, len(GOOD_BYTES)),
       junk=st.binary(max_size=8), suffix=st.sampled_from([".jsonl", ".json"]))
def test_any_mutation_of_a_good_file_is_handled_and_nothing_is_lost(tmp_path_factory, cut, at, junk, suffix):
    """Random truncation plus random bytes spliced in: a documented exit code, never a traceback, and
    with --on-error skip every record read is either written or rejected."""
    d = tmp_path_factory.mktemp("mutant")
    data = GOOD_BYTES[:cut]
    data = data[:at] + junk + data[at:]
    src = d / f"mutant{suffix}"
    src.write_bytes(data)
    assert invoke("validate", "-q", src).exit_code in (OK, INVALID, INPUT)
    out = d / "out.jsonl"
    result = invoke("convert", "-q", src, "--to", "openai", "--out", out, "--on-error", "skip")
    assert result.exit_code in (OK, INVALID, INPUT)
    if result.exit_code == OK:
        read, written, rejected = map(int, SUMMARY.search(result.output).groups())
        assert read == written + rejected
        assert len(jsonl_lines(out)) == written
        assert len(jsonl_lines(d / "out.jsonl.rejects.jsonl")) == rejected
    else:
        assert str(src) in result.output and not out.exists()


def test_convert_to_shards_with_every_record_rejected_names_the_input_and_keeps_the_reasons(tmp_path,
                                                                                             tiny_tokenizer_dir):
    src = tmp_path / "all-bad.jsonl"
    src.write_text('{"conversations": []}\n{"conversations": [{"from": "robot", "value": "x"}]}\n')
    out = tmp_path / "shards"
    result = invoke("convert", "-q", src, "--to", "sft", "-t", tiny_tokenizer_dir, "--out", out, "--on-error", "skip")
    assert result.exit_code == INPUT
    staged = tmp_path / "shards.rejects.jsonl"  # beside the output: the failed run's staging directory is gone
    assert f"error: {src}: no records were kept, nothing to write (read 2, rejected 2, dropped 0); " \
           f"the reasons are in {staged}" in result.output
    assert [r["line"] for r in jsonl_lines(staged)] == [1, 2]
    assert not out.exists() and not (tmp_path / ".shards.partial").exists()
