"""aligndata.read.validate, .detect and .rules: every semantic rule, schema messages, format detection.

Records are written to a JSONL file and checked through FileCheck, so each test sees exactly
the `file:line (record N) $.path: message` text that `aligndata validate` prints.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from aligndata.errors import InputError, Problem
from aligndata.read.detect import mixed_problem
from aligndata.read.validate import FileCheck

def check(tmp_path: Path, fmt: str, *records) -> list[list[str]]:
    """Problems per record, as printed (file named t.jsonl)."""
    path = tmp_path / "t.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return [[str(p) for p in c.problems] for c in FileCheck(str(path), fmt, name="t.jsonl").records()]


def one(tmp_path: Path, fmt: str, record) -> list[str]:
    return check(tmp_path, fmt, record)[0]


def kinds(tmp_path: Path, fmt: str, record) -> list[str]:
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return [p.kind for c in FileCheck(str(path), fmt).records() for p in c.problems]


def conv(*turns, **extra) -> dict:
    """openai record from (role, content) pairs; content None with a tool call for ('call', name)."""
    messages = []
    for role, content in turns:
        if role == "call":
            messages.append({"role": "assistant", "content": None,
                             "tool_calls": [{"id": "c", "type": "function", "function": {"name": content, "arguments": "{}"}}]})
        else:
            messages.append({"role": role, "content": content})
    return {"messages": messages, **extra}


def msgs(*turns) -> list[dict]:
    return conv(*turns)["messages"]


# -- SFT conversations: turn order --------------------------------------------------------------------

def test_well_formed_conversations_have_no_problems(tmp_path):
    assert check(
        tmp_path, "openai",
        conv(("user", "q"), ("assistant", "a")),
        conv(("system", "s"), ("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")),
        conv(("user", "q"), ("call", "f"), ("tool", "r1"), ("tool", "r2"), ("assistant", "a")),
        conv(("user", "q"), ("call", "f"), ("tool", "r"), ("call", "g"), ("tool", "r"), ("assistant", "a")),
    ) == [[], [], [], []]


@pytest.mark.parametrize(
    ("turns", "problem"),
    [
        ((("user", "q"), ("assistant", "a"), ("system", "s"), ("user", "q"), ("assistant", "a")),
         "$.messages[2]: a system turn is only allowed first"),
        ((("assistant", "a"), ("user", "q"), ("assistant", "a")),
         "$.messages[0]: the conversation must start with a user turn, found 'assistant'"),
        ((("system", "s"), ("assistant", "a")),
         "$.messages[1]: 'assistant' turn follows a 'system' turn; expected 'user'"),
        ((("user", "q"), ("user", "q again"), ("assistant", "a")),
         "$.messages[1]: 'user' turn follows a 'user' turn; expected 'assistant'"),
        ((("user", "q"), ("assistant", "a"), ("assistant", "a again")),
         "$.messages[2]: 'assistant' turn follows an 'assistant' turn; expected 'user'"),
        ((("user", "q"), ("assistant", "a"), ("tool", "r"), ("assistant", "a")),
         "$.messages[2]: 'tool' turn follows an assistant turn that calls no tool; expected 'user'"),
        ((("user", "q"), ("call", "f"), ("assistant", "a")),
         "$.messages[2]: 'assistant' turn follows an assistant tool call; expected 'tool'"),
        ((("user", "q"), ("call", "f"), ("tool", "r"), ("user", "q2"), ("assistant", "a")),
         "$.messages[3]: 'user' turn follows a 'tool' turn; expected 'tool' or 'assistant'"),
    ],
)
def test_turn_order_violations_name_the_offending_message(tmp_path, turns, problem):
    assert one(tmp_path, "openai", conv(*turns)) == [f"t.jsonl:1 (record 1) {problem}"]


def test_sft_conversation_must_end_with_an_assistant_turn(tmp_path):
    assert check(
        tmp_path, "openai",
        conv(("user", "q"), ("assistant", "a"), ("user", "q2")),
        conv(("user", "q"), ("call", "f"), ("tool", "r")),
        conv(("system", "s"), ("user", "q")),
        conv(("system", "s")),
    ) == [
        ["t.jsonl:1 (record 1) $.messages[2]: conversation ends with a 'user' turn; "
         "an SFT conversation must end with an assistant turn"],
        ["t.jsonl:2 (record 2) $.messages[2]: conversation ends with a 'tool' turn; "
         "an SFT conversation must end with an assistant turn"],
        ["t.jsonl:3 (record 3) $.messages[1]: conversation has no assistant turn to train on"],
        ["t.jsonl:4 (record 4) $.messages[0]: conversation has no assistant turn to train on"],
    ]


def test_empty_and_whitespace_content_is_reported_at_the_text_field(tmp_path):
    assert check(
        tmp_path, "openai",
        conv(("user", ""), ("assistant", "a")),
        conv(("user", "q"), ("assistant", " \t\n")),
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
    ) == [
        ["t.jsonl:1 (record 1) $.messages[0].content: empty or whitespace-only content"],
        ["t.jsonl:2 (record 2) $.messages[1].content: empty or whitespace-only content"],
        ["t.jsonl:3 (record 3) $.messages[1].content: empty or whitespace-only content"],
    ]


def test_assistant_turn_that_only_calls_a_tool_may_have_no_text(tmp_path):
    assert one(tmp_path, "openai", conv(("user", "q"), ("call", "f"), ("tool", "r"), ("assistant", "a"))) == []


def test_sharegpt_rules_point_into_conversations(tmp_path):
    def turns(*pairs):
        return {"conversations": [{"from": f, "value": v} for f, v in pairs]}

    assert check(
        tmp_path, "sharegpt",
        turns(("human", "q"), ("gpt", "a"), ("observation", "r"), ("gpt", "a")),
        turns(("human", "q"), ("gpt", "")),
        {"system": "s", "conversations": [{"from": "system", "value": "again"}, {"from": "human", "value": "q"},
                                          {"from": "gpt", "value": "a"}]},
    ) == [
        ["t.jsonl:1 (record 1) $.conversations[2]: 'tool' turn follows an assistant turn that calls no tool; "
         "expected 'user'"],
        ["t.jsonl:2 (record 2) $.conversations[1].value: empty or whitespace-only content"],
        ["t.jsonl:3 (record 3) $.conversations[0]: a system turn is only allowed first"],
    ]


# -- preference pairs -------------------------------------------------------------------------------

def pair(prompt, chosen, rejected, **extra) -> dict:
    return {"prompt": msgs(*prompt), "chosen": msgs(*chosen), "rejected": msgs(*rejected), **extra}


def test_well_formed_preference_pairs_have_no_problems(tmp_path):
    assert check(
        tmp_path, "openai-preference",
        pair([("user", "q")], [("assistant", "good")], [("assistant", "bad")]),
        pair([("system", "s"), ("user", "q"), ("call", "f"), ("tool", "r")], [("assistant", "good")],
             [("assistant", "bad")]),
        pair([("user", "q")], [("assistant", "a"), ("user", "q2"), ("assistant", "b")], [("assistant", "bad")]),
        {"chosen": msgs(("user", "q"), ("assistant", "good")), "rejected": msgs(("user", "q"), ("assistant", "bad"))},
    ) == [[], [], [], []]


@pytest.mark.parametrize(
    ("record", "problems"),
    [
        (pair([("user", "q"), ("assistant", "a")], [("assistant", "good")], [("assistant", "bad")]),
         ["$.prompt[1]: the prompt ends with an 'assistant' turn; a preference prompt must end with a user "
          "(or tool) turn",
          "$.chosen[0]: 'assistant' turn follows an 'assistant' turn; expected 'user'",
          "$.rejected[0]: 'assistant' turn follows an 'assistant' turn; expected 'user'"]),
        (pair([("system", "s")], [("assistant", "good")], [("assistant", "bad")]),
         ["$.prompt[0]: the prompt ends with a 'system' turn; a preference prompt must end with a user (or tool) turn",
          "$.chosen[0]: 'assistant' turn follows a 'system' turn; expected 'user'",
          "$.rejected[0]: 'assistant' turn follows a 'system' turn; expected 'user'"]),
        (pair([("user", "q")], [("user", "good")], [("assistant", "bad")]),
         ["$.chosen[0]: chosen must start with an assistant turn, found 'user'"]),
        (pair([("user", "q")], [("assistant", "good")], [("tool", "bad")]),
         ["$.rejected[0]: rejected must start with an assistant turn, found 'tool'"]),
        (pair([("user", "q")], [("call", "f"), ("tool", "r")], [("assistant", "bad")]),
         ["$.chosen[1]: chosen must end with an assistant turn"]),
        (pair([("user", "q")], [("assistant", "same")], [("assistant", "same")]),
         ["$.rejected: chosen and rejected are identical"]),
        (pair([("user", "q")], [("assistant", "  ")], [("assistant", "bad")]),
         ["$.chosen[0].content: empty or whitespace-only content"]),
        (pair([("user", " ")], [("assistant", "good")], [("assistant", "bad")]),
         ["$.prompt[0].content: empty or whitespace-only content"]),
        ({"prompt": msgs(("user", "q")), "chosen": [], "rejected": msgs(("assistant", "bad"))},
         ["$.chosen: must not be empty"]),
        ({"prompt": msgs(("user", "q")), "chosen": msgs(("assistant", "good"))},
         ["$: 'rejected' is a required property"]),
    ],
)
def test_preference_rules_for_explicit_prompts(tmp_path, record, problems):
    assert one(tmp_path, "openai-preference", record) == [f"t.jsonl:1 (record 1) {p}" for p in problems]


def test_implicit_prompt_pairs_need_a_shared_prefix_and_different_replies(tmp_path):
    assert check(
        tmp_path, "openai-preference",
        {"chosen": msgs(("user", "q"), ("assistant", "a")), "rejected": msgs(("user", "Q"), ("assistant", "b"))},
        {"chosen": msgs(("user", "q"), ("assistant", "a")), "rejected": msgs(("user", "q"), ("assistant", "a"))},
        {"chosen": msgs(("user", "q"), ("assistant", "a")),
         "rejected": msgs(("user", "q"), ("assistant", "a"), ("user", "more"), ("assistant", "b"))},
    ) == [
        ["t.jsonl:1 (record 1) $: chosen and rejected share no common prefix: an implicit-prompt pair needs the "
         "prompt as the first messages of both (or give \"prompt\" explicitly)"],
        ["t.jsonl:2 (record 2) $.rejected: chosen and rejected are identical"],
        ["t.jsonl:3 (record 3) $.rejected[2]: chosen and rejected diverge at a 'user' turn; an implicit-prompt "
         "pair shares the prompt and may differ only from an assistant reply on"],
    ]


def test_sharegpt_preference_rules(tmp_path):
    def rec(prompt_from, chosen, rejected):
        return {"conversations": [{"from": "human", "value": "q"}] + ([{"from": prompt_from, "value": "x"}] if prompt_from else []),
                "chosen": chosen, "rejected": rejected}

    assert check(
        tmp_path, "sharegpt-preference",
        rec(None, {"from": "gpt", "value": "good"}, {"from": "gpt", "value": "bad"}),
        rec("gpt", {"from": "gpt", "value": "good"}, {"from": "gpt", "value": "bad"}),
        rec(None, {"from": "human", "value": "good"}, {"from": "gpt", "value": "bad"}),
        rec(None, {"from": "gpt", "value": "same"}, {"from": "gpt", "value": "same"}),
        rec(None, {"from": "gpt", "value": "good"}, {"from": "gpt", "value": ""}),
        rec(None, "good", {"from": "gpt", "value": "bad"}),
    ) == [
        [],
        ["t.jsonl:2 (record 2) $.conversations[1]: the prompt ends with an 'assistant' turn; a preference prompt "
         "must end with a user (or tool) turn",
         "t.jsonl:2 (record 2) $.chosen: 'assistant' turn follows an 'assistant' turn; expected 'user'",
         "t.jsonl:2 (record 2) $.rejected: 'assistant' turn follows an 'assistant' turn; expected 'user'"],
        ["t.jsonl:3 (record 3) $.chosen: chosen must start with an assistant turn, found 'user'"],
        ["t.jsonl:4 (record 4) $.rejected: chosen and rejected are identical"],
        ["t.jsonl:5 (record 5) $.rejected.value: empty or whitespace-only content"],
        ["t.jsonl:6 (record 6) $.chosen: 'good' is not of type 'object'"],
    ]


def test_text_preference_rules(tmp_path):
    assert check(
        tmp_path, "text-preference",
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "chosen": "good", "rejected": "\n"},
        {"prompt": "q", "chosen": ["good"], "rejected": "bad"},
        {"prompt": "q", "rejected": "bad"},
    ) == [
        [],
        ["t.jsonl:2 (record 2) $.rejected: chosen and rejected are identical"],
        ["t.jsonl:3 (record 3) $.prompt: empty or whitespace-only content"],
        ["t.jsonl:4 (record 4) $.rejected: empty or whitespace-only content"],
        ["t.jsonl:5 (record 5) $.chosen: an array is not of type 'string'"],
        ["t.jsonl:6 (record 6) $: 'chosen' is a required property"],
    ]


def test_hh_rules_name_the_turn(tmp_path):
    assert check(
        tmp_path, "hh",
        {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant: same"},
        {"chosen": "\n\nHuman: q\n\nHuman: q2\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nHuman: q2\n\nAssistant: b"},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:   "},
        {"chosen": "\n\nAssistant: hi\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nAssistant: hi\n\nHuman: q\n\nAssistant: b"},
    ) == [
        [],
        ["t.jsonl:2 (record 2) $.rejected: chosen and rejected are identical"],
        ["t.jsonl:3 (record 3) $.chosen (turn 2): 'user' turn follows a 'user' turn; expected 'assistant'"],
        ["t.jsonl:4 (record 4) $.rejected (turn 2): empty or whitespace-only content"],
        ["t.jsonl:5 (record 5) $.chosen (turn 1): the conversation must start with a user turn, found 'assistant'"],
    ]


# -- schema problems ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("fmt", "record", "problems"),
    [
        ("openai", {"messages": "hi"}, ["$.messages: 'hi' is not of type 'array'"]),
        ("openai", {"text": "hi"}, ["$: 'messages' is a required property"]),
        ("openai", 5, ["$: 5 is not of type 'object' or 'array'"]),
        ("openai", [], ["$: must not be empty"]),
        ("openai", {"messages": [{"role": "bot", "content": "x"}]},
         ["$.messages[0].role: 'bot' is not one of ['system', 'developer', 'user', 'assistant', 'tool']"]),
        ("openai", {"messages": [{"role": "user", "content": 5}]},
         ["$.messages[0].content: 5 is not of type 'string' or 'array' or 'null'"]),
        ("openai", {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "", "arguments": 3}}]}]},
         ["$.messages[0].tool_calls[0].function.arguments: 3 is not of type 'string' or 'object'",
          "$.messages[0].tool_calls[0].function.name: must not be empty"]),
        ("openai", {"messages": [{"role": "user", "content": "q", "name": 1}, {"role": "assistant", "content": None,
                                 "tool_call_id": 2}], "tools": {"name": "f"}},
         ["$.messages[0].name: 1 is not of type 'string'", "$.messages[1].tool_call_id: 2 is not of type 'string'",
          "$.tools: an object is not of type 'string' or 'array'"]),
        ("sharegpt", {"conversations": [{"from": "human", "value": 1}, {"from": "bot", "value": "x"}, {"value": "y"}]},
         ["$.conversations[0].value: 1 is not of type 'string'",
          "$.conversations[1].from: 'bot' is not one of ['human', 'user', 'gpt', 'assistant', 'system', "
          "'function_call', 'observation', 'tool']",
          "$.conversations[2]: 'from' is a required property"]),
        ("sharegpt", {"conversations": []}, ["$.conversations: must not be empty"]),
        ("hh", {"chosen": None, "rejected": "x" * 500}, ["$.chosen: None is not of type 'string'"]),
    ],
)
def test_schema_problems_are_compact_and_point_at_the_field(tmp_path, fmt, record, problems):
    assert one(tmp_path, fmt, record) == [f"t.jsonl:1 (record 1) {p}" for p in problems]


def test_every_schema_problem_of_a_record_is_reported_in_document_order_up_to_twenty(tmp_path):
    record = {"messages": [{"role": "user", "content": 0} for _ in range(25)]}
    got = one(tmp_path, "openai", record)
    assert len(got) == 20
    assert got[:3] == [f"t.jsonl:1 (record 1) $.messages[{i}].content: 0 is not of type 'string' or 'array' or 'null'"
                       for i in range(3)]
    assert got[-1].startswith("t.jsonl:1 (record 1) $.messages[19].content:")


def test_a_reply_labelled_undesirable_is_not_sft_data(tmp_path):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]
    assert one(tmp_path, "openai", {"messages": chat, "label": False}) == [
        "t.jsonl:1 (record 1) $.label: label is false: the reply is marked undesirable (KTO-style unpaired data), "
        "so it is not SFT data; drop such records, or train them with an unpaired-preference method"]
    assert kinds(tmp_path, "openai", {"messages": chat, "label": False}) == ["undesirable-label"]
    assert kinds(tmp_path, "sharegpt", {"conversations": [{"from": "human", "value": "Hi"},
                                                          {"from": "gpt", "value": "Go away."}], "label": False}) == \
        ["undesirable-label"]
    assert one(tmp_path, "openai", {"messages": chat, "label": True}) == []


def test_nan_is_reported_as_a_json_problem_at_its_path(tmp_path):
    assert one(tmp_path, "text-preference", '{"prompt": "q", "chosen": "a", "rejected": "b", "score": NaN}') == [
        "t.jsonl:1 (record 1) $.score: NaN and Infinity are not valid JSON"]


def test_number_that_overflows_to_infinity_is_reported_so_convert_never_writes_infinity(tmp_path):
    record = ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null, "tool_calls": '
              '[{"function": {"name": "f", "arguments": {"x": 1e400}}}]}, {"role": "tool", "content": "r"}, '
              '{"role": "assistant", "content": "a"}]}')
    assert one(tmp_path, "openai", record) == [
        "t.jsonl:1 (record 1) $.messages[1].tool_calls[0].function.arguments.x: NaN and Infinity are not valid JSON"]


def test_a_lone_surrogate_escape_is_reported_at_its_path_and_a_surrogate_pair_is_not(tmp_path):
    record = ('{"messages": [{"role": "user", "content": "Hi \\ud83d\\ude00"}, {"role": "assistant", "content": null, '
              '"tool_calls": [{"function": {"name": "f", "arguments": {"city": "Paris \\ud83d"}}}]}, '
              '{"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]}')
    assert one(tmp_path, "openai", record) == [
        "t.jsonl:1 (record 1) $.messages[1].tool_calls[0].function.arguments.city: lone surrogate escape \\ud83d: "
        "half of a UTF-16 pair, not a character, so this text cannot be encoded as UTF-8 (to tokenize, hash or "
        "write it)"]
    assert kinds(tmp_path, "openai", json.loads(record)) == ["lone-surrogate"]


def test_unparseable_line_is_a_json_problem_and_the_next_lines_are_still_checked(tmp_path):
    assert check(tmp_path, "text-preference", '{"prompt": "q", "chosen": "a"', {"prompt": "q", "chosen": "a",
                                                                                 "rejected": "b"}) == [
        ["t.jsonl:1 (record 1) $: invalid JSON: Expecting ',' delimiter (column 30)"],
        [],
    ]


def test_problem_kinds_group_the_rules(tmp_path):
    assert kinds(tmp_path, "openai", conv(("assistant", ""), ("assistant", "a"))) == [
        "empty-content", "role-order", "role-order"]
    assert kinds(tmp_path, "openai", conv(("user", "q"))) == ["last-turn"]
    assert kinds(tmp_path, "openai-preference", pair([("user", "q")], [("assistant", "x")], [("assistant", "x")])) == [
        "identical-pair"]


def test_problem_prints_file_line_record_path_and_message():
    p = Problem("data.jsonl", 12, 7, "$.messages[3].content", "empty or whitespace-only content", "empty-content")
    assert str(p) == "data.jsonl:12 (record 7) $.messages[3].content: empty or whitespace-only content"
    assert p.to_json() == {"file": "data.jsonl", "line": 12, "record": 7, "path": "$.messages[3].content",
                           "message": "empty or whitespace-only content", "kind": "empty-content"}
    assert str(Problem("data.jsonl", 3, 0, "$", "whole-file problem", "mixed-format")) == "data.jsonl:3 $: whole-file problem"


# -- FileCheck: format detection over all records --------------------------------------------------------

def test_auto_detection_uses_every_record_not_just_the_first(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": 1}\n' + json.dumps({"conversations": [{"from": "human", "value": "q"},
                                                                   {"from": "gpt", "value": "a"}]}) + "\n")
    fc = FileCheck(str(path), name="d.jsonl")
    got = [[str(p) for p in c.problems] for c in fc.records()]
    assert fc.format == "sharegpt"
    assert got == [["d.jsonl:1 (record 1) $: 'conversations' is a required property"], []]


def test_records_of_different_formats_are_reported_as_mixed_not_guessed(tmp_path):
    path = tmp_path / "m.jsonl"
    sft = conv(("user", "q"), ("assistant", "a"))
    text_pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path.write_text("\n".join(json.dumps(r) for r in (sft, sft, text_pair, sft)) + "\n")
    fc = FileCheck(str(path), name="m.jsonl")
    checked = list(fc.records())
    assert fc.detection.mixed
    assert dict(fc.detection.shapes) == {"openai": 3, "text-preference": 1}
    assert [c.format for c in checked] == ["openai", "openai", "text-preference", "openai"]
    assert all(c.ok for c in checked)
    assert str(mixed_problem(fc.name, fc.detection)) == (
        "m.jsonl:3 $: records match different formats: openai (3 records, first: record 1 at line 1), "
        "text-preference (1 record, first: record 3 at line 3); split the file by format or pass --format")


def test_auto_format_reads_a_single_format_file_once(tmp_path, monkeypatch):
    import aligndata.read.detect as V

    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps(conv(("user", f"q{i}"), ("assistant", "a"))) + "\n" for i in range(50)))
    whole = []
    monkeypatch.setattr(V, "detect_format", lambda *a, **k: whole.append(a) or pytest.fail("read twice"))
    fc = FileCheck(str(path), name="one.jsonl")
    assert sum(c.ok for c in fc.records()) == 50
    assert fc.format == "openai" and not fc.detection.mixed and not whole


def test_a_second_format_deep_in_the_file_makes_it_mixed_from_that_record_on(tmp_path):
    # The file is read whole once the second format shows; records from there are checked against
    # their own shapes and the detection holds the whole file's counts.
    path = tmp_path / "m.jsonl"
    sft = conv(("user", "q"), ("assistant", "a"))
    text_pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path.write_text("\n".join(json.dumps(r) for r in [text_pair] + [sft] * 5 + [text_pair]) + "\n")
    fc = FileCheck(str(path), name="m.jsonl")
    seen = []
    for c in fc.records():
        seen.append((c.format, fc.detection.mixed, fc.format))
    assert seen[0] == ("text-preference", False, "text-preference")
    assert seen[1] == ("openai", True, "openai")  # the most common, as a whole-file detection decides
    assert [s[0] for s in seen] == ["text-preference"] + ["openai"] * 5 + ["text-preference"]
    assert dict(fc.detection.shapes) == {"openai": 5, "text-preference": 2}


def test_given_format_checks_every_record_against_it(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(conv(("user", "q"), ("assistant", "a"))) + "\n"
                    + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    fc = FileCheck(str(path), "openai", name="m.jsonl")
    assert [[str(p) for p in c.problems] for c in fc.records()] == [
        [], ["m.jsonl:2 (record 2) $: 'messages' is a required property"]]
    assert fc.detection is None


def test_file_where_no_record_looks_like_any_format_is_an_input_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n{"label": true}\n')
    with pytest.raises(InputError) as e:
        list(FileCheck(str(path), name="x.jsonl").records())
    assert str(e.value) == ("x.jsonl: cannot detect the format: no record looks like any of sharegpt, openai, "
                            "sharegpt-preference, openai-preference, text-preference, hh (pass --format to see why "
                            "each record fails)")


def test_empty_json_array_is_an_input_error(tmp_path):
    path = tmp_path / "e.json"
    path.write_text("[]\n")
    with pytest.raises(InputError) as e:
        list(FileCheck(str(path), name="e.json").records())
    assert str(e.value) == "e.json: holds no records (an empty JSON array)"


def test_unknown_format_is_an_input_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("{}\n")
    with pytest.raises(InputError) as e:
        list(FileCheck(str(path), "alpaca").records())
    assert str(e.value) == ("unknown format 'alpaca'; choose one of: auto, sharegpt, openai, sharegpt-preference, "
                            "openai-preference, text-preference, hh")


def test_stdin_is_read_twice_through_a_temporary_copy(monkeypatch):
    data = (json.dumps(conv(("user", "q"), ("assistant", "a"))) + "\n").encode() * 3
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    fc = FileCheck("-")
    checked = list(fc.records())
    assert (fc.name, fc.format, len(checked), all(c.ok for c in checked)) == ("<stdin>", "openai", 3, True)


def test_valid_records_carry_their_source(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2, indent=1))
    got = [c.record.source.where() for c in FileCheck(str(path), name="s.json").records()]
    assert got == ["s.json:2 (record 1)", "s.json:7 (record 2)"]


# -- the real public files in ../shared/data ------------------------------------------------------------

# (format detected, records, invalid records). Checked by reading the flagged records: the HH
# test splits hold empty replies, "Human:" turns glued into an assistant turn without their "\n\n"
# (or spelled "Humans:"), so the two sides differ before the last reply or have two assistant
# turns in a row, and byte-identical chosen/rejected pairs; two glaive_toolcall_zh records put a
# tool call as plain "gpt" text and then an observation; the OpenAI cookbook's record 4
# deliberately has no user turn; LLaMA-Factory's v1 files use {"type", "value"} content parts
# (OpenAI's have "text") and reasoning parts; xtuner's qwen35 file has image/video parts; NeMo
# speakers are "User"/"Assistant".
REAL_EXPECTED = {
    "llamafactory/dpo_en_demo.json": ("sharegpt-preference", 300, 0),
    "llamafactory/dpo_zh_demo.json": ("sharegpt-preference", 300, 0),
    "llamafactory/kto_en_demo.json": ("openai", 300, 150),  # label: false, 150 of them (undesirable-label)
    "llamafactory/glaive_toolcall_en_demo.json": ("sharegpt", 300, 0),
    "llamafactory/glaive_toolcall_zh_demo.json": ("sharegpt", 300, 2),
    "llamafactory/v1_sft_demo.jsonl": ("openai", 500, 500),
    "llamafactory/reason_tool_use_demo_50.jsonl": ("openai", 50, 50),
    "hh-rlhf/harmless-base-test.jsonl.gz": ("hh", 2312, 13),
    "hh-rlhf/helpful-base-test.jsonl.gz": ("hh", 2354, 21),
    "fastchat/dummy_conversation.json": ("sharegpt", 500, 0),
    "axolotl/conversation.json": ("sharegpt", 1, 0),
    "axolotl/conversation.missingturns.json": ("sharegpt", 1, 1),
    "nemo-aligner/dummy-sft.jsonl": ("sharegpt", 30, 30),
    "xtuner/openai_sft.jsonl": ("openai", 128, 0),
    "xtuner/mllm_sft_text_example_data.jsonl": ("openai", 200, 0),
    "xtuner/qwen35_tokenize_data.jsonl": ("openai", 17, 5),
    "xtuner/preference_data_doc_excerpt.jsonl": ("openai-preference", 3, 0),
    "openai-cookbook/toy_chat_fine_tuning.jsonl": ("openai", 5, 1),
}

# Files in none of our formats: auto-detection refuses them (exit code 2 in the CLI).
REAL_UNDETECTABLE = [
    "llamafactory/v1_dpo_demo.jsonl",  # chosen_messages / rejected_messages
    "llamafactory/dataset_info.json",  # a registry, not data
    "nemo-aligner/dummy-dpo.jsonl",  # chosen_response / rejected_response
    "nemo-aligner/test-rm.jsonl",  # a single "text" field
    "axolotl/conversation.tokenized.json",  # token ids
]


@pytest.mark.shared_data
def test_real_public_files_give_the_recorded_format_and_invalid_counts(shared_data):
    got = {}
    for rel in REAL_EXPECTED:
        fc = FileCheck(str(shared_data / rel))
        checked = list(fc.records())
        got[rel] = (fc.format, len(checked), sum(not c.ok for c in checked))
    assert got == REAL_EXPECTED
    for rel in REAL_UNDETECTABLE:
        with pytest.raises(InputError, match="cannot detect the format"):
            list(FileCheck(str(shared_data / rel)).records())


@pytest.mark.shared_data
def test_real_flagged_records_say_why(shared_data):
    def problems(rel):
        return [f"{p.index} {p.path}: {p.message}" for c in FileCheck(str(shared_data / rel)).records() for p in c.problems]

    assert problems("openai-cookbook/toy_chat_fine_tuning.jsonl") == [
        "4 $.messages[1]: 'assistant' turn follows a 'system' turn; expected 'user'"]
    assert problems("llamafactory/glaive_toolcall_zh_demo.json") == [
        "198 $.conversations[2]: 'tool' turn follows an assistant turn that calls no tool; expected 'user'",
        "294 $.conversations[2]: 'tool' turn follows an assistant turn that calls no tool; expected 'user'"]
    assert problems("axolotl/conversation.missingturns.json") == [
        "1 $.conversations[1].value: empty or whitespace-only content"]
    assert problems("nemo-aligner/dummy-sft.jsonl")[0] == (
        "1 $.conversations[0].from: 'User' is not one of ['human', 'user', 'gpt', 'assistant', 'system', "
        "'function_call', 'observation', 'tool']")
