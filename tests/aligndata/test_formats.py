"""aligndata.read.formats: shape detection, the JSON Schemas, and one adapter per input format."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from aligndata.read.formats import FORMATS, detect_shape, schema_dir
from aligndata.read.formats.common import Issues, normalize_arguments, normalize_tools
from aligndata.read.formats.sharegpt import ROLE_MAP
from aligndata.records import Conversation, PreferencePair
from aligndata.read.validate import FileCheck
from paths import SAMPLES



def adapt(fmt: str, value) -> tuple[object, list[tuple[str, str, str]]]:
    issues = Issues()
    record = FORMATS[fmt].adapt(value, issues)
    return record, issues.items


def msgs(record) -> list[dict]:
    return record.to_json()["messages"]


# -- registry and schemas -----------------------------------------------------------------------------

def test_registry_lists_the_six_formats_with_their_task():
    assert {name: f.task for name, f in FORMATS.items()} == {
        "sharegpt": "sft",
        "openai": "sft",
        "sharegpt-preference": "dpo",
        "openai-preference": "dpo",
        "text-preference": "dpo",
        "hh": "dpo",
    }


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_schema_file_is_a_valid_draft_2020_12_schema_named_after_its_format(name):
    schema = json.loads((schema_dir() / f"{name}.schema.json").read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    assert schema["$id"].endswith(f"/{name}.schema.json")
    assert FORMATS[name].schema == schema


# -- detect_shape ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "shape"),
    [
        ({"conversations": []}, "sharegpt"),
        ({"conversations": [], "chosen": {}}, "sharegpt-preference"),
        ({"conversations": [], "rejected": {}}, "sharegpt-preference"),
        ({"messages": []}, "openai"),
        ([{"role": "user", "content": "hi"}], "openai"),
        ({"prompt": [], "chosen": [], "rejected": []}, "openai-preference"),
        ({"chosen": [{"role": "user"}], "rejected": []}, "openai-preference"),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "text-preference"),
        ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "x"}, "hh"),
        ({"rejected": "only rejected"}, "hh"),
        ({"text": "hello"}, None),
        ([], None),
        ([{"role": "user"}, "not a message"], None),
        ("a string", None),
        (42, None),
        (None, None),
    ],
)
def test_detect_shape_looks_only_at_top_level_keys(value, shape):
    assert detect_shape(value) == shape


# -- sharegpt ---------------------------------------------------------------------------------------

def test_sharegpt_maps_every_speaker_name_explicitly():
    assert ROLE_MAP == {
        "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
        "function_call": "assistant", "observation": "tool", "tool": "tool",
    }


def test_sharegpt_system_key_becomes_the_first_message():
    record, issues = adapt("sharegpt", {
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                          {"from": "user", "value": "Bye"}, {"from": "assistant", "value": "Bye!"}],
    })
    assert issues == []
    assert isinstance(record, Conversation)
    assert msgs(record) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
    assert [m.origin for m in record.messages] == ["$.system", "$.conversations[0]", "$.conversations[1]",
                                                    "$.conversations[2]", "$.conversations[3]"]


def test_sharegpt_blank_system_key_adds_no_message():
    record, _ = adapt("sharegpt", {"system": "  ", "conversations": [{"from": "human", "value": "Hi"}]})
    assert msgs(record) == [{"role": "user", "content": "Hi"}]


def test_sharegpt_function_call_and_observation_become_a_tool_call_and_a_tool_message():
    record, issues = adapt("sharegpt", {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": '{"temp": -3}'},
            {"from": "gpt", "value": "It is -3 degrees."},
        ],
        "tools": '[{"name": "get_weather", "parameters": {"type": "object"}}]',
    })
    assert issues == []
    assert record.to_json() == {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": '{"temp": -3}'},
            {"role": "assistant", "content": "It is -3 degrees."},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    }


def test_sharegpt_function_call_may_hold_parallel_calls_with_string_arguments():
    record, issues = adapt("sharegpt", {"conversations": [
        {"from": "human", "value": "Both cities"},
        {"from": "function_call", "value": '[{"name": "w", "arguments": "{\\"city\\": \\"A\\"}"}, {"name": "w"}]'},
    ]})
    assert issues == []
    assert record.messages[1].tool_calls == [
        {"type": "function", "function": {"name": "w", "arguments": {"city": "A"}}},
        {"type": "function", "function": {"name": "w", "arguments": {}}},
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("get_weather(city=Rome)", 'function_call value is not JSON; expected {"name": ..., "arguments": {...}}'),
        ("[" * 5000, 'function_call value is not JSON; expected {"name": ..., "arguments": {...}}'),
        ('{"arguments": {}}', 'function_call value must be an object with a "name" and "arguments"'),
        ("[]", 'function_call value must be an object with a "name" and "arguments"'),
        ('"just a string"', 'function_call value must be an object with a "name" and "arguments"'),
        ('{"name": "f", "arguments": "{oops"}', "tool-call arguments are not valid JSON"),
        ('{"name": "f", "arguments": [1, 2]}', "tool-call arguments must be a JSON object"),
    ],
)
def test_sharegpt_bad_function_call_value_is_an_issue_not_an_exception(value, message):
    _, issues = adapt("sharegpt", {"conversations": [{"from": "human", "value": "q"},
                                                     {"from": "function_call", "value": value}]})
    assert issues == [("$.conversations[1].value", message, "tool-call")]


def test_sharegpt_preference_gives_prompt_and_one_turn_completions():
    record, issues = adapt("sharegpt-preference", {
        "system": "Be kind.",
        "conversations": [{"from": "human", "value": "Hi"}],
        "chosen": {"from": "gpt", "value": "Hello!"},
        "rejected": {"from": "gpt", "value": "What."},
    })
    assert issues == []
    assert isinstance(record, PreferencePair)
    assert record.to_json() == {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "What."}],
    }
    assert (record.chosen[0].origin_content, record.rejected[0].origin) == ("$.chosen.value", "$.rejected")


# -- openai -----------------------------------------------------------------------------------------

def test_openai_developer_role_becomes_system_and_text_parts_are_joined():
    record, issues = adapt("openai", {"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": "Hi", "name": "bot"},
    ]})
    assert issues == []
    assert msgs(record) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, world"},
        {"role": "assistant", "content": "Hi", "name": "bot"},
    ]


def test_openai_tool_calls_get_dict_arguments_and_tool_messages_keep_their_call_id():
    record, issues = adapt("openai", {
        "messages": [
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "now", "arguments": '{"tz": "UTC"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
            {"role": "assistant", "content": "Noon."},
        ],
        "tools": [{"type": "function", "function": {"name": "now", "parameters": {}}}],
    })
    assert issues == []
    assert record.to_json() == {
        "messages": [
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "now", "arguments": {"tz": "UTC"}}, "id": "c1"}]},
            {"role": "tool", "content": "12:00", "tool_call_id": "c1"},
            {"role": "assistant", "content": "Noon."},
        ],
        "tools": [{"type": "function", "function": {"name": "now", "parameters": {}}}],
    }


def test_openai_bare_list_of_messages_is_one_conversation_with_root_paths():
    record, issues = adapt("openai", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert issues == []
    assert msgs(record) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert [m.origin for m in record.messages] == ["$[0]", "$[1]"]


def test_openai_non_text_content_parts_and_misplaced_tool_calls_are_issues():
    _, issues = adapt("openai", {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {}}, {"type": "text", "value": "x"}],
         "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
    ]})
    assert issues == [
        ("$.messages[0].content[0].type", "content part of type 'image_url' is not supported (text parts only)",
         "unsupported-content"),
        ("$.messages[0].content[1]", 'text content part has no "text" string (keys: type, value)', "schema"),
        ("$.messages[0].tool_calls", "only assistant messages can have tool_calls, not 'user'", "tool-call"),
    ]


def test_openai_preference_explicit_prompt_is_kept_as_given():
    record, issues = adapt("openai-preference", {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    })
    assert issues == []
    assert record.to_json() == {"prompt": [{"role": "user", "content": "q"}],
                                "chosen": [{"role": "assistant", "content": "good"}],
                                "rejected": [{"role": "assistant", "content": "bad"}]}


def test_openai_preference_implicit_prompt_is_the_longest_common_prefix():
    shared = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
              {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    record, issues = adapt("openai-preference", {
        "chosen": shared + [{"role": "assistant", "content": "good"}],
        "rejected": shared + [{"role": "assistant", "content": "bad"}, {"role": "user", "content": "more"},
                              {"role": "assistant", "content": "worse"}],
    })
    assert issues == []
    assert record.to_json()["prompt"] == shared
    assert [m.content for m in record.chosen] == ["good"]
    assert [m.content for m in record.rejected] == ["bad", "more", "worse"]
    assert record.chosen[0].origin == "$.chosen[4]"


@pytest.mark.parametrize(
    ("chosen", "rejected", "issue"),
    [
        ([("user", "q"), ("assistant", "a")], [("user", "other q"), ("assistant", "b")],
         ("$", "chosen and rejected share no common prefix: an implicit-prompt pair needs the prompt as the first "
               "messages of both (or give \"prompt\" explicitly)", "no-shared-prefix")),
        ([("user", "q"), ("assistant", "a")], [("user", "q"), ("assistant", "a")],
         ("$.rejected", "chosen and rejected are identical", "identical-pair")),
        ([("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "b")],
         [("user", "q"), ("assistant", "a"), ("user", "other q2"), ("assistant", "c")],
         ("$.chosen[2]", "chosen and rejected diverge at a 'user' turn; an implicit-prompt pair shares the prompt "
                         "and may differ only from an assistant reply on", "role-order")),
    ],
)
def test_openai_preference_implicit_pairs_that_do_not_share_a_prompt_are_issues(chosen, rejected, issue):
    def conv(turns):
        return [{"role": r, "content": c} for r, c in turns]

    _, issues = adapt("openai-preference", {"chosen": conv(chosen), "rejected": conv(rejected)})
    assert issues == [issue]


# -- text-preference and hh -------------------------------------------------------------------------

def test_text_preference_strings_become_single_turn_messages():
    record, issues = adapt("text-preference", {"system": "Be kind.", "prompt": "q", "chosen": "good", "rejected": "bad"})
    assert issues == []
    assert record.to_json() == {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }


def test_hh_dialogue_strings_split_into_stripped_turns_sharing_the_prompt():
    record, issues = adapt("hh", {
        "chosen": "\n\nHuman: Hi there\n\nAssistant:  Hello! \n\nHuman: Joke?\n\nAssistant: Knock knock.",
        "rejected": "\n\nHuman: Hi there\n\nAssistant:  Hello! \n\nHuman: Joke?\n\nAssistant: No.",
    })
    assert issues == []
    assert record.to_json() == {
        "prompt": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Joke?"}],
        "chosen": [{"role": "assistant", "content": "Knock knock."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    assert record.chosen[0].origin == "$.chosen (turn 4)"


@pytest.mark.parametrize(
    ("chosen", "rejected", "issue"),
    [
        ("no markers at all", "\n\nHuman: q\n\nAssistant: a",
         ("$.chosen", "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found", "hh-format")),
        ("Intro\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q\n\nAssistant: b",
         ("$.chosen", "text before the first '\\n\\nHuman:' marker", "hh-format")),
        ("\n\nHuman: q\n\nAssistant: a\n\nHuman: r\n\nAssistant: b",
         "\n\nHuman: q\n\nAssistant: DIFFERENT\n\nHuman: r\n\nAssistant: c",
         ("$.rejected", "does not continue the same dialogue as $.chosen (turn 2 differs); only the last reply may "
                        "differ", "hh-format")),
    ],
)
def test_hh_strings_that_cannot_be_split_into_one_dialogue_are_issues(chosen, rejected, issue):
    record, issues = adapt("hh", {"chosen": chosen, "rejected": rejected})
    assert record is None
    assert issues == [issue]


# -- tools and arguments ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ([], None),
        ('{"name": "f"}', [{"type": "function", "function": {"name": "f"}}]),
        ([{"name": "f", "parameters": {}}], [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ([{"type": "function", "function": {"name": "g"}}], [{"type": "function", "function": {"name": "g"}}]),
    ],
)
def test_tools_are_normalized_to_openai_tool_definitions(value, expected):
    issues = Issues()
    assert normalize_tools(value, "$.tools", issues) == expected
    assert issues.items == []


@pytest.mark.parametrize(
    ("value", "issue"),
    [
        ("[{name: f}]", ("$.tools", "tools string is not valid JSON (Expecting property name enclosed in double "
                                    "quotes: line 1 column 3 (char 2))", "tools")),
        ("[" * 5000, ("$.tools", "tools string is not valid JSON (nested too deeply)", "tools")),
        ('"f"', ("$.tools", "tools must be a JSON array of tool definitions", "tools")),
        (["f"], ("$.tools[0]", "tool definition must be an object", "tools")),
        ([{"description": "no name"}], ("$.tools[0]", 'tool definition has no "name"', "tools")),
    ],
)
def test_bad_tools_are_issues_naming_the_tool(value, issue):
    issues = Issues()
    assert normalize_tools(value, "$.tools", issues) is None
    assert issues.items == [issue]


@pytest.mark.parametrize(
    ("args", "expected", "issue"),
    [
        ({"a": 1}, {"a": 1}, None),
        ('{"a": 1}', {"a": 1}, None),
        ("  ", {}, None),
        ("{oops", None, "tool-call arguments are not valid JSON"),
        ("[" * 5000, None, "tool-call arguments are not valid JSON"),
        ("[1]", None, "tool-call arguments must be a JSON object"),
        (7, None, "tool-call arguments must be a JSON object"),
    ],
)
def test_tool_call_arguments_become_a_dict(args, expected, issue):
    issues = Issues()
    assert normalize_arguments(args, "$.x", issues) == expected
    assert issues.items == ([] if issue is None else [("$.x", issue, "tool-call")])


# -- the hand-written sample files ------------------------------------------------------------------

SAMPLE_FORMATS = {
    "sharegpt.json": "sharegpt",
    "openai.jsonl": "openai",
    "sharegpt_preference.json": "sharegpt-preference",
    "openai_preference.jsonl": "openai-preference",
    "text_preference.jsonl": "text-preference",
    "hh.jsonl": "hh",
}


@pytest.mark.parametrize("name", list(SAMPLE_FORMATS))
def test_each_sample_file_is_detected_as_its_format_and_fully_valid(name):
    fc = FileCheck(str(SAMPLES / name))
    checked = list(fc.records())
    assert fc.format == SAMPLE_FORMATS[name]
    assert not fc.detection.mixed
    assert [str(p) for c in checked for p in c.problems] == []


def _records(name: str) -> list:
    return [c.record for c in FileCheck(str(SAMPLES / name)).records()]


def test_sample_sft_files_hold_about_fifty_conversations_all_answered_in_pirate_voice():
    convs = _records("sharegpt.json") + _records("openai.jsonl")
    assert len(convs) == 51
    answers = [m.content for c in convs for m in c.messages if m.role == "assistant" and not m.tool_calls]
    assert all(a.startswith("Arr! ") for a in answers)
    assert max(len(a.split()) for a in answers) <= 40


def test_sample_preference_files_hold_about_fifty_short_distinct_pairs():
    pairs = [p for name in SAMPLE_FORMATS if "pref" in name or name == "hh.jsonl" for p in _records(name)]
    assert len(pairs) == 54
    completions = [m.content for p in pairs for m in p.chosen + p.rejected]
    assert max(len(c.split()) for c in completions) < 80
    assert len({p.chosen[0].content for p in pairs}) == 54
