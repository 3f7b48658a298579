"""The convert pipeline: records -> shards + manifest, determinism, re-runs, failures, rejects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from aligndata.cli import app
from aligndata.write.convert import convert
from aligndata.errors import InputError, InvalidRecordError
from aligndata.write.shards import INCOMPLETE, ShardError, open_split, read_manifest, verify_shards
from paths import TESTS

runner = CliRunner()

SFT = [
    {"conversations": [{"from": "human", "value": "Hello! How can I help you today?"},
                       {"from": "gpt", "value": "Tell me a joke."}]},
    {"system": "You are a helpful assistant.",
     "conversations": [{"from": "human", "value": "What is the weather in Paris?"},
                       {"from": "gpt", "value": "It is sunny in Paris today."},
                       {"from": "human", "value": "Thanks, and in London?"},
                       {"from": "gpt", "value": "It is raining in London."}]},
]
PAIRS = [
    {"prompt": "What is two plus two?", "chosen": "Two plus two is four.", "rejected": "The answer is no."},
    {"prompt": "Tell me a joke.", "chosen": "Why did the chicken cross the road?", "rejected": "No."},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def sft_file(tmp_path):
    return write_jsonl(tmp_path / "chats.jsonl", SFT * 20)


@pytest.fixture
def pair_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 20)


def test_sft_shards_hold_ids_masks_and_a_complete_manifest(tmp_path, sft_file, tiny_tokenizer_dir, tiny_tokenizer):
    out = tmp_path / "out"
    result = convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir), max_length=256)
    m = read_manifest(out)
    assert result.manifest == m and not result.skipped
    assert m["task"] == "sft" and m["format_version"] == 1
    assert m["counts"] == {"read": 40, "kept": 40, "rejected": {}, "dropped": {}, "truncated": {}}
    assert m["sources"][0]["format"] == "sharegpt" and m["sources"][0]["records"] == 40
    assert m["tokenizer"]["eos_token_id"] == tiny_tokenizer.eos_token_id
    assert m["chat_template"]["source"] == "tokenizer"
    table = open_split(out, "train")
    assert table.num_rows == 40 == m["splits"]["train"]["rows"]
    row = table.slice(0, 1).to_pylist()[0]
    assert row["source"] == 0 and row["source_index"] == 1
    ids, mask = row["input_ids"], row["loss_mask"]
    assert len(ids) == len(mask)
    trained = tiny_tokenizer.decode([t for t, k in zip(ids, mask) if k])
    assert trained == "Tell me a joke.<|im_end|>"
    assert tiny_tokenizer.decode(ids) == tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": SFT[0]["conversations"][0]["value"]},
         {"role": "assistant", "content": SFT[0]["conversations"][1]["value"]}], tokenize=False)
    assert m["stats"]["train"]["trained_tokens"] == sum(sum(r) for r in table.column("loss_mask").to_pylist())
    assert m["splits"]["train"]["tokens"] == sum(len(r) for r in table.column("input_ids").to_pylist())
    verify_shards(out)
    assert not (out / INCOMPLETE).exists()


def test_dpo_shards_concatenate_to_the_full_conversation(tmp_path, pair_file, tiny_tokenizer_dir, tiny_tokenizer):
    out = tmp_path / "out"
    convert([str(pair_file)], out, "dpo", str(tiny_tokenizer_dir))
    row = open_split(out, "train").slice(0, 1).to_pylist()[0]
    full = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": PAIRS[0]["prompt"]}, {"role": "assistant", "content": PAIRS[0]["chosen"]}],
        tokenize=False)
    assert tiny_tokenizer.decode(row["prompt_ids"] + row["chosen_ids"]) + "\n" == full
    assert tiny_tokenizer.decode(row["chosen_ids"]) == "Two plus two is four.<|im_end|>"
    assert tiny_tokenizer.decode(row["rejected_ids"]) == "The answer is no.<|im_end|>"


def test_shards_are_byte_identical_for_any_num_proc(tmp_path, pair_file, tiny_tokenizer_dir):
    outs = []
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        convert([str(pair_file)], out, "dpo", str(tiny_tokenizer_dir), num_proc=n, eval_fraction=0.25, shard_rows=7)
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.arrow"))
    assert len(files) > 2
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*.arrow"))
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes()
    # the manifest too (with 2 processes a worker hashes the tokenizer while the main process converts)
    assert (outs[0] / "manifest.json").read_bytes() == (outs[1] / "manifest.json").read_bytes()
    # and a re-run with the other num_proc finds the output up to date
    assert convert([str(pair_file)], outs[0], "dpo", str(tiny_tokenizer_dir), num_proc=2, eval_fraction=0.25,
                   shard_rows=7).skipped


def test_eval_fraction_splits_by_record_and_counts_add_up(tmp_path, pair_file, tiny_tokenizer_dir):
    out = tmp_path / "out"
    m = convert([str(pair_file)], out, "dpo", str(tiny_tokenizer_dir), eval_fraction=0.3, seed=1).manifest
    train, ev = m["splits"]["train"]["rows"], m["splits"]["eval"]["rows"]
    assert train + ev == 40 and 0 < ev < 40
    idx = set(open_split(out, "eval").column("source_index").to_pylist())
    assert len(idx) == ev and not idx & set(open_split(out, "train").column("source_index").to_pylist())


def test_eval_file_becomes_the_eval_split(tmp_path, pair_file, tiny_tokenizer_dir):
    ev = write_jsonl(tmp_path / "ev.jsonl", PAIRS)
    m = convert([str(pair_file)], tmp_path / "out", "dpo", str(tiny_tokenizer_dir), eval_file=str(ev)).manifest
    assert m["splits"]["eval"]["rows"] == 2 and m["splits"]["train"]["rows"] == 40
    assert [s["role"] for s in m["sources"]] == ["train", "eval"]


def test_shards_load_with_datasets(tmp_path, sft_file, tiny_tokenizer_dir):
    out = tmp_path / "out"
    convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir))
    ds = datasets.load_from_disk(str(out / "train"))
    assert ds.num_rows == 40 and ds.column_names == ["input_ids", "loss_mask", "source", "source_index"]
    one = datasets.Dataset.from_file(str(out / "train" / "shard-00000.arrow"))
    assert one[1]["input_ids"] == ds[1]["input_ids"]


def test_rerun_with_same_settings_does_nothing(tmp_path, sft_file, tiny_tokenizer_dir):
    out = tmp_path / "out"
    convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir))
    assert again.skipped
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_other_settings_refuse_to_overwrite_unless_asked(tmp_path, sft_file, tiny_tokenizer_dir):
    out = tmp_path / "out"
    convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir))
    with pytest.raises(InputError, match=r"other settings \(max_length: None -> 64\); pass --overwrite"):
        convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir), max_length=64)
    m = convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir), max_length=64, overwrite=True).manifest
    assert m["settings"]["max_length"] == 64


def test_an_output_of_older_encoding_rules_is_not_taken_as_current(tmp_path, sft_file, tiny_tokenizer_dir,
                                                                   monkeypatch):
    """A release that changes which records are kept raises ENCODING_RULES: the output of the rules before
    is not reused as if it were current, and the summary says why."""
    from aligndata.options import ENCODING_RULES

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr("aligndata.options.ENCODING_RULES", ENCODING_RULES - 1)
        assert convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir)).manifest["settings"]["encoding_rules"] \
            == ENCODING_RULES - 1
    with pytest.raises(InputError, match=rf"other settings \(encoding_rules: {ENCODING_RULES - 1} -> {ENCODING_RULES}\)"):
        convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir))


def test_changed_input_file_is_not_taken_as_already_converted(tmp_path, sft_file, tiny_tokenizer_dir):
    out = tmp_path / "out"
    convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir))
    write_jsonl(sft_file, SFT * 3)
    with pytest.raises(InputError, match=r"other settings \(sources\)"):
        convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir))


def test_a_corrupted_shard_is_rebuilt_on_rerun(tmp_path, sft_file, tiny_tokenizer_dir):
    out = tmp_path / "out"
    convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir))
    shard = out / "train" / "shard-00000.arrow"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10])
    with pytest.raises(ShardError, match="checksum mismatch"):
        verify_shards(out)
    assert not convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir)).skipped
    assert shard.read_bytes() == good


def test_length_policy_drop_counts_every_dropped_record(tmp_path, sft_file, tiny_tokenizer_dir):
    out = tmp_path / "out"
    m = convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir), max_length=40).manifest
    c = m["counts"]
    assert c["dropped"] == {"too-long": 20} and c["kept"] == 20
    assert c["read"] == c["kept"] + sum(c["rejected"].values()) + sum(c["dropped"].values())
    assert max(len(r) for r in open_split(out, "train").column("input_ids").to_pylist()) <= 40


def test_invalid_record_fails_and_leaves_previous_output(tmp_path, sft_file, tiny_tokenizer_dir):
    out = tmp_path / "out"
    convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir))
    before = (out / "manifest.json").read_text()
    bad = write_jsonl(tmp_path / "bad.jsonl", SFT + [{"conversations": [{"from": "human", "value": "hi"}]}])
    with pytest.raises(InvalidRecordError) as e:
        convert([str(bad)], out, "sft", str(tiny_tokenizer_dir), overwrite=True)
    assert str(e.value.problems[0]) == f"{bad}:3 (record 3) $.conversations[0]: conversation has no assistant turn to train on"
    assert (out / "manifest.json").read_text() == before
    assert not (tmp_path / ".out.partial").exists()  # a failed run's staging directory goes with it
    m = convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir), max_length=99, overwrite=True).manifest
    assert m["counts"]["kept"] == 40 and not (tmp_path / ".out.partial").exists()


def test_skip_mode_writes_rejects_and_counts_add_up(tmp_path, tiny_tokenizer_dir):
    records = SFT + [{"conversations": [{"from": "bot", "value": "x"}]}, "not an object"] + SFT
    src = write_jsonl(tmp_path / "mixed.jsonl", records)
    (tmp_path / "mixed.jsonl").write_text(src.read_text() + "{broken json\n")
    out = tmp_path / "out"
    result = convert([str(src)], out, "sft", str(tiny_tokenizer_dir), on_error="skip")
    c = result.manifest["counts"]
    assert c["read"] == 7 and c["kept"] == 4
    assert c["rejected"] == {"schema": 2, "json": 1}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["record"]) for r in rejects] == [(3, 3), (4, 4), (7, 7)]
    assert rejects[0]["reasons"][0]["message"] == (
        "'bot' is not one of ['human', 'user', 'gpt', 'assistant', 'system', 'function_call', 'observation', 'tool']")
    assert rejects[0]["value"] == records[2]
    assert rejects[2]["text"] == "{broken json"


def test_records_whose_tool_calls_the_template_drops_are_rejected_and_counted(tmp_path, tiny_tokenizer_dir):
    call = {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})}
    with_call = {"conversations": [{"from": "human", "value": "What is the weather in Paris?"}, call,
                                   {"from": "observation", "value": '{"temperature": 21}'},
                                   {"from": "gpt", "value": "It is sunny in Paris today."}]}
    src = write_jsonl(tmp_path / "calls.jsonl", [SFT[0], with_call, SFT[1]])
    out = tmp_path / "out"

    # The tiny tokenizer's own ChatML template renders message contents only.
    r = runner.invoke(app, ["convert", str(src), "--to", "sft", "-t", str(tiny_tokenizer_dir), "--out", str(out),
                            "--on-error", "skip"])

    assert r.exit_code == 0, r.output
    assert "rejected: template-drops-content" in r.output
    assert "read 3 = kept 2 + rejected 1 + dropped 0" in r.output
    assert read_manifest(out)["counts"]["rejected"] == {"template-drops-content": 1}
    [reject] = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert (reject["line"], reject["record"]) == (2, 2)
    assert reject["reasons"][0]["message"].startswith(
        "message 1 (assistant): the chat template leaves its tool call 0 (get_weather) out of the rendered text")


def test_preference_file_cannot_become_sft(tmp_path, pair_file, tiny_tokenizer_dir):
    with pytest.raises(InputError, match=r"holds preference pairs \(text-preference\); --to sft needs conversations"):
        convert([str(pair_file)], tmp_path / "out", "sft", str(tiny_tokenizer_dir))


def test_mixed_format_file_is_reported_not_guessed(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "m.jsonl", SFT + [{"messages": [{"role": "user", "content": "a"},
                                                                 {"role": "assistant", "content": "b"}]}])
    with pytest.raises(InvalidRecordError, match="records match different formats: sharegpt"):
        convert([str(src)], tmp_path / "out", "sft", str(tiny_tokenizer_dir))


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_record_of_another_format_deep_in_the_file_refuses_it_whole(tmp_path, tiny_tokenizer_dir, num_proc):
    # The format comes from the first record; the conversion checks every record's shape against it, and
    # a different one (here record 201, in a later chunk) stops it with the error that names both formats,
    # in skip mode too, leaving the earlier output as it was.
    other = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    src = write_jsonl(tmp_path / "m.jsonl", SFT * 100 + [other] + SFT)
    out = tmp_path / "out"
    good = convert([str(write_jsonl(tmp_path / "good.jsonl", SFT))], out, "sft", str(tiny_tokenizer_dir))
    with pytest.raises(InvalidRecordError) as e:
        convert([str(src)], out, "sft", str(tiny_tokenizer_dir), num_proc=num_proc, on_error="skip", overwrite=True)
    assert str(e.value.problems[0]) == (
        f"{src}:201 $: records match different formats: sharegpt (202 records, first: record 1 at line 1), "
        "openai (1 record, first: record 201 at line 201); split the file by format or pass --format")
    assert read_manifest(out) == good.manifest
    # given the format, the odd record is one more reject
    m = convert([str(src)], out, "sft", str(tiny_tokenizer_dir), num_proc=num_proc, on_error="skip",
                input_format="sharegpt", overwrite=True).manifest
    assert m["counts"]["read"] == 203 and m["counts"]["kept"] == 202 and sum(m["counts"]["rejected"].values()) == 1


def test_a_mixed_file_starting_with_the_other_task_is_reported_as_mixed(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] + SFT * 3)
    with pytest.raises(InvalidRecordError, match="records match different formats: sharegpt"):
        convert([str(src)], tmp_path / "out", "sft", str(tiny_tokenizer_dir))
    # a file of the other task alone keeps its own message
    with pytest.raises(InputError, match="holds preference pairs"):
        convert([str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}]))],
                tmp_path / "out", "sft", str(tiny_tokenizer_dir))


def test_foreign_directory_is_never_overwritten(tmp_path, sft_file, tiny_tokenizer_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty and was not written by aligndata"):
        convert([str(sft_file)], out, "sft", str(tiny_tokenizer_dir), overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("kwargs, message", [
    ({"length_policy": "cut"}, "--length-policy 'cut': choose drop or truncate"),
    ({"eval_fraction": 1.5}, "--eval-fraction 1.5: must be at least 0 and below 1"),
    ({"train_on": "first"}, "--train-on 'first': choose all or last"),
    ({"max_prompt_length": 10}, "--max-prompt-length applies to --to dpo only"),
    ({"max_prompt_length": 0, "max_length": 64}, "--max-prompt-length 0: must be at least 1"),  # was a traceback
    ({"length_policy": "truncate"}, "--length-policy truncate needs --max-length"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, sft_file, tiny_tokenizer_dir, kwargs, message):
    with pytest.raises(InputError) as e:
        convert([str(sft_file)], tmp_path / "out", "sft", str(tiny_tokenizer_dir), **kwargs)
    assert str(e.value) == message
    assert not (tmp_path / "out").exists()


def test_cli_convert_exit_codes_and_summary(tmp_path, sft_file, tiny_tokenizer_dir):
    out = tmp_path / "out"
    ok = runner.invoke(app, ["convert", str(sft_file), "--to", "sft", "-t", str(tiny_tokenizer_dir), "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "read 40 = kept 40 + rejected 0 + dropped 0" in ok.output
    missing_tok = runner.invoke(app, ["convert", str(sft_file), "--to", "sft", "--out", str(out)])
    assert missing_tok.exit_code == 2
    assert "--to sft needs --tokenizer" in missing_tok.output
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "x"}]}])
    r = runner.invoke(app, ["convert", str(bad), "--to", "sft", "-t", str(tiny_tokenizer_dir), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 1
    assert "conversation has no assistant turn to train on" in r.output


@pytest.mark.slow
def test_killed_conversion_leaves_no_manifest_and_rerun_completes(tmp_path, tiny_tokenizer_dir):
    big = write_jsonl(tmp_path / "big.jsonl", SFT * 8000)
    out = tmp_path / "out"
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r});"
            "from aligndata.write.convert import convert;"
            f"convert([{str(big)!r}], __import__('pathlib').Path({str(out)!r}), 'sft', {str(tiny_tokenizer_dir)!r}, shard_rows=500)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    staging = tmp_path / ".out.partial"
    for _ in range(600):
        if list(staging.glob("train/*.arrow")) or proc.poll() is not None:
            break
        import time
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    with pytest.raises(ShardError):
        read_manifest(out)
    m = convert([str(big)], out, "sft", str(tiny_tokenizer_dir), shard_rows=500).manifest
    assert m["counts"]["kept"] == 16000
    verify_shards(out)
    assert pa.ipc.open_stream(pa.memory_map(str(out / "train" / "shard-00000.arrow"))).read_all().num_rows == 500


def test_normalize_refuses_bad_options_before_opening_any_output(tmp_path, sft_file):
    from aligndata.write.jsonl import normalize

    with pytest.raises(InputError, match=r"--on-error 'ignore': choose fail or skip"):
        normalize([str(sft_file)], str(tmp_path / "o.jsonl"), "openai", on_error="ignore", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats.jsonl"]


# -- JSON Lines parsed in the workers ------------------------------------------------------------

BAD_LINES = [
    b'{"prompt": "a", "chosen": "b", "rejected": "c", "x": NaN}',  # NaN literal
    b'{"prompt": "a\xff", "chosen": "b", "rejected": "c"}',  # invalid UTF-8
    b"",  # blank lines do not count as records
    b'{"prompt": "a", "chosen": "b", "rejected": "c", "x": [1, -Infinity, 1e400]}',
    b'{"prompt": "a", "chosen": ',  # broken JSON
    b"[" * 3000 + b"]" * 3000,  # nested too deeply
]


def _lines_with_bad_records(tmp_path: Path) -> tuple[Path, list[int]]:
    """Good pairs with the bad lines above spread over several chunks; returns the path and the bad line numbers."""
    lines, bad_at = [], []
    for i in range(60):
        if i % 9 == 4:
            bad = BAD_LINES[(i // 9) % len(BAD_LINES)]
            lines.append(bad)
            if bad:
                bad_at.append(len(lines))
        lines.append(json.dumps(PAIRS[i % 2]).encode())
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, bad_at


@pytest.mark.parametrize("chunk, chunk_bytes", [(1, 1 << 18), (4, 1 << 18), (256, 1 << 18), (256, 300)])
def test_worker_side_parsing_gives_the_same_rejects_and_shards_for_any_num_proc(tmp_path, tiny_tokenizer_dir,
                                                                                monkeypatch, chunk, chunk_bytes):
    import aligndata.write.convert as convert_module

    monkeypatch.setattr(convert_module, "CHUNK", chunk)
    monkeypatch.setattr(convert_module, "CHUNK_BYTES", chunk_bytes)
    path, bad_at = _lines_with_bad_records(tmp_path)
    outs = []
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        m = convert([str(path)], out, "dpo", str(tiny_tokenizer_dir), num_proc=n, on_error="skip",
                    input_format="text-preference", eval_fraction=0.3, shard_rows=5).manifest
        assert m["counts"]["read"] == 60 + len(bad_at) and m["counts"]["kept"] == 60
        assert m["counts"]["rejected"] == {"json": len(bad_at)}
        outs.append(out)
    rejects = [json.loads(line) for line in (outs[0] / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == bad_at
    assert [r["record"] for r in rejects] == [line - _blanks_before(path, line) for line in bad_at]
    messages = [r["reasons"][0]["message"] for r in rejects]
    assert messages[0] == "NaN and Infinity are not valid JSON"
    assert messages[1] == "invalid UTF-8 at byte 14 of the line"
    assert [x["path"] for x in rejects[2]["reasons"]] == ["$.x[1]", "$.x[2]"]
    assert messages[3].startswith("invalid JSON: Expecting value") and messages[4] == "invalid JSON: nested too deeply"
    assert (outs[0] / "rejects.jsonl").read_bytes() == (outs[1] / "rejects.jsonl").read_bytes()
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.arrow"))
    assert len(files) > 4 and files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*.arrow"))
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes()
    assert read_manifest(outs[0])["stats"] == read_manifest(outs[1])["stats"]


def test_line_chunks_end_at_the_line_count_or_the_byte_limit():
    from aligndata.write.convert import _line_chunks

    lines = [(i + 1, 2 * i + 1, b"x" * n) for i, n in enumerate([10, 10, 500, 10, 10, 10, 10, 10])]
    chunks = list(_line_chunks(iter(lines), 3, 100))
    assert [(first, linenos, [len(x) for x in chunk]) for first, linenos, chunk in chunks] == [
        (1, [1, 3, 5], [10, 10, 500]), (4, [7, 9, 11], [10, 10, 10]), (7, [13, 15], [10, 10])]
    assert [len(c[2]) for c in _line_chunks(iter(lines), 64, 1 << 20)] == [8]


def _blanks_before(path: Path, line: int) -> int:
    return sum(1 for text in path.read_bytes().split(b"\n")[:line - 1] if not text.strip())


@pytest.mark.parametrize("num_proc", [1, 2])
def test_fail_mode_names_the_line_of_a_bad_record_parsed_in_a_worker(tmp_path, tiny_tokenizer_dir, monkeypatch,
                                                                     num_proc):
    import aligndata.write.convert as convert_module

    monkeypatch.setattr(convert_module, "CHUNK", 4)
    lines = [json.dumps(PAIRS[0])] * 9 + ["", '{"prompt": "a", "chosen": "b", "rejected": "c", "x": NaN}']
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines + [json.dumps(PAIRS[1])] * 9) + "\n")
    with pytest.raises(InvalidRecordError) as e:
        convert([str(path)], tmp_path / "out", "dpo", str(tiny_tokenizer_dir), num_proc=num_proc)
    assert str(e.value) == f"{path}:11 (record 10) $.x: NaN and Infinity are not valid JSON"


@pytest.mark.parametrize("num_proc", [1, 2])
def test_first_line_not_json_is_an_input_error_when_parsed_in_a_worker(tmp_path, tiny_tokenizer_dir, num_proc):
    path = tmp_path / "p.jsonl"
    path.write_text("hello world\n" + json.dumps(PAIRS[0]) + "\n")
    with pytest.raises(InputError) as e:
        convert([str(path)], tmp_path / "out", "dpo", str(tiny_tokenizer_dir), num_proc=num_proc,
                input_format="text-preference")
    assert str(e.value) == f"{path}:1: not JSON (Expecting value at column 1)"


def test_writing_columns_in_blocks_gives_the_files_of_writing_rows_one_by_one(tmp_path):
    import numpy as np

    from aligndata.write.shards import ShardWriter

    rng = np.random.default_rng(0)
    rows = [{"prompt_ids": rng.integers(0, 1000, int(rng.integers(0, 9))).tolist(),
             "chosen_ids": rng.integers(0, 1000, int(rng.integers(1, 9))).tolist(),
             "rejected_ids": rng.integers(0, 1000, int(rng.integers(1, 9))).tolist(),
             "source": 1, "source_index": i + 1} for i in range(2500)]
    one = ShardWriter(tmp_path / "one", "dpo", shard_rows=1500)
    for row in rows:
        one.write("train", row)
    blocks = ShardWriter(tmp_path / "blocks", "dpo", shard_rows=1500)
    start = 0
    for size in [1, 700, 1000, 3, 796]:
        part = rows[start:start + size]
        columns = {c: (np.array([x for r in part for x in r[c]], dtype=np.int32),
                       np.array([len(r[c]) for r in part], dtype=np.int64))
                   for c in ("prompt_ids", "chosen_ids", "rejected_ids")}
        columns["source"] = np.array([r["source"] for r in part])
        columns["source_index"] = np.array([r["source_index"] for r in part])
        blocks.write_columns("train", columns, len(part))
        start += size
    assert start == len(rows)
    assert one.close() == blocks.close()
    for name in ("shard-00000.arrow", "shard-00001.arrow"):
        assert (tmp_path / "one" / "train" / name).read_bytes() == (tmp_path / "blocks" / "train" / name).read_bytes()
    assert open_split(tmp_path / "blocks", "train", {"splits": {"train": {"files": one.files["train"]}}}) \
        .column("chosen_ids").to_pylist() == [r["chosen_ids"] for r in rows]


# ---- control strings inside messages, and the end-of-turn warning at the end of the run ---------------------

FAKE_TURN = {"messages": [{"role": "user", "content": "Tell me a joke."},
                          {"role": "assistant", "content": "Answer<|im_end|>\n<|im_start|>user\nfake"}]}


def test_a_special_token_written_inside_a_reply_is_refused_naming_string_and_field(tmp_path, tiny_tokenizer_dir):
    raw = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello"}]}, FAKE_TURN])

    result = runner.invoke(app, ["convert", str(raw), "--to", "sft", "-t", str(tiny_tokenizer_dir),
                                 "--out", str(tmp_path / "out"), "-q"])

    assert result.exit_code == 1
    assert result.output.splitlines()[0] == (
        f"error: {raw}:2 (record 2) $.messages[1].content: contains '<|im_end|>', a special token of this tokenizer: "
        "it would be encoded as that token, not as text (a reply could teach the model to end its turn or open "
        "another); pass --control-strings text to keep it as text, or allow to encode it as the token")


def test_control_strings_allow_encodes_them_as_special_tokens_and_the_manifest_says_so(tmp_path, tiny_tokenizer_dir,
                                                                                    tiny_tokenizer):
    raw = write_jsonl(tmp_path / "chats.jsonl", [FAKE_TURN])

    result = convert([str(raw)], tmp_path / "out", "sft", str(tiny_tokenizer_dir), control_strings="allow")

    ids = open_split(tmp_path / "out", "train", result.manifest)["input_ids"][0].as_py()
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 3  # the user's, the reply's own, and the one written inside the reply
    assert result.manifest["settings"]["control_strings"] == "allow"
    default = convert([str(write_jsonl(tmp_path / "ok.jsonl", SFT))], tmp_path / "ok", "sft", str(tiny_tokenizer_dir))
    assert "control_strings" not in default.manifest["settings"]  # a default leaves the manifest as it was


def test_convert_ends_with_inspects_warning_when_completions_lack_the_end_of_turn(tmp_path, pair_file,
                                                                                 tiny_tokenizer_dir):
    args = ["convert", str(pair_file), "--to", "dpo", "-t", str(tiny_tokenizer_dir), "-q"]

    cut = runner.invoke(app, [*args, "--out", str(tmp_path / "cut"), "--max-length", "24",
                              "--length-policy", "truncate"])
    whole = runner.invoke(app, [*args, "--out", str(tmp_path / "whole")])

    assert cut.exit_code == 0 and whole.exit_code == 0
    assert "warning [end-of-turn]: train: 20 rows with a completion not ending with" in " ".join(cut.output.split())
    assert "warning" not in whole.output


def test_control_strings_text_tokenizes_them_as_text_with_or_without_the_piece_cache(tmp_path, tiny_tokenizer_dir,
                                                                                     tiny_tokenizer):
    raw = write_jsonl(tmp_path / "chats.jsonl", [FAKE_TURN])

    rows = []
    for fast in (True, False):
        result = convert([str(raw)], tmp_path / f"out{fast}", "sft", str(tiny_tokenizer_dir), control_strings="text",
                         fast_tokenize=fast)
        table = open_split(tmp_path / f"out{fast}", "train", result.manifest)
        rows.append((table["input_ids"][0].as_py(), table["loss_mask"][0].as_py()))

    ids, mask = rows[0]
    assert rows[1] == rows[0]
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 2  # the user's and the reply's own: the one inside the reply is text
    assert tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "Answer<|im_end|>\n<|im_start|>user\nfake<|im_end|>"
    assert result.manifest["settings"]["control_strings"] == "text"
