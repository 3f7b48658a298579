"""The canonical records every input format is adapted into.

Everything downstream of the adapters (validation rules, rendering, tokenization,
shards) knows only these types. They are plain dataclasses so they serialize to
the OpenAI-style JSON written by `aligndata convert --to openai|preference`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Source:
    """Where a record came from: file name, 1-based line of its first byte, 1-based record index."""

    file: str
    line: int
    index: int

    def where(self) -> str:
        return f"{self.file}:{self.line} (record {self.index})"


@dataclass
class Message:
    """One turn. `content` is plain text; `tool_calls` follow the OpenAI shape
    ``{"type": "function", "function": {"name": str, "arguments": dict}}``."""

    role: str
    content: str
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None  # an assistant turn's reasoning, given apart from its content
    # JSONPath of the message in its source record and of its text field, for error messages.
    origin: str | None = field(default=None, compare=False, repr=False)
    origin_content: str | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning  # the name reasoning templates read (Qwen3, DeepSeek)
        return out


@dataclass
class Conversation:
    """A chat for supervised fine-tuning: messages in order, optional tool definitions."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None = None
    source: Source | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": [m.to_json() for m in self.messages]}
        if self.tools:
            out["tools"] = self.tools
        return out


@dataclass
class PreferencePair:
    """A shared prompt (ends with a user or tool turn) and two completions (start with assistant)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    tools: list[dict[str, Any]] | None = None
    source: Source | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": [m.to_json() for m in self.prompt],
            "chosen": [m.to_json() for m in self.chosen],
            "rejected": [m.to_json() for m in self.rejected],
        }
        if self.tools:
            out["tools"] = self.tools
        return out


Record = Conversation | PreferencePair

