"""Refuse a rendering that lost part of its record.

A template that cannot render tool calls, tool results, a tool list or a role leaves them out without a word
(Phi-3's renders neither tool calls nor tool turns): the record would then train an assistant turn to emit
only its end-of-turn token where the data has a function call. So every message's content, every tool
call's name and argument values and every tool's name must appear in the rendered text, else the record is
refused ("template-drops-content"). The check is a substring search, in the forms templates legitimately
write these in: stripped (``| trim``), JSON-encoded (``| tojson``, with or without ASCII escapes), and an
assistant turn's reasoning dropped from the history (text up to ``</think>``), as reasoning templates do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from aligndata.encode.results import EncodeError


def check_rendered(text: str, messages: list[dict], tools: list | None, first: int = 0) -> None:
    """EncodeError naming the first message (numbered from `first`) or tool that `text` lacks."""
    for i, message in enumerate(messages, start=first):
        lost = _lost_from(text, message)
        if lost is not None:
            raise EncodeError(
                "template-drops-content",
                f"message {i} ({message['role']}): the chat template leaves {lost} out of the rendered text "
                "(it cannot render it), so this record would be trained without it",
            )
    for tool in tools or []:
        name = _function(tool).get("name")
        if isinstance(name, str) and name not in text:
            raise EncodeError(
                "template-drops-content",
                f"tool {name!r}: the chat template leaves this tool's definition out of the rendered text "
                "(it cannot render a tool list), so this record would be trained without it",
            )


def _lost_from(text: str, message: dict) -> str | None:
    """What of `message` does not appear in `text`, in words; None when all of it does."""
    content = message.get("content") or ""
    if isinstance(content, str) and not _appears(text, content, message["role"] == "assistant"):
        return f"its content {_preview(content)}"
    for j, call in enumerate(message.get("tool_calls") or []):
        function = _function(call)
        name = function.get("name")
        if isinstance(name, str) and name not in text:
            return f"its tool call {j} ({name})"
        for path, value in _leaves(function.get("arguments"), ""):
            if not _value_appears(text, value):
                return f"its tool call {j} ({name})'s argument {path} = {_preview(value)}"
    return None


def _appears(text: str, value: str, assistant: bool = False) -> bool:
    stripped = value.strip()
    if assistant and "</think>" in stripped:
        stripped = stripped.rsplit("</think>", 1)[1].strip()  # reasoning dropped from earlier turns
    if not stripped or stripped in text:
        return True
    return any(json.dumps(stripped, ensure_ascii=ascii)[1:-1] in text for ascii in (False, True))


def _value_appears(text: str, value: Any) -> bool:
    """A string as `_appears`; a number, bool or null as JSON writes it (tojson) or Jinja prints it (True)."""
    if isinstance(value, str):
        return _appears(text, value)
    return json.dumps(value) in text or str(value) in text


def _leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, value) of every scalar inside tool-call arguments."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for k, item in enumerate(value):
            yield from _leaves(item, f"{path}[{k}]")
    elif value is not None or path:
        yield path, value


def _function(call: Any) -> dict:
    """The {"name", "arguments" | "parameters"} part of an OpenAI-shaped tool call or tool definition."""
    if not isinstance(call, dict):
        return {}
    function = call.get("function", call)
    return function if isinstance(function, dict) else {}


def _preview(value: Any) -> str:
    if not isinstance(value, str):
        return json.dumps(value)
    return repr(value if len(value) <= 60 else value[:57] + "...")
