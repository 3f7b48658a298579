"""Semantic rules a JSON Schema cannot express, checked on canonical records.

Each rule reports (JSONPath, message, kind); paths point into the source record through the
`origin` the adapters gave every message, so errors name the field the user must fix.

Turn order (after an optional leading system prompt):
    user -> assistant
    assistant -> user, or -> tool when the assistant message calls tools
    tool -> tool | assistant
An SFT conversation ends with an assistant turn; a preference prompt ends with a user or tool
turn and each completion starts with an assistant turn and ends with one.
"""

from __future__ import annotations

from aligndata.read.formats.common import Issues
from aligndata.records import Conversation, Message, PreferencePair

_NEXT = {
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user",),
    "assistant+calls": ("tool",),
    "tool": ("tool", "assistant"),
}


def _state(m: Message) -> str:
    return "assistant+calls" if m.role == "assistant" and m.tool_calls else m.role


def _path(m: Message, fallback: str) -> str:
    return m.origin or fallback


def check_turns(msgs: list[Message], issues: Issues, where: str, start_after: Message | None = None) -> None:
    """Role order and empty content over `msgs`, optionally continuing after a previous message."""
    prev = start_after
    for i, m in enumerate(msgs):
        path = _path(m, f"{where}[{i}]")
        if not m.content.strip() and not (m.role == "assistant" and m.tool_calls):
            issues.add(m.origin_content or path, "empty or whitespace-only content", "empty-content")
        if m.role == "system":
            if prev is not None:
                issues.add(path, "a system turn is only allowed first", "role-order")
            prev = m
            continue
        if prev is None:
            if m.role != "user":
                issues.add(path, f"the conversation must start with a user turn, found {m.role!r}", "role-order")
        else:
            allowed = _NEXT[_state(prev)]
            if m.role not in allowed:
                expected = " or ".join(repr(a) for a in allowed)
                issues.add(path, f"{m.role!r} turn follows {_describe_prev(prev, m)}; expected {expected}", "role-order")
        prev = m


def _describe_prev(prev: Message, cur: Message) -> str:
    if _state(prev) == "assistant+calls":
        return "an assistant tool call"
    if prev.role == "assistant" and cur.role == "tool":
        return "an assistant turn that calls no tool"
    return _a_turn(prev.role)


def _a_turn(role: str) -> str:
    return f"an {role!r} turn" if role == "assistant" else f"a {role!r} turn"  # "a 'user'", "a 'tool'", "a 'system'"


def check_conversation(conv: Conversation, issues: Issues) -> None:
    msgs = conv.messages
    check_turns(msgs, issues, "$.messages")
    if not any(m.role == "assistant" for m in msgs):
        issues.add(_path(msgs[-1], "$") if msgs else "$", "conversation has no assistant turn to train on", "last-turn")
    elif msgs[-1].role != "assistant":
        issues.add(_path(msgs[-1], "$"), f"conversation ends with {_a_turn(msgs[-1].role)}; "
                                          "an SFT conversation must end with an assistant turn", "last-turn")


def check_pair(pair: PreferencePair, issues: Issues) -> None:
    prompt = pair.prompt
    if not prompt:
        issues.add("$", "the prompt is empty", "last-turn")
    else:
        check_turns(prompt, issues, "$.prompt")
        if prompt[-1].role not in ("user", "tool"):
            issues.add(_path(prompt[-1], "$.prompt"), f"the prompt ends with {_a_turn(prompt[-1].role)}; "
                                                      "a preference prompt must end with a user (or tool) turn",
                       "last-turn")
    for name, completion in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if not completion:
            issues.add(f"$.{name}", f"{name} has no messages after the prompt", "empty-completion")
            continue
        first = completion[0]
        if first.role != "assistant":
            issues.add(_path(first, f"$.{name}"), f"{name} must start with an assistant turn, found {first.role!r}",
                       "role-order")
            continue
        check_turns(completion, issues, f"$.{name}", start_after=prompt[-1] if prompt else None)
        if completion[-1].role != "assistant":
            issues.add(_path(completion[-1], f"$.{name}"), f"{name} must end with an assistant turn", "last-turn")
    if pair.chosen and _key(pair.chosen) == _key(pair.rejected):
        issues.add("$.rejected", "chosen and rejected are identical", "identical-pair")


def _key(msgs: list[Message]) -> list[tuple]:
    return [(m.role, m.content, repr(m.tool_calls)) for m in msgs]
