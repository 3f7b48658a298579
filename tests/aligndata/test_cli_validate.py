"""The `aligndata validate`, `formats` and `convert --to openai|preference` commands.

Exit codes: 0 valid, 1 invalid records, 2 usage or I/O error. Problems go to stdout, errors
about whole files to stderr, the convert summary (read = written + rejected) to stderr.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aligndata.cli import app
from aligndata.read.validate import FileCheck
from paths import SAMPLES

BROKEN = SAMPLES / "broken"

runner = CliRunner()


def run(*args: str, input: bytes | None = None):
    return runner.invoke(app, list(args), input=input)


def validate_json(*args: str, input: bytes | None = None) -> tuple[int, dict]:
    result = run("validate", *args, "--json", input=input)
    return result.exit_code, json.loads(result.stdout)


SFT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr! Ahoy."}]}
ENDS_WITH_USER = {"messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in tmp_path so file names in messages are short and relative."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_jsonl(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# -- validate: exit code 0 ------------------------------------------------------------------------------

def test_all_sample_files_validate_with_exit_code_0():
    files = sorted(str(p) for p in SAMPLES.glob("*.json*"))
    code, doc = validate_json(*files)
    assert code == 0
    assert doc["valid"] is True and doc["problems"] == [] and doc["problems_total"] == 0
    assert {Path(f["file"]).name: (f["format"], f["records"], f["invalid"]) for f in doc["files"]} == {
        "hh.jsonl": ("hh", 10, 0),
        "openai.jsonl": ("openai", 24, 0),
        "openai_preference.jsonl": ("openai-preference", 14, 0),
        "sharegpt.json": ("sharegpt", 27, 0),
        "sharegpt_preference.json": ("sharegpt-preference", 15, 0),
        "text_preference.jsonl": ("text-preference", 15, 0),
    }


def test_valid_file_prints_only_the_summary_table(workdir):
    write_jsonl(workdir / "ok.jsonl", SFT, SFT)
    result = run("validate", "ok.jsonl")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == "validation summary"
    assert re.search(r"│ ok\.jsonl +│ openai +│ +2 │ +2 │ +0 │", result.stdout)
    assert "problems by kind" not in result.stdout
    assert result.stderr == ""


# -- validate: exit code 1 ------------------------------------------------------------------------------

def test_invalid_records_print_one_line_each_then_the_summary_and_exit_1(workdir):
    write_jsonl(workdir / "bad.jsonl", SFT, ENDS_WITH_USER, '{"messages": [}', SFT)
    result = run("validate", "bad.jsonl")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "bad.jsonl:2 (record 2) $.messages[0]: conversation has no assistant turn to train on",
        "bad.jsonl:3 (record 3) $: invalid JSON: Expecting value (column 15)",
        "validation summary",
    ]
    assert re.search(r"│ bad\.jsonl +│ openai +│ +4 │ +2 │ +2 │", result.stdout)
    assert re.search(r"│ last-turn +│ +1 │", result.stdout)
    assert re.search(r"│ json +│ +1 │", result.stdout)


# What each broken sample file must report: (record, kind, path), as in sample_data/broken/README.md.
BROKEN_EXPECTED = {
    "sharegpt.broken.json": (12, [
        (3, "last-turn", "$.conversations[2]"), (4, "role-order", "$.conversations[1]"),
        (5, "empty-content", "$.conversations[1].value"), (6, "schema", "$.conversations[1].from"),
        (7, "role-order", "$.conversations[2]"), (8, "role-order", "$.conversations[2]"),
        (9, "tool-call", "$.conversations[1].value"), (10, "schema", "$"), (11, "tools", "$.tools")]),
    "openai.broken.jsonl": (12, [
        (2, "json", "$"), (3, "role-order", "$.messages[0]"), (4, "schema", "$.messages[1].role"),
        (5, "tool-call", "$.messages[0].tool_calls"), (6, "unsupported-content", "$.messages[0].content[0].type"),
        (7, "last-turn", "$.messages[2]"), (8, "last-turn", "$.messages[1]"), (10, "role-order", "$.messages[2]"),
        (11, "schema", "$.messages")]),
    "sharegpt_preference.broken.json": (8, [
        (2, "last-turn", "$.conversations[1]"), (2, "role-order", "$.chosen"), (2, "role-order", "$.rejected"),
        (3, "role-order", "$.chosen"), (4, "identical-pair", "$.rejected"), (5, "empty-content", "$.rejected.value"),
        (6, "schema", "$"), (8, "schema", "$.chosen")]),
    "openai_preference.broken.jsonl": (10, [
        (3, "no-shared-prefix", "$"), (4, "last-turn", "$.prompt[1]"), (4, "role-order", "$.chosen[0]"),
        (4, "role-order", "$.rejected[0]"), (5, "schema", "$.chosen"), (6, "role-order", "$.rejected[0]"),
        (7, "identical-pair", "$.rejected"), (8, "empty-content", "$.chosen[0].content"),
        (9, "role-order", "$.prompt[2]")]),
    "text_preference.broken.jsonl": (8, [
        (2, "identical-pair", "$.rejected"), (3, "empty-content", "$.prompt"), (4, "schema", "$"),
        (5, "schema", "$.chosen"), (7, "json", "$"), (8, "empty-content", "$.chosen")]),
    "hh.broken.jsonl": (8, [
        (2, "hh-format", "$.chosen"), (3, "hh-format", "$.chosen"), (4, "hh-format", "$.rejected"),
        (5, "identical-pair", "$.rejected"), (6, "role-order", "$.chosen (turn 2)"),
        (7, "empty-content", "$.rejected (turn 2)")]),
}


@pytest.mark.parametrize("name", list(BROKEN_EXPECTED))
def test_each_broken_sample_file_reports_what_its_readme_lists_and_exits_1(name):
    records, expected = BROKEN_EXPECTED[name]
    code, doc = validate_json(str(BROKEN / name), "--max-errors", "100")
    assert code == 1
    assert [(p["record"], p["kind"], p["path"]) for p in doc["problems"]] == expected
    invalid = len({r for r, _, _ in expected})
    assert (doc["files"][0]["records"], doc["files"][0]["invalid"]) == (records, invalid)
    assert "mixed-format" not in doc["files"][0]["problems_by_kind"]


def test_json_output_is_one_document_with_files_problems_and_counts(workdir):
    write_jsonl(workdir / "bad.jsonl", SFT, ENDS_WITH_USER)
    code, doc = validate_json("bad.jsonl")
    assert code == 1
    assert doc == {
        "valid": False,
        "exit_code": 1,
        "files": [{"file": "bad.jsonl", "format": "openai", "records": 2, "valid": 1, "invalid": 1,
                   "problems_by_kind": {"last-turn": 1}, "error": None,
                   "control_strings": {"records": 0, "first": None}}],
        "problems": [{"file": "bad.jsonl", "line": 2, "record": 2, "path": "$.messages[0]",
                      "message": "conversation has no assistant turn to train on", "kind": "last-turn"}],
        "problems_shown": 1,
        "problems_total": 1,
    }


def test_max_errors_caps_printed_problems_but_not_the_counts(workdir):
    write_jsonl(workdir / "bad.jsonl", *[ENDS_WITH_USER] * 5)
    result = run("validate", "bad.jsonl", "--max-errors", "2")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[:3] == [
        "bad.jsonl:1 (record 1) $.messages[0]: conversation has no assistant turn to train on",
        "bad.jsonl:2 (record 2) $.messages[0]: conversation has no assistant turn to train on",
        "... 3 more problems not shown (--max-errors 2)",
    ]
    code, doc = validate_json("bad.jsonl", "--max-errors", "2")
    assert (code, doc["problems_shown"], doc["problems_total"], doc["files"][0]["invalid"]) == (1, 2, 5, 5)


def test_mixed_format_file_is_reported_and_exits_1(workdir):
    write_jsonl(workdir / "mixed.jsonl", SFT, {"prompt": "q", "chosen": "a", "rejected": "b"})
    result = run("validate", "mixed.jsonl")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == (
        "mixed.jsonl:2 $: records match different formats: openai (1 record, first: record 1 at line 1), "
        "text-preference (1 record, first: record 2 at line 2); split the file by format or pass --format")


def test_format_option_checks_every_record_against_that_format(workdir):
    write_jsonl(workdir / "pairs.jsonl", {"prompt": "q", "chosen": "a", "rejected": "b"})
    code, doc = validate_json("pairs.jsonl", "--format", "openai")
    assert code == 1
    assert [(p["path"], p["message"]) for p in doc["problems"]] == [("$", "'messages' is a required property")]


# -- validate: containers ------------------------------------------------------------------------------

def test_stdin_dash_is_validated_as_stdin(workdir):
    data = (json.dumps(SFT) + "\n" + json.dumps(ENDS_WITH_USER) + "\n").encode()
    result = run("validate", "-", input=data)
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == (
        "<stdin>:2 (record 2) $.messages[0]: conversation has no assistant turn to train on")


def test_gzipped_json_array_validates(workdir):
    (workdir / "chats.json.gz").write_bytes(gzip.compress(json.dumps([SFT, SFT, SFT], indent=2).encode()))
    code, doc = validate_json("chats.json.gz")
    assert code == 0
    assert doc["files"][0] == {"file": "chats.json.gz", "format": "openai", "records": 3, "valid": 3, "invalid": 0,
                               "problems_by_kind": {}, "error": None,
                               "control_strings": {"records": 0, "first": None}}


def test_truncated_json_array_reports_the_records_before_the_break(workdir):
    (workdir / "cut.json").write_text("[\n" + json.dumps(SFT) + ",\n" + json.dumps(SFT)[:20])
    code, doc = validate_json("cut.json")
    assert code == 1
    assert doc["problems"] == [{"file": "cut.json", "line": 3, "record": 2, "path": "$", "kind": "json",
                                "message": "invalid JSON: file ends inside a record (truncated?)"}]


# -- validate: exit code 2 ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("setup", "args", "stderr"),
    [
        (None, ["missing.json"], "error: missing.json: no such file\n"),
        ("dir", ["adir"], "error: adir: is a directory, not a file\n"),
        ("text", ["notes.jsonl"], "error: notes.jsonl:1: not JSON (Expecting value at column 1)\n"),
        ("text", ["notes.jsonl", "--format", "alpaca"],
         "error: unknown format 'alpaca'; choose one of: auto, sharegpt, openai, sharegpt-preference, "
         "openai-preference, text-preference, hh\n"),
        ("empty", ["empty.json"], "error: empty.json: holds no records (an empty JSON array)\n"),
        ("unknown", ["other.jsonl"],
         "error: other.jsonl: cannot detect the format: no record looks like any of sharegpt, openai, "
         "sharegpt-preference, openai-preference, text-preference, hh (pass --format to see why each record fails)\n"),
    ],
)
def test_files_that_cannot_be_read_as_data_exit_2_with_one_error_line(workdir, setup, args, stderr):
    if setup == "dir":
        (workdir / "adir").mkdir()
    elif setup == "text":
        (workdir / "notes.jsonl").write_text("just some notes\n")
    elif setup == "empty":
        (workdir / "empty.json").write_text("[]")
    elif setup == "unknown":
        write_jsonl(workdir / "other.jsonl", {"text": "a"})
    result = run("validate", *args)
    assert result.exit_code == 2
    assert result.stderr == stderr


def test_an_unreadable_file_exits_2_even_when_other_files_hold_invalid_records(workdir):
    write_jsonl(workdir / "bad.jsonl", ENDS_WITH_USER)
    code, doc = validate_json("bad.jsonl", "missing.json")
    assert code == 2
    assert [(f["file"], f["invalid"], f["error"]) for f in doc["files"]] == [
        ("bad.jsonl", 1, None), ("missing.json", 0, "missing.json: no such file")]


def test_validate_without_files_is_a_usage_error():
    assert run("validate").exit_code == 2


def test_cli_process_never_prints_a_traceback_on_garbage():
    garbage = b"\x00\xff{[nonsense\n" * 3
    proc = subprocess.run([sys.executable, "-m", "aligndata", "validate", "-", "-q"], input=garbage,
                          capture_output=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.decode() == ("error: <stdin>: not JSON (starts with b'\\x00\\xff{[nonsense\\n\\x00\\xff{[non'); "
                                    "expected a JSON array, an object or JSON Lines\n")


# -- formats ----------------------------------------------------------------------------------------------

def test_formats_command_lists_the_six_formats():
    result = run("formats")
    assert result.exit_code == 0
    for name, task in [("sharegpt", "sft"), ("openai", "sft"), ("sharegpt-preference", "dpo"),
                       ("openai-preference", "dpo"), ("text-preference", "dpo"), ("hh", "dpo")]:
        assert re.search(rf"│ {re.escape(name)} +│ {task} +│", result.stdout), name
    assert "JSON Schemas: " in result.stdout


# -- convert --to openai | preference --------------------------------------------------------------

def convert(*args: str):
    result = run("convert", *args, "--quiet")
    return result.exit_code, result.stderr


def counts(stderr: str) -> tuple[int, int, int]:
    m = re.search(r"^read (\d+) = written (\d+) \+ rejected (\d+)", stderr, re.M)
    assert m, stderr
    return int(m[1]), int(m[2]), int(m[3])


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_convert_sharegpt_to_openai_writes_every_conversation(workdir):
    code, stderr = convert(str(SAMPLES / "sharegpt.json"), "--to", "openai", "--out", "out.jsonl")
    assert (code, stderr) == (0, "read 27 = written 27 + rejected 0\n")
    out = lines(workdir / "out.jsonl")
    assert len(out) == 27
    assert out[0] == {"messages": [
        {"role": "system", "content": 'You are a cheerful pirate assistant. Answer every question in a pirate voice, '
                                      'starting with "Arr!", in one to three short sentences.'},
        {"role": "user", "content": "What's the capital of France?"},
        {"role": "assistant", "content": "Arr! The capital of France be Paris, matey, a fine port town on the River Seine."},
    ]}
    checked = list(FileCheck(str(workdir / "out.jsonl")).records())
    assert [c.ok for c in checked] == [True] * 27


@pytest.mark.parametrize("name", ["sharegpt_preference.json", "openai_preference.jsonl", "text_preference.jsonl",
                                  "hh.jsonl"])
def test_convert_every_preference_sample_to_canonical_pairs(workdir, name):
    code, stderr = convert(str(SAMPLES / name), "--to", "preference", "--out", "pairs.jsonl")
    assert code == 0
    read, written, rejected = counts(stderr)
    assert (read, written, rejected) == (read, read, 0)
    out = lines(workdir / "pairs.jsonl")
    assert len(out) == read
    assert all(set(p) <= {"prompt", "chosen", "rejected", "tools"} for p in out)
    assert all(p["chosen"][0]["role"] == "assistant" and p["prompt"][-1]["role"] in ("user", "tool") for p in out)


def test_convert_fail_stops_at_the_first_invalid_record_and_leaves_the_old_output_untouched(workdir):
    (workdir / "out.jsonl").write_text("previous run\n")
    code, stderr = convert(str(BROKEN / "hh.broken.jsonl"), "--to", "preference", "--out", "out.jsonl",
                           "--overwrite")
    assert code == 1
    assert stderr == (
        f"error: {BROKEN / 'hh.broken.jsonl'}:2 (record 2) $.chosen: no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found\n"
        "(stopped at the first invalid record; --on-error skip writes invalid records to a rejects file)\n")
    assert (workdir / "out.jsonl").read_text() == "previous run\n"
    assert sorted(p.name for p in workdir.iterdir()) == ["out.jsonl"]


def test_convert_skip_writes_valid_records_and_rejects_with_file_line_and_reasons(workdir):
    src = shutil.copy(BROKEN / "text_preference.broken.jsonl", workdir / "in.jsonl")
    code, stderr = convert(str(src), "--to", "preference", "--out", "out.jsonl", "--on-error", "skip")
    assert code == 0
    assert stderr == "read 8 = written 2 + rejected 6 (empty-content: 2, schema: 2, identical-pair: 1, json: 1)\n"
    read, written, rejected = counts(stderr)
    assert read == written + rejected
    out, rejects = lines(workdir / "out.jsonl"), lines(workdir / "out.jsonl.rejects.jsonl")
    assert (len(out), len(rejects)) == (written, rejected)
    assert [(r["file"], r["line"], r["record"]) for r in rejects] == [
        (str(src), n, n) for n in (2, 3, 4, 5, 7, 8)]
    assert rejects[0] == {
        "file": str(src), "line": 2, "record": 2,
        "reasons": [{"file": str(src), "line": 2, "record": 2, "path": "$.rejected",
                     "message": "chosen and rejected are identical", "kind": "identical-pair"}],
        "value": {"prompt": "Spell 'cat'.", "chosen": "C-A-T.", "rejected": "C-A-T."},
    }
    assert rejects[4]["text"] == '{"prompt": "Capital of Japan?", "chosen": "Tokyo.", "rejected": "Osaka.",}'
    assert "value" not in rejects[4]
    assert out[0] == {"prompt": [{"role": "user", "content": "What is 5 + 5?"}],
                      "chosen": [{"role": "assistant", "content": "10."}],
                      "rejected": [{"role": "assistant", "content": "55."}]}


def test_convert_skip_accounts_for_every_record_of_several_files(workdir):
    code, stderr = convert(str(BROKEN / "openai.broken.jsonl"), str(SAMPLES / "openai.jsonl"), "--to", "openai",
                           "--out", "sft.jsonl", "--on-error", "skip", "--rejects", "rej/sft.rejects.jsonl")
    assert code == 0
    read, written, rejected = counts(stderr)
    assert (read, written, rejected) == (36, 27, 9)
    assert len(lines(workdir / "sft.jsonl")) == written
    assert len(lines(workdir / "rej" / "sft.rejects.jsonl")) == rejected


def test_convert_to_the_wrong_task_is_a_usage_error(workdir):
    code, stderr = convert(str(SAMPLES / "hh.jsonl"), "--to", "openai", "--out", "out.jsonl")
    assert code == 2
    assert stderr == f"error: {SAMPLES / 'hh.jsonl'}: holds preference pairs (hh); --to openai needs conversations\n"
    assert not (workdir / "out.jsonl").exists()


def test_convert_missing_input_exits_2(workdir):
    code, stderr = convert("missing.jsonl", "--to", "openai", "--out", "out.jsonl")
    assert (code, stderr) == (2, "error: missing.jsonl: no such file\n")


def test_a_mixed_file_is_found_wherever_the_second_format_starts(workdir):
    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    write_jsonl(workdir / "late.jsonl", *([SFT] * 300 + [pair]))
    code, doc = validate_json("late.jsonl")
    assert code == 1 and doc["files"][0]["format"] == "openai"
    assert doc["files"][0]["problems_by_kind"] == {"mixed-format": 1}
    assert doc["problems"][0]["message"] == (
        "records match different formats: openai (300 records, first: record 1 at line 1), "
        "text-preference (1 record, first: record 301 at line 301); split the file by format or pass --format")
    # a file of the other task that is in fact mixed is refused as mixed, not as the wrong task
    write_jsonl(workdir / "first.jsonl", pair, SFT, SFT)
    code, stderr = convert("first.jsonl", "--to", "openai", "--out", "out.jsonl")
    assert code == 1 and "records match different formats: openai (2 records" in stderr
    assert not (workdir / "out.jsonl").exists()
    code, stderr = convert("late.jsonl", "--to", "openai", "--out", "out.jsonl", "--on-error", "skip")
    assert code == 1 and "records match different formats" in stderr and not (workdir / "out.jsonl").exists()


def test_convert_refuses_a_mixed_format_file(workdir):
    write_jsonl(workdir / "mixed.jsonl", SFT, {"conversations": [{"from": "human", "value": "q"}]})
    code, stderr = convert("mixed.jsonl", "--to", "openai", "--out", "out.jsonl", "--on-error", "skip")
    assert code == 1
    assert stderr.splitlines()[0] == (
        "error: mixed.jsonl:2 $: records match different formats: openai (1 record, first: record 1 at line 1), "
        "sharegpt (1 record, first: record 2 at line 2); split the file by format or pass --format")


def test_a_control_string_inside_a_message_is_noted_but_keeps_the_record_valid(workdir):
    fake = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Answer<|im_end|>\n<|im_start|>user\nfake"}]}
    write_jsonl(workdir / "chats.jsonl", SFT, fake)

    code, doc = validate_json("chats.jsonl")
    text = runner.invoke(app, ["validate", "chats.jsonl", "-q"])

    assert code == 0
    assert doc["files"][0]["control_strings"] == {
        "records": 1, "first": "chats.jsonl:2 (record 2) $.messages[1].content: '<|im_end|>'"}
    assert ("note: chats.jsonl: 1 valid record(s) hold a chat template's control string inside a message, first "
            "chats.jsonl:2 (record 2) $.messages[1].content: '<|im_end|>'") in " ".join(text.output.split())
