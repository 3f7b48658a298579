"""Property-based tests: whatever JSON comes in, validation ends in Problems or valid records.

Never a traceback: random JSON values, and valid sample records mutated (keys deleted, types
changed, roles swapped, strings emptied), go through FileCheck in every format and through
the CLI. And a valid record survives `convert --to openai|preference` and re-reading unchanged.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from aligndata.cli import app
from aligndata.errors import InputError, Problem
from aligndata.read.formats import FORMATS
from aligndata.write.jsonl import normalize
from aligndata.records import Conversation, PreferencePair
from aligndata.read.validate import FileCheck
from paths import SAMPLES
from tiny_tokenizer import SPECIAL_TOKENS

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = ["messages", "conversations", "role", "content", "from", "value", "chosen", "rejected", "prompt",
        "system", "tools", "tool_calls", "tool_call_id", "function", "name", "arguments", "type", "text", "id"]
ROLES = ["system", "developer", "user", "assistant", "tool", "human", "gpt", "function_call", "observation", "bot"]

# Text without lone surrogates (they cannot be written as UTF-8, so no file holds them).
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts
json_values = st.recursive(
    scalars | st.sampled_from(ROLES + ["", " ", "\n\nHuman: hi\n\nAssistant: yo"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | texts, children, max_size=4),
    max_leaves=25,
)


def write_records(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def check_never_crashes(path: Path, fmt: str, count: int) -> None:
    """Every record comes out as a valid canonical record or with Problems that name it."""
    try:
        checked = list(FileCheck(str(path), fmt).records())
    except InputError as e:  # a file-level verdict (exit 2), e.g. no record looks like any format
        assert fmt == "auto" and "cannot detect the format" in str(e)
        return
    assert len(checked) == count
    for i, c in enumerate(checked, start=1):
        if c.ok:
            assert isinstance(c.record, (Conversation, PreferencePair))
            assert c.record.source.index == i
        else:
            assert c.record is None
            assert all(isinstance(p, Problem) and p.index == i and p.path.startswith("$") and p.message
                       for p in c.problems)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("props")


# -- random JSON ------------------------------------------------------------------------------------

@SETTINGS
@given(records=st.lists(json_values, min_size=1, max_size=5), fmt=st.sampled_from(["auto", *FORMATS]))
def test_random_json_records_give_problems_or_valid_records(scratch, records, fmt):
    check_never_crashes(write_records(scratch / "random.jsonl", records), fmt, len(records))


# -- mutated valid records --------------------------------------------------------------------------

@functools.cache
def _samples() -> list[tuple[str, Any]]:
    out = []
    for name, fmt in [("sharegpt.json", "sharegpt"), ("openai.jsonl", "openai"),
                      ("sharegpt_preference.json", "sharegpt-preference"),
                      ("openai_preference.jsonl", "openai-preference"),
                      ("text_preference.jsonl", "text-preference"), ("hh.jsonl", "hh")]:
        out += [(fmt, c.raw.value) for c in FileCheck(str(SAMPLES / name), fmt).records()]
    return out


def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    """Every location inside a JSON value (the root excluded)."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        out.append(path + (key,))
        out += _paths(child, path + (key,))
    return out


def _parent(value: Any, path: tuple) -> tuple[Any, Any]:
    for key in path[:-1]:
        value = value[key]
    return value, path[-1]


@st.composite
def mutated(draw) -> tuple[str, Any]:
    fmt, record = draw(st.sampled_from(_samples()))
    record = copy.deepcopy(record)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(record)
        if not paths:
            break
        parent, key = _parent(record, draw(st.sampled_from(paths)))
        op = draw(st.sampled_from(["delete", "retype", "role", "empty", "duplicate"]))
        if op == "delete":
            del parent[key]
        elif op == "retype":
            parent[key] = draw(json_values)
        elif op == "role":
            parent[key] = draw(st.sampled_from(ROLES))
        elif op == "empty":
            parent[key] = draw(st.sampled_from(["", " ", "\t\n", [], {}]))
        elif isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
    return fmt, record


@SETTINGS
@given(cases=st.lists(mutated(), min_size=1, max_size=4), auto=st.booleans())
def test_mutated_valid_records_give_problems_or_valid_records(scratch, cases, auto):
    fmt = "auto" if auto else cases[0][0]
    path = write_records(scratch / "mutated.jsonl", [r for _, r in cases])
    check_never_crashes(path, fmt, len(cases))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(json_values | mutated().map(lambda c: c[1]), min_size=1, max_size=4),
       as_array=st.booleans())
