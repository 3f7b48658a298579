"""ShareGPT conversations and the seed project's ShareGPT preference pairs."""

from __future__ import annotations

from typing import Any

from aligndata.records import Conversation, Message, PreferencePair
from aligndata.read.formats.common import (Issues, loads_text, normalize_arguments, normalize_tools, refuse_undesirable,
                                           tool_call)

# Every accepted speaker name, mapped explicitly; anything else is a schema error.
ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


def _function_call(value: str, path: str, issues: Issues) -> list[dict[str, Any]] | None:
    """A function_call turn's value: {"name", "arguments"} or a list of them (parallel calls)."""
    parsed, error = loads_text(value)
    if error is not None:
        issues.add(path, "function_call value is not JSON; expected {\"name\": ..., \"arguments\": {...}}", "tool-call")
        return None
    calls = parsed if isinstance(parsed, list) and parsed else [parsed]  # an empty list is no call either
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            issues.add(path, "function_call value must be an object with a \"name\" and \"arguments\"", "tool-call")
            return None
        args = normalize_arguments(call.get("arguments", {}), path, issues)
        if args is None:
            return None
        out.append(tool_call(call["name"], args))
    return out


def turn_to_message(turn: dict[str, Any], path: str, issues: Issues) -> Message:
    speaker = turn["from"]
    msg = Message(role=ROLE_MAP[speaker], content=turn["value"], origin=path, origin_content=f"{path}.value")
    if speaker == "function_call":
        msg.tool_calls = _function_call(turn["value"], f"{path}.value", issues)
        msg.content = ""
    return msg


def _head(value: dict[str, Any], issues: Issues) -> list[Message]:
    system = value.get("system")
    if isinstance(system, str) and system.strip():
        return [Message("system", system, origin="$.system", origin_content="$.system")]
    return []


def adapt_sharegpt(value: dict[str, Any], issues: Issues) -> Conversation:
    refuse_undesirable(value, issues)
    msgs = _head(value, issues)
    msgs += [turn_to_message(t, f"$.conversations[{i}]", issues) for i, t in enumerate(value["conversations"])]
    return Conversation(msgs, normalize_tools(value.get("tools"), "$.tools", issues))


def adapt_sharegpt_preference(value: dict[str, Any], issues: Issues) -> PreferencePair:
    prompt = _head(value, issues)
    prompt += [turn_to_message(t, f"$.conversations[{i}]", issues) for i, t in enumerate(value["conversations"])]
    chosen = turn_to_message(value["chosen"], "$.chosen", issues)
    rejected = turn_to_message(value["rejected"], "$.rejected", issues)
    return PreferencePair(prompt, [chosen], [rejected], normalize_tools(value.get("tools"), "$.tools", issues))
