"""`aligndata inspect`: shard statistics, token-by-token display, and the lint of raw and converted data.

The shards are built in each test with the tiny tokenizer; the expected numbers are worked out by
hand below from the row lengths that tokenizer gives (SFT record A: 28 tokens of which the last 8
follow the prompt and 7 are trained; record B: 65 tokens, prompt 30, 17 trained; DPO pair P: prompt
16, chosen 8, rejected 7; pair Q: prompt 16, chosen 14, rejected 4).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from aligndata.cli import app
from aligndata.write.convert import convert
from aligndata.report.lint import has_empty_system, lint_file, similarity
from aligndata.report.render import MASKED_STYLES, TRAINED_STYLES, pieces_text, render_record
from aligndata.report.shard_checks import row_hashes
from aligndata.report.shard_stats import inspect_shards
from aligndata.report.stats import nice_histogram, pack_count, padded_share, percentiles
from aligndata.report.token_view import pick_rows, show_records

runner = CliRunner()

A = {"conversations": [{"from": "human", "value": "Hello! How can I help you today?"},
                       {"from": "gpt", "value": "Tell me a joke."}]}
B = {"system": "You are a helpful assistant.",
     "conversations": [{"from": "human", "value": "What is the weather in Paris?"},
                       {"from": "gpt", "value": "It is sunny in Paris today."},
                       {"from": "human", "value": "Thanks, and in London?"},
                       {"from": "gpt", "value": "It is raining in London."}]}
P = {"prompt": "What is two plus two?", "chosen": "Two plus two is four.", "rejected": "The answer is no."}
Q = {"prompt": "Tell me a joke.", "chosen": "Why did the chicken cross the road?", "rejected": "No."}
TRAINED_BG = {TRAINED_STYLES[0].split(" on ")[1], TRAINED_STYLES[1].split(" on ")[1]}
MASKED_BG = {MASKED_STYLES[0].split(" on ")[1], MASKED_STYLES[1].split(" on ")[1]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def sft_shards(tmp_path, tiny_tokenizer_dir):
    raw = write_jsonl(tmp_path / "chats.jsonl", [A, A, B, A, B])
    out = tmp_path / "sft"
    convert([str(raw)], out, "sft", str(tiny_tokenizer_dir), max_length=128)
    return out


@pytest.fixture
def dpo_shards(tmp_path, tiny_tokenizer_dir):
    raw = write_jsonl(tmp_path / "pairs.jsonl", [P, Q, P])
    out = tmp_path / "dpo"
    convert([str(raw)], out, "dpo", str(tiny_tokenizer_dir))
    return out


# -- numbers ----------------------------------------------------------------------------------------

def test_percentiles_are_nearest_rank_like_the_manifest():
    assert percentiles(range(1, 101)) == {"p50": 51, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([28, 28, 65, 28, 65]) == {"p50": 28, "p90": 65, "p99": 65, "max": 65}
    assert percentiles([]) == {"p50": 0, "p90": 0, "p99": 0, "max": 0}


def test_padded_share_pads_every_batch_to_its_longest_row():
    # batches [2, 4] -> 8, [4, 4] -> 8, [1] -> 1: 17 slots for 15 tokens
    assert padded_share(np.array([2, 4, 4, 4, 1]), 2, 15) == pytest.approx(2 / 17)
    # two sequences per row (DPO): every slot counts twice
    assert padded_share(np.array([3, 5]), 2, 14, sequences_per_row=2) == pytest.approx(6 / 20)
    assert padded_share(np.array([5, 5, 5]), 8, 15) == 0.0


def _best_fit_decreasing(lengths: list[int], capacity: int) -> int:
    rooms: list[int] = []
    for x in sorted(lengths, reverse=True):
        fits = [i for i, r in enumerate(rooms) if r >= x]
        if fits:
            best = min(fits, key=lambda i: rooms[i])
            rooms[best] -= x
        else:
            rooms.append(capacity - x)
    return len(rooms)


def test_pack_count_is_best_fit_decreasing():
    assert pack_count(np.array([6, 5, 4, 3, 2]), 10) == 2
    assert pack_count(np.array([7, 7, 7]), 10) == 3
    assert pack_count(np.array([65, 65, 28, 28, 28]), 128) == 2
    assert pack_count(np.array([], dtype=np.int64), 10) == 0
    rng = random.Random(0)
    for _ in range(300):
        cap = rng.randint(1, 30)
        lengths = [rng.randint(1, cap) for _ in range(rng.randint(0, 25))]
        assert pack_count(np.array(lengths, dtype=np.int64), cap) == _best_fit_decreasing(lengths, cap)


def test_nice_histogram_uses_round_bins():
    h = nice_histogram(np.array([3, 12, 17, 45]), bins=5)
    assert h == {"lo": [0, 10, 20, 30, 40], "hi": [9, 19, 29, 39, 49], "counts": [1, 2, 0, 0, 1]}


def test_row_hashes_are_equal_exactly_for_equal_rows():
    values = np.array([5, 6, 5, 6, 6, 5, 0, 0], dtype=np.int32)
    offsets = np.array([0, 2, 4, 6, 6, 7, 8])  # [5,6] [5,6] [6,5] [] [0] [0]
    h = row_hashes(values, offsets)
    assert h[0] == h[1] and h[4] == h[5]
    assert len({h[0], h[2], h[3], h[4]}) == 4


# -- shard statistics -------------------------------------------------------------------------------

def test_sft_stats_are_exact(sft_shards):
    report = inspect_shards(sft_shards, batch_size=2)
    s = report.splits["train"]
    assert (s.rows, s.tokens, s.trained_tokens) == (5, 214, 55)
    assert s.trained_share == pytest.approx(55 / 214)
    assert s.lengths_from == "manifest"
    assert s.lengths == {"prompt": {"p50": 20, "p90": 30, "p99": 30, "max": 30},
                         "completion": {"p50": 8, "p90": 35, "p99": 35, "max": 35},
                         "total": {"p50": 28, "p90": 65, "p99": 65, "max": 65}}
    # batches [28, 28] [65, 28] [65] -> 56 + 130 + 65 = 251 slots for 214 tokens;
    # packed into 128: {65, 28, 28} {65, 28} -> 2 sequences, 256 slots
    assert s.padding == {"batch_size": 2, "sequences_per_row": 1, "padded_batches_share": 37 / 251,
                         "pack_length": 128, "pack_length_from": "max_length", "packed_share": 42 / 256,
                         "packed_sequences": 2}
    assert s.histogram == {"lo": [25, 30, 35, 40, 45, 50, 55, 60, 65], "hi": [29, 34, 39, 44, 49, 54, 59, 64, 69],
                           "counts": [3, 0, 0, 0, 0, 0, 0, 0, 2]}
    assert report.end_of_turn.tokens == ["<|endoftext|>", "<|im_end|>"]
    assert s.checks["end_of_turn"] == {"spans": 7, "spans_without": 0, "rows_without": 0, "rows_untrained": 0,
                                       "examples": []}
    assert report.warnings == []


def test_percentiles_come_from_the_shards_when_the_manifest_has_none(sft_shards):
    path = sft_shards / "manifest.json"
    manifest = json.loads(path.read_text())
    expected = manifest["stats"]["train"]["lengths"]
    del manifest["stats"]
    path.write_text(json.dumps(manifest))
    s = inspect_shards(sft_shards).splits["train"]
    assert s.lengths_from == "shards" and s.lengths == expected
    assert s.values["total"].tolist() == [28, 28, 65, 28, 65]


def test_dpo_stats_padding_and_pair_checks(dpo_shards):
    report = inspect_shards(dpo_shards, batch_size=2)
    s = report.splits["train"]
    assert (s.rows, s.tokens, s.trained_tokens) == (3, 144, 48)
    assert s.lengths["chosen"] == {"p50": 8, "p90": 14, "p99": 14, "max": 14}
    assert s.lengths["total"] == {"p50": 24, "p90": 30, "p99": 30, "max": 30}
    # rows are 2 sequences padded to prompt + the longer completion: [24, 30] -> 4 x 30, [24] -> 2 x 24;
    # packed: 30, 24, 24, 23, 23, 20 into 30 tokens -> 6 sequences
    assert s.padding["padded_batches_share"] == pytest.approx(24 / 168)
    assert (s.padding["pack_length"], s.padding["pack_length_from"]) == (30, "longest sequence")
    assert (s.padding["packed_share"], s.padding["packed_sequences"]) == (36 / 180, 6)
    dup = s.checks["duplicate_prompts"]
    assert (dup["prompts"], dup["repeat_rows"]) == (1, 1)
    assert [x["row"] for x in dup["top"][0]["examples"]] == [0, 2]
    assert dup["top"][0]["examples"][0]["record"] == 1
    assert s.checks["length_bias_tokens"]["share_chosen_longer"] == 1.0
    assert s.checks["identical"]["rows"] == 0
    assert [w.kind for w in report.warnings] == ["duplicate-prompt", "length-bias"]


def test_eval_split_gets_its_own_numbers(tmp_path, tiny_tokenizer_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [P, Q, P])
    ev = write_jsonl(tmp_path / "eval.jsonl", [Q])
    convert([str(train)], tmp_path / "out", "dpo", str(tiny_tokenizer_dir), eval_file=str(ev))
    report = inspect_shards(tmp_path / "out")
    assert list(report.splits) == ["train", "eval"]
    assert report.splits["eval"].rows == 1 and report.splits["eval"].lengths["chosen"]["max"] == 14


def test_truncated_completions_are_reported_without_end_of_turn(tmp_path, tiny_tokenizer_dir):
    raw = write_jsonl(tmp_path / "pairs.jsonl", [P, Q])
    convert([str(raw)], tmp_path / "dpo", "dpo", str(tiny_tokenizer_dir), max_length=24, length_policy="truncate")
    report = inspect_shards(tmp_path / "dpo")
    e = report.splits["train"].checks["end_of_turn"]
    assert (e["chosen_without"], e["rejected_without"], e["rows_without"]) == (1, 0, 1)
    assert e["examples"] == [{"row": 1, "source": str(raw), "record": 2}]
    assert report.warnings[0].kind == "end-of-turn"
    assert "1 row with a completion not ending with <|endoftext|> or <|im_end|>" in report.warnings[0].message
    assert "; 1 completion cut by --length-policy truncate" in report.warnings[0].message

    sft = write_jsonl(tmp_path / "chats.jsonl", [A])
    convert([str(sft)], tmp_path / "sft", "sft", str(tiny_tokenizer_dir), max_length=24, length_policy="truncate")
    e = inspect_shards(tmp_path / "sft").splits["train"].checks["end_of_turn"]
    assert (e["spans"], e["spans_without"], e["rows_without"]) == (1, 1, 1)


def test_a_template_without_end_of_turn_token_is_flagged(tmp_path, tiny_tokenizer_dir):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '\\n\\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}")
    raw = write_jsonl(tmp_path / "pairs.jsonl", [P, Q])
    convert([str(raw)], tmp_path / "dpo", "dpo", str(tiny_tokenizer_dir), chat_template=str(template))
    report = inspect_shards(tmp_path / "dpo")
    assert report.end_of_turn.ids == [0] and report.end_of_turn.how == "the eos token in the manifest"
    assert any("'file:plain.jinja' is not available here" in n for n in report.notes)
    e = report.splits["train"].checks["end_of_turn"]
    assert (e["chosen_without"], e["rejected_without"], e["rows_without"]) == (2, 2, 2)


def test_an_unloadable_tokenizer_is_a_note_not_a_failure(sft_shards):
    path = sft_shards / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tokenizer"]["name_or_path"] = str(sft_shards / "gone")
    path.write_text(json.dumps(manifest))
    report = inspect_shards(sft_shards)
    assert report.tokenizer is None and "pass --tokenizer" in report.notes[0]
    assert report.end_of_turn.ids == [0]
    assert report.splits["train"].rows == 5


# -- records, token by token ------------------------------------------------------------------------

def _segments(renderable, width: int = 200) -> list:
    console = Console(record=True, width=width, color_system="truecolor", force_terminal=True)
    return list(console.render(renderable))


def _by_background(segments: list, backgrounds: set[str]) -> str:
    return "".join(s.text for s in segments
                   if s.style is not None and s.style.bgcolor is not None and s.style.bgcolor.name in backgrounds)


def test_show_colours_trained_and_masked_tokens_apart(sft_shards):
    report = inspect_shards(sft_shards)
    [rec] = show_records(report, [0])
    segments = _segments(pieces_text(rec.parts["tokens"]))
    assert _by_background(segments, TRAINED_BG) == "Tell me a joke.<|im_end|>"
    # the last masked token is the newline after the trained <|im_end|>
    assert _by_background(segments, MASKED_BG) == (
        "<|im_start|>user↵Hello! How can I help you today?<|im_end|>↵<|im_start|>assistant↵↵")
    # token boundaries: neighbouring tokens of one kind alternate their shade
    styled = [s for s in segments if s.style is not None and s.style.bgcolor is not None and s.text != "\n"]
    assert all(a.style.bgcolor != b.style.bgcolor for a, b in zip(styled, styled[1:]))
    special = [s.text for s in styled if s.style.bold]
    assert special == ["<|im_start|>", "<|im_end|>", "<|im_start|>", "<|im_end|>"]


def test_plain_text_brackets_trained_tokens_and_shows_newlines(sft_shards):
    report = inspect_shards(sft_shards)
    [rec] = show_records(report, [0])
    console = Console(record=True, width=100, color_system=None)
    console.print(pieces_text(rec.parts["tokens"], marks=True))
    assert console.export_text() == ("<|im_start|>user↵\nHello! How can I help you today?<|im_end|>↵\n"
                                     "<|im_start|>assistant↵\n⟦Tell me a joke.<|im_end|>⟧↵\n")


def test_ids_follow_each_token(sft_shards, tiny_tokenizer):
    report = inspect_shards(sft_shards)
    [rec] = show_records(report, [0])
    text = pieces_text(rec.parts["tokens"], ids=True).plain
    im_start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    user = tiny_tokenizer("user")["input_ids"]  # two tokens in the tiny vocabulary: "us" "er"
    assert text.startswith(f"<|im_start|>|{im_start}us|{user[0]}er|{user[1]}↵|")
    assert f"<|im_end|>|{tiny_tokenizer.convert_tokens_to_ids('<|im_end|>')}" in text
    assert sum(len(p.ids) for p in rec.parts["tokens"]) == 28


def test_dpo_shows_chosen_and_rejected_side_by_side(dpo_shards):
    report = inspect_shards(dpo_shards)
    [rec] = show_records(report, [1])
    console = Console(record=True, width=120, color_system=None)
    console.print(render_record(rec, marks=True))
    lines = console.export_text().splitlines()
    assert lines[0] == f"train row 1 · {dpo_shards.parent / 'pairs.jsonl'} record 2"
    assert any("prompt · 16 tokens (masked)" in line for line in lines)
    header = next(line for line in lines if "chosen · 14 tokens (trained)" in line)
    assert "rejected · 4 tokens (trained)" in header
    row = next(line for line in lines if "⟦Why did the chicken" in line)
    assert "⟦No.<|im_end|>⟧" in row
    segments = _segments(render_record(rec))
    assert _by_background(segments, TRAINED_BG) == "Why did the chicken cross the road?<|im_end|>No.<|im_end|>"


def test_pick_rows_consecutive_random_and_out_of_range():
    assert pick_rows(10, 3) == [0, 1, 2]
    assert pick_rows(10, 3, index=8) == [8, 9]
    chosen = pick_rows(10, 4, random=True, seed=3)
    assert chosen == pick_rows(10, 4, random=True, seed=3) and len(set(chosen)) == 4
    with pytest.raises(Exception, match=r"--index 10: the train split has 10 rows \(0 to 9\)"):
        pick_rows(10, 1, index=10)


# -- lint of raw files --------------------------------------------------------------------------------

def test_lint_finds_pair_problems(tmp_path):
    long_a = "The quick brown fox jumps over the lazy dog. " * 40
    records = [
        {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Four."},  # identical
        {"prompt": "Name a colour.", "chosen": "The colour is blue.", "rejected": "The colour is blue!"},  # near
        {"prompt": "What  is two plus two?", "chosen": "It is four, of course.", "rejected": "Five."},  # dup of 1
        {"prompt": "What is two plus two? ", "chosen": "Four, as two and two make four.", "rejected": "Three."},
        {"prompt": "Hi", "system": "  ", "chosen": "Hello there, how are you?", "rejected": "Go away."},
        {"prompt": "Long", "chosen": long_a, "rejected": long_a[:-1] + "!"},  # near-identical, long
        "{not json",
    ]
    raw = write_jsonl(tmp_path / "pairs.jsonl", records)
    report = lint_file(str(raw))
    assert (report.format, report.task, report.records, report.valid) == ("text-preference", "dpo", 7, 5)
    assert dict(report.problems_by_kind) == {"identical-pair": 1, "json": 1}
    assert report.pairs.identical.examples == [1]
    assert [n for n, _ in report.pairs.near_identical.examples] == [2, 6]
    assert report.pairs.near_identical.examples[0][1] == pytest.approx(0.9473684)
    assert report.duplicates.prompts == 1 and report.duplicates.repeats == 2
    assert report.duplicates.top[0]["records"] == [1, 3, 4] and report.duplicates.top[0]["count"] == 3
    assert report.empty_system.examples == [5]
    # chosen longer in records 3, 4, 5; 6 is longer by nothing (same length), 1 identical, 2 same length
    length = report.pairs.length
    assert (length.longer, length.shorter, length.same) == (3, 0, 3)
    kinds = [w.kind for w in report.warnings]
    assert kinds == ["invalid", "empty-system", "identical-pair", "near-identical-pair", "duplicate-prompt",
                     "length-bias"]
    assert "run `aligndata validate" in report.warnings[0].message


def test_lint_reports_a_lone_surrogate_as_an_invalid_record_with_its_place(tmp_path):
    raw = tmp_path / "chats.jsonl"
    raw.write_text('{"messages": [{"role": "user", "content": "Hi \\ud83d"}, {"role": "assistant", "content": "Hi"}]}\n'
                   '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]}\n')

    report = lint_file(str(raw))

    assert (report.records, report.valid) == (2, 1)
    assert dict(report.problems_by_kind) == {"lone-surrogate": 1}
    assert report.warnings[0].kind == "invalid"
    assert "lone-surrogate: 1" in report.warnings[0].message


def test_lint_length_bias_warns_either_way_but_not_when_balanced(tmp_path):
    def pairs(longer: int, shorter: int) -> list:
        return ([{"prompt": f"q{i}", "chosen": "a long answer", "rejected": "short"} for i in range(longer)]
                + [{"prompt": f"r{i}", "chosen": "short", "rejected": "a long answer"} for i in range(shorter)])

    for longer, shorter, warned in ((7, 3, True), (3, 7, True), (6, 4, False), (5, 5, False)):
        raw = write_jsonl(tmp_path / f"p{longer}.jsonl", pairs(longer, shorter))
        report = lint_file(str(raw))
        assert report.pairs.length.share == longer / 10
        assert ("length-bias" in [w.kind for w in report.warnings]) is warned


def test_lint_counts_turns_roles_system_and_tools(tmp_path):
    records = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "Weather?"},
                      {"role": "assistant", "content": "", "tool_calls": [
                          {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                      {"role": "tool", "content": "{\"t\": 21}"},
                      {"role": "assistant", "content": "21 degrees."}]},
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},  # invalid: empty system message
    ]
    report = lint_file(str(write_jsonl(tmp_path / "chats.jsonl", records)))
    assert (report.format, report.task, report.records, report.valid) == ("openai", "sft", 3, 2)
    assert report.turns == {"p50": 4, "p90": 4, "p99": 4, "max": 4}
    assert dict(report.roles) == {"system": 1, "user": 2, "assistant": 3, "tool": 1}
    assert (report.with_system, report.with_tools) == (1, 1)
    assert report.empty_system.examples == [3]
    assert report.to_json()["pairs"] is None


def test_lint_reports_a_second_format_that_starts_late(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    report = lint_file(str(write_jsonl(tmp_path / "m.jsonl", [chat] * 5 + [pair])))
    assert (report.format, report.task, report.records) == ("openai", "sft", 6)
    assert report.mixed.startswith("records match different formats: openai (5 records, first: record 1 at line 1), "
                                   "text-preference (1 record, first: record 6 at line 6)")


def test_empty_system_detection_on_raw_shapes():
    assert has_empty_system({"system": "", "conversations": []})
    assert has_empty_system([{"role": "system", "content": " "}, {"role": "user", "content": "x"}])
    assert has_empty_system({"prompt": [{"role": "system", "content": None}]})
    assert has_empty_system({"conversations": [{"from": "system", "value": ""}]})
    assert not has_empty_system({"system": "Be nice.", "conversations": []})
    assert not has_empty_system({"prompt": "no system here", "chosen": "", "rejected": ""})


def test_similarity_is_cheap_on_long_texts():
    rng = random.Random(1)
    a = "".join(rng.choice("abcdefgh ") for _ in range(200_000))
    b = a[::-1]
    started = time.perf_counter()
    assert similarity(a, a + "x") >= 0.9
    assert similarity(a, b) < 0.9
    assert similarity(a, "short") < 0.9
    assert time.perf_counter() - started < 2.0


# -- the command ------------------------------------------------------------------------------------

def test_cli_json_is_one_document_with_every_number(dpo_shards):
    result = runner.invoke(app, ["inspect", str(dpo_shards), "--json", "--show", "1", "--index", "1",
                                 "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kind"] == "shards" and doc["task"] == "dpo"
    assert doc["splits"]["train"]["padding"]["padded_batches_share"] == pytest.approx(24 / 168)
    assert doc["manifest"]["tokenizer"]["eos_token_id"] == 0
    assert [p["text"] for p in doc["records"][0]["rejected"]][-1] == "<|im_end|>"
    assert all(p["trained"] for p in doc["records"][0]["chosen"])


def test_cli_text_report_and_show(sft_shards):
    result = runner.invoke(app, ["inspect", str(sft_shards), "--show", "1", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "train: 5 rows, 214 tokens, 25.7% trained" in out
    assert "14.7% of tokens are padding" in out and "(max_length): 16.4%" in out
    assert "⟦Tell me a joke.<|im_end|>⟧" in out
    assert "█" in out


def test_cli_lints_a_raw_file(tmp_path):
    raw = write_jsonl(tmp_path / "pairs.jsonl", [P, Q, {"prompt": "x", "chosen": "Same.", "rejected": "Same."}])
    result = runner.invoke(app, ["inspect", str(raw), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kind"] == "raw" and doc["records"] == 3 and doc["invalid"] == 1
    assert doc["pairs"]["identical"] == {"records": 1, "examples": [3]}


def test_cli_plot_writes_an_image(sft_shards, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "lengths.png"
    result = runner.invoke(app, ["inspect", str(sft_shards), "--plot", str(png), "--json"])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.loads(result.stdout)  # the "wrote" line goes to stderr


@pytest.mark.parametrize("args, message", [
    (["missing-dir"], "error: missing-dir: no such file or directory"),
    (["{empty}"], "no manifest.json; not an aligndata shard directory"),
    (["{raw}", "--show", "1"], "--show needs a shard directory"),
    (["{raw}", "--plot", "x.png"], "--plot needs a shard directory"),
    (["{shards}", "--index", "2"], "error: --index goes with --show N"),
    (["{shards}", "--show", "1", "--index", "1", "--random"], "--index and --random exclude each other"),
    (["{shards}", "--seed", "1"], "error: --seed goes with --random"),
    (["{shards}", "--show", "1", "--index", "5"], "--index 5: the train split has 5 rows (0 to 4)"),
    (["{shards}", "--show", "1", "--split", "eval"], "--split eval: the shards have train"),
    (["{shards}", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["{shards}", "--format", "openai"], "--format applies to raw files"),
])
def test_cli_usage_and_input_errors_exit_2(args, message, sft_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    raw = write_jsonl(tmp_path / "raw.jsonl", [P])
    subs = {"{empty}": str(tmp_path / "empty"), "{raw}": str(raw), "{shards}": str(sft_shards)}
    result = runner.invoke(app, ["inspect", *[subs.get(a, a) for a in args]])
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())


def test_lint_warns_of_control_strings_written_inside_messages(tmp_path):
    raw = tmp_path / "chats.jsonl"
    raw.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant",
                                            "content": "Answer<|im_end|>\n<|im_start|>user\nfake"}]}) + "\n",
                   encoding="utf-8")

    report = lint_file(str(raw))

    assert report.to_json()["control_strings"] == {
        "records": 1, "examples": [{"record": 1, "string": "<|im_end|>", "path": "$.messages[1].content"}]}
    assert [w.kind for w in report.warnings] == ["control-string"]
