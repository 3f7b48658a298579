"""Limits against hostile or broken inputs (issue 16): a record's size, the tokenizer's work, a tokenizer
panic, a chat template that runs forever or renders without end. Each is that record's rejection (or drop),
counted and named, never a hang, a memory blow-up or a traceback.
"""

from __future__ import annotations

import gzip
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from faults import CHAT, write_chats
from tiny_tokenizer import CHATML_TEMPLATE

import aligndata.encode.encoder as encoder_module
import aligndata.encode.limits as limits
import aligndata.read.reader as reader
from aligndata.read.validate import validate_files
from aligndata.write.convert import convert

HUGE = 1 << 20  # characters of the over-long record


def chat(text: str) -> dict:
    return {"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "Fine."}]}


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


# -- the size of one JSON Lines record -----------------------------------------------------------------

def test_json_lines_record_over_the_cap_is_rejected_naming_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "MAX_RECORD_CHARS", 4096)
    src = write_records(tmp_path / "in.jsonl", [CHAT, chat("x" * 10_000), CHAT])
    problems = []
    result = validate_files([str(src)], "auto", on_problem=problems.append)
    assert result.files[0].records == 3 and result.files[0].valid == 2
    assert [str(p) for p in problems] == [f"{src}:2 (record 2) $: record larger than 4096 bytes"]


def test_json_lines_cap_equals_the_json_array_cap(tmp_path, monkeypatch, tiny_tokenizer_dir):
    monkeypatch.setattr(reader, "MAX_RECORD_CHARS", 4096)
    src = write_records(tmp_path / "in.jsonl", [CHAT, chat("x" * 10_000), CHAT])
    out = tmp_path / "out"
    result = convert([str(src)], out, "sft", str(tiny_tokenizer_dir), on_error="skip")
    assert result.manifest["counts"]["kept"] == 2 and result.manifest["counts"]["rejected"] == {"json": 1}
    [entry] = rejects(out)
    assert (entry["line"], entry["reasons"][0]["message"]) == (2, "record larger than 4096 bytes")
    array = tmp_path / "in.json"
    array.write_text(json.dumps([CHAT, chat("x" * (2 << 20))]))  # past the first read: the cap is looked at
    problems = []
    validate_files([str(array)], "auto", on_problem=problems.append)
    assert [p.message for p in problems] == ["record larger than 4096 bytes (or an unterminated string)"]