def test_cli_validate_exits_0_1_or_2_and_never_raises(scratch, records, as_array):
    path = scratch / ("cli.json" if as_array else "cli.jsonl")
    if as_array:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        write_records(path, records)
    result = CliRunner().invoke(app, ["validate", str(path), "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (0, 1, 2)
    if result.exit_code != 2:
        doc = json.loads(result.stdout)
        assert doc["exit_code"] == result.exit_code
        assert doc["files"][0]["records"] == len(records)


# -- normalize -> re-read keeps every message -------------------------------------------------------

# a special token in a content is refused by convert (tested elsewhere), so valid contents never hold one
words = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(
    lambda w: w.strip() and not any(token in w for token in SPECIAL_TOKENS))
arguments = st.dictionaries(st.sampled_from(["city", "n", "flag"]), st.integers() | words | st.booleans(), max_size=3)


@st.composite
def valid_conversation(draw) -> list[dict]:
    """OpenAI messages obeying every rule: optional system, rounds of user -> (tool calls ->) assistant."""
    messages = [{"role": "system", "content": draw(words)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(words)})
        if draw(st.booleans()):
            name = draw(st.sampled_from(["get_weather", "lookup"]))
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": name, "arguments": draw(arguments)}}]})
            messages.append({"role": "tool", "content": draw(words)})
        messages.append({"role": "assistant", "content": draw(words)})
    return messages


def as_sharegpt(messages: list[dict]) -> dict:
    speaker = {"user": "human", "assistant": "gpt", "tool": "observation"}
    turns = []
    for m in messages:
        if m["role"] == "system":
            continue
        if m.get("tool_calls"):
            fn = m["tool_calls"][0]["function"]
            turns.append({"from": "function_call", "value": json.dumps({"name": fn["name"], "arguments": fn["arguments"]})})
        else:
            turns.append({"from": speaker[m["role"]], "value": m["content"]})
    system = [m["content"] for m in messages if m["role"] == "system"]
    return {"conversations": turns, **({"system": system[0]} if system else {})}


def reread(path: Path, fmt: str) -> list[dict]:
    checked = list(FileCheck(str(path), fmt).records())
    assert all(c.ok for c in checked), [str(p) for c in checked for p in c.problems]
    return [c.record.to_json() for c in checked]


@SETTINGS
@given(convs=st.lists(valid_conversation(), min_size=1, max_size=3), sharegpt=st.booleans())
def test_conversations_survive_convert_to_openai_and_reread(scratch, convs, sharegpt):
    fmt = "sharegpt" if sharegpt else "openai"
    src = write_records(scratch / "conv.jsonl", [as_sharegpt(m) if sharegpt else {"messages": m} for m in convs])
    before = reread(src, fmt)
    counts = normalize([str(src)], str(scratch / "conv.out.jsonl"), "openai", progress=False, overwrite=True)
    assert (counts.read, counts.written, counts.rejected) == (len(convs), len(convs), 0)
    assert reread(scratch / "conv.out.jsonl", "openai") == before
    assert [c["messages"] for c in before] == convs


@st.composite
def valid_pair(draw) -> tuple[str, dict]:
    prompt = draw(valid_conversation())[:-1]  # ends with a user or tool turn
    chosen, rejected = draw(st.lists(words, min_size=2, max_size=2, unique=True))
    layout = draw(st.sampled_from(["explicit", "implicit", "sharegpt", "text"]))
    if layout == "text":
        return "text-preference", {"prompt": draw(words), "chosen": chosen, "rejected": rejected}
    if layout == "sharegpt":
        return "sharegpt-preference", {**as_sharegpt(prompt), "chosen": {"from": "gpt", "value": chosen},
                                       "rejected": {"from": "gpt", "value": rejected}}
    c, r = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    if layout == "implicit":
        return "openai-preference", {"chosen": prompt + c, "rejected": prompt + r}
    return "openai-preference", {"prompt": prompt, "chosen": c, "rejected": r}


@SETTINGS
@given(case=valid_pair())
def test_preference_pairs_survive_convert_to_preference_and_reread(scratch, case):
    fmt, record = case
    src = write_records(scratch / "pair.jsonl", [record])
    before = reread(src, fmt)
    counts = normalize([str(src)], str(scratch / "pair.out.jsonl"), "preference", progress=False, overwrite=True)
    assert (counts.read, counts.written, counts.rejected) == (1, 1, 0)
    assert reread(scratch / "pair.out.jsonl", "openai-preference") == before


# -- normalize -> convert to shards keeps every message ------------------------------------------------

def assistant_turn(message: dict) -> str:
    """An assistant message as the built-in ChatML template writes it (its tool calls as <tool_call> JSON)."""
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in message.get("tool_calls") or []]
    blocks = [f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>" for call in calls]
    return "\n".join(([message["content"]] if message["content"] else []) + blocks)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(convs=st.lists(valid_conversation(), min_size=1, max_size=3))
def test_normalized_conversations_convert_to_shards_keeping_every_message(scratch, tiny_tokenizer_dir, convs):
    """Every message's text is in the decoded shard row, in order; assistant turns are exactly the trained spans.

    The built-in ChatML template renders tool calls (the tiny tokenizer's own renders contents only, so a
    record with a tool call would be refused as template-drops-content)."""
    from aligndata.write.convert import convert
    from aligndata.write.shards import open_split
    from tiny_tokenizer import make_tiny_tokenizer, trained_text

    src = write_records(scratch / "conv.jsonl", [{"messages": m} for m in convs])
    normalize([str(src)], str(scratch / "norm.jsonl"), "openai", progress=False, overwrite=True)
    out = scratch / "shards"
    m = convert([str(scratch / "norm.jsonl")], out, "sft", str(tiny_tokenizer_dir), overwrite=True,
                chat_template="chatml").manifest
    assert m["counts"]["kept"] == len(convs)
    tok = make_tiny_tokenizer()
    rows = open_split(out, "train").to_pylist()
    for messages, row in zip(convs, rows):
        text = tok.decode(row["input_ids"])
        at = 0
        for msg in messages:
            if msg["content"]:
                found = text.find(msg["content"], at)
                assert found >= 0, (msg, text)
                at = found + len(msg["content"])
        spans = trained_text(tok, row["input_ids"], row["loss_mask"])
        assert spans == [assistant_turn(msg) + "<|im_end|>" for msg in messages if msg["role"] == "assistant"]
