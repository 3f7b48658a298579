"""Helpers shared by the format adapters: problem collection and tool normalization."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Issues:
    """Problems found while adapting one record: (JSONPath, message, kind) triples."""

    items: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, path: str, message: str, kind: str) -> None:
        self.items.append((path, message, kind))

    def __bool__(self) -> bool:
        return bool(self.items)


def refuse_undesirable(value: Any, issues: Issues) -> None:
    """A conversation whose `label` is false (LLaMA-Factory's KTO layout: messages + label) marks its reply
    as one the model should NOT give: trained as SFT it would teach exactly that reply, so it is refused."""
    if isinstance(value, dict) and value.get("label") is False:
        issues.add("$.label", "label is false: the reply is marked undesirable (KTO-style unpaired data), so it is "
                   "not SFT data; drop such records, or train them with an unpaired-preference method",
                   "undesirable-label")


def loads_text(text: str) -> tuple[Any, str | None]:
    """json.loads for JSON held inside a string field: (value, None), or (None, why it failed).

    RecursionError is caught too: a string of a few thousand '[' must be reported, not crash.
    """
    try:
        return json.loads(text), None
    except ValueError as e:
        return None, str(e)
    except RecursionError:
        return None, "nested too deeply"


def normalize_tools(value: Any, path: str, issues: Issues) -> list[dict[str, Any]] | None:
    """Tools as OpenAI tool definitions: {"type": "function", "function": {name, description, parameters}}.

    Accepts a JSON array, a string holding one (LLaMA-Factory/Glaive), OpenAI-wrapped or bare functions.
    """
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        value, error = loads_text(value)
        if error is not None:
            issues.add(path, f"tools string is not valid JSON ({error})", "tools")
            return None
        if isinstance(value, dict):
            value = [value]
    if not isinstance(value, list):
        issues.add(path, "tools must be a JSON array of tool definitions", "tools")
        return None
    out = []
    for i, tool in enumerate(value):
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            fn = tool["function"]
        elif isinstance(tool, dict):
            fn = tool
        else:
            issues.add(f"{path}[{i}]", "tool definition must be an object", "tools")
            continue
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            issues.add(f"{path}[{i}]", "tool definition has no \"name\"", "tools")
            continue
        out.append({"type": "function", "function": fn})
    return out or None


def normalize_arguments(args: Any, path: str, issues: Issues) -> dict[str, Any] | None:
    """Tool-call arguments as a dict (chat templates serialize them); strings must hold a JSON object."""
    if isinstance(args, dict):
        return args
    if isinstance(args, str):
        parsed, error = loads_text(args) if args.strip() else ({}, None)
        if error is not None:
            issues.add(path, "tool-call arguments are not valid JSON", "tool-call")
            return None
        if isinstance(parsed, dict):
            return parsed
    issues.add(path, "tool-call arguments must be a JSON object", "tool-call")
    return None


def tool_call(name: str, arguments: dict[str, Any], call_id: str | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id:
        call["id"] = call_id
    return call