@pytest.mark.slow
def test_a_3_gb_line_in_a_small_gzip_is_refused_in_bounded_memory(tmp_path):
    src = tmp_path / "bomb.jsonl.gz"
    with gzip.open(src, "wb", compresslevel=1) as f:
        f.write(json.dumps(CHAT).encode() + b"\n" + b'{"conversations": [{"from": "human", "value": "')
        block = b"a" * (64 << 20)
        for _ in range(48):  # 3 GiB
            f.write(block)
        f.write(b'"}]}\n' + json.dumps(CHAT).encode() + b"\n")
    proc = subprocess.run([sys.executable, "-m", "aligndata", "validate", str(src)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{src}:2 (record 2) $: record larger than 256 MiB" in proc.stdout
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss << 10
    assert peak < 1536 << 20, f"peak RSS {peak >> 20} MiB"


# -- the tokenizer's work is bounded by max_length -------------------------------------------------------

def test_record_far_past_max_length_is_dropped_without_tokenizing_it(tmp_path, tiny_tokenizer_dir, monkeypatch):
    seen: list[int] = []
    real = encoder_module.tokenize

    def spy(backend, texts, bos):
        seen.extend(len(t) for t in texts)
        return real(backend, texts, bos)

    monkeypatch.setattr(encoder_module, "tokenize", spy)
    src = write_records(tmp_path / "in.jsonl", [CHAT, chat("word " * (HUGE // 5)), CHAT])
    result = convert([str(src)], tmp_path / "out", "sft", str(tiny_tokenizer_dir), max_length=64)
    assert result.manifest["counts"]["kept"] == 2 and result.manifest["counts"]["dropped"] == {"too-long": 1}
    assert max(seen) < 1000  # the long rendering never reached the tokenizer


def test_char_budget_leaves_drop_and_truncate_results_unchanged(tmp_path, tiny_tokenizer_dir, monkeypatch):
    records = [CHAT, chat("word " * 300), chat("tiny"), chat("a b c " * 40)]
    src = write_records(tmp_path / "in.jsonl", records)
    outputs = {}
    for budget in ("on", "off"):
        if budget == "off":
            monkeypatch.setattr(limits.CharBudget, "check", lambda self, rendered: rendered)
        for policy in ("drop", "truncate"):
            out = tmp_path / f"{budget}-{policy}"
            convert([str(src)], out, "sft", str(tiny_tokenizer_dir), max_length=40, length_policy=policy,
                    on_error="skip")
            outputs[budget, policy] = sorted((p.relative_to(out).as_posix(), p.read_bytes())
                                             for p in out.rglob("*") if p.is_file())
    assert outputs["on", "drop"] == outputs["off", "drop"] and outputs["on", "truncate"] == outputs["off", "truncate"]


# -- a tokenizer panic is one record's rejection --------------------------------------------------------

class PanicException(BaseException):
    """What pyo3 raises for a Rust panic (its name is what aligndata recognises)."""


def test_tokenizer_panic_rejects_that_record_only(tmp_path, tiny_tokenizer_dir, monkeypatch):
    real = encoder_module.tokenize

    def panicky(backend, texts, bos):
        if any("PANIC" in t for t in texts):
            raise PanicException("called `Result::unwrap()` on an `Err` value")
        return real(backend, texts, bos)

    monkeypatch.setattr(encoder_module, "tokenize", panicky)
    src = write_records(tmp_path / "in.jsonl", [CHAT, chat("PANIC here"), CHAT])
    out = tmp_path / "out"
    result = convert([str(src)], out, "sft", str(tiny_tokenizer_dir), on_error="skip")
    assert result.manifest["counts"]["kept"] == 2 and result.manifest["counts"]["rejected"] == {"tokenizer-error": 1}
    [entry] = rejects(out)
    assert entry["line"] == 2
    assert entry["reasons"][0]["message"] == ("the tokenizer failed on this record: called `Result::unwrap()` on "
                                              "an `Err` value")


# -- a chat template that runs forever or renders without end -------------------------------------------

LOOP = ("{% if messages[0]['content'] == 'LOOP' %}{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% endfor %}{% endfor %}{% endif %}")
FLOOD = "{% if messages[0]['content'] == 'FLOOD' %}{% for i in range(100000) %}0123456789{% endfor %}{% endif %}"


@pytest.mark.parametrize("num_proc", [1, 2])
def test_template_that_runs_forever_is_stopped_and_the_record_rejected(tmp_path, tiny_tokenizer_dir, monkeypatch,
                                                                       num_proc):
    monkeypatch.setattr(limits, "RENDER_SECONDS", 0.1)
    template = tmp_path / "slow.jinja"
    template.write_text(LOOP + CHATML_TEMPLATE)
    records = [chat("LOOP") if i % 64 == 5 else CHAT for i in range(256)]  # one in each chunk of 64 records
    src = write_records(tmp_path / "in.jsonl", records)
    out = tmp_path / "out"
    result = convert([str(src)], out, "sft", str(tiny_tokenizer_dir), chat_template=str(template), on_error="skip",
                     num_proc=num_proc)
    assert result.manifest["counts"]["kept"] == 252
    assert result.manifest["counts"]["rejected"] == {"template-error": 4}
    assert rejects(out)[0]["reasons"][0]["message"] == (
        "the chat template file:slow.jinja ran longer than 0.1 s on this record (a limit of aligndata); "
        "the record is rejected")


def test_template_output_past_the_size_limit_rejects_the_record(tmp_path, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setattr(limits, "RENDER_MAX_CHARS", 100_000)
    template = tmp_path / "flood.jinja"
    template.write_text(FLOOD + CHATML_TEMPLATE)
    src = write_records(tmp_path / "in.jsonl", [CHAT, chat("FLOOD"), CHAT])
    out = tmp_path / "out"
    result = convert([str(src)], out, "sft", str(tiny_tokenizer_dir), chat_template=str(template), on_error="skip")
    assert result.manifest["counts"]["kept"] == 2
    assert rejects(out)[0]["reasons"][0]["message"] == (
        "the chat template file:flood.jinja produced more than 100,000 characters on this record (a limit of "
        "aligndata); the record is rejected")
