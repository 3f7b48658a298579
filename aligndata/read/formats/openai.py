"""OpenAI chat messages (also bare message lists) and OpenAI-message preference pairs."""

from __future__ import annotations

from typing import Any

from aligndata.records import Conversation, Message, PreferencePair
from aligndata.read.formats.common import Issues, normalize_arguments, normalize_tools, refuse_undesirable, tool_call


REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")  # as vLLM, OpenRouter and Anthropic name it


def _content(content: Any, path: str, issues: Issues) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if part.get("type") != "text":
            issues.add(f"{path}[{i}].type", f"content part of type {part.get('type')!r} is not supported (text parts only)",
                       "unsupported-content")
            continue
        if not isinstance(part.get("text"), str):
            keys = ", ".join(sorted(part))
            issues.add(f"{path}[{i}]", f"text content part has no \"text\" string (keys: {keys})", "schema")
            continue
        texts.append(part["text"])
    return "".join(texts)


def to_message(obj: dict[str, Any], path: str, issues: Issues) -> Message:
    role = "system" if obj["role"] == "developer" else obj["role"]
    msg = Message(role, _content(obj.get("content"), f"{path}.content", issues), origin=path,
                  origin_content=f"{path}.content")
    if obj.get("name") is not None:
        msg.name = obj["name"]
    if obj.get("tool_call_id") is not None:
        msg.tool_call_id = obj["tool_call_id"]
    msg.reasoning = next((obj[key] for key in REASONING_FIELDS if isinstance(obj.get(key), str)), None)
    calls = obj.get("tool_calls")
    if calls:
        if role != "assistant":
            issues.add(f"{path}.tool_calls", f"only assistant messages can have tool_calls, not {role!r}", "tool-call")
        out = []
        for i, call in enumerate(calls):
            fn = call["function"]
            args = normalize_arguments(fn["arguments"], f"{path}.tool_calls[{i}].function.arguments", issues)
            if args is not None:
                out.append(tool_call(fn["name"], args, call.get("id")))
        msg.tool_calls = out or None
    return msg


def to_messages(items: list[dict[str, Any]], path: str, issues: Issues) -> list[Message]:
    return [to_message(m, f"{path}[{i}]", issues) for i, m in enumerate(items)]


def adapt_openai(value: Any, issues: Issues) -> Conversation:
    refuse_undesirable(value, issues)
    if isinstance(value, list):
        return Conversation(to_messages(value, "$", issues))
    return Conversation(to_messages(value["messages"], "$.messages", issues),
                        normalize_tools(value.get("tools"), "$.tools", issues))


def same_message(a: Message, b: Message) -> bool:
    return (a.role, a.content, a.tool_calls, a.name, a.tool_call_id) == (b.role, b.content, b.tool_calls, b.name, b.tool_call_id)


def adapt_openai_preference(value: dict[str, Any], issues: Issues) -> PreferencePair | None:
    tools = normalize_tools(value.get("tools"), "$.tools", issues)
    chosen = to_messages(value["chosen"], "$.chosen", issues)
    rejected = to_messages(value["rejected"], "$.rejected", issues)
    if "prompt" in value:
        return PreferencePair(to_messages(value["prompt"], "$.prompt", issues), chosen, rejected, tools)
    # Implicit prompt: the longest common prefix of the two conversations.
    n = 0
    while n < min(len(chosen), len(rejected)) and same_message(chosen[n], rejected[n]):
        n += 1
    if n == len(chosen) == len(rejected):
        issues.add("$.rejected", "chosen and rejected are identical", "identical-pair")
        return None
    if n == 0:
        issues.add("$", "chosen and rejected share no common prefix: an implicit-prompt pair needs the prompt "
                        "as the first messages of both (or give \"prompt\" explicitly)", "no-shared-prefix")
        return None
    split = next((rest[0] for rest in (chosen[n:], rejected[n:]) if rest and rest[0].role != "assistant"), None)
    if split is not None:
        issues.add(split.origin or "$", f"chosen and rejected diverge at a {split.role!r} turn; an implicit-prompt "
                                        "pair shares the prompt and may differ only from an assistant reply on", "role-order")
    return PreferencePair(chosen[:n], chosen[n:], rejected[n:], tools)
