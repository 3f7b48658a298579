"""Control strings of chat templates written inside a record's messages: where they are.

What becomes of such a record is the encoder's decision (encode/control.py, `--control-strings`); this is
the search both it and the checks without a tokenizer (`aligndata validate`, the lint of `aligndata
inspect`, over `COMMON_CONTROL_STRINGS`) use.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from aligndata.records import Conversation, Message, Record

# ChatML (Qwen, SmolLM), Llama 3, gpt-oss/Harmony, Phi-3, Gemma, Mistral, DeepSeek's full-width markers.
COMMON_CONTROL_STRINGS = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>",
    "<|return|>", "<|call|>", "<|user|>", "<|assistant|>", "<|system|>", "<start_of_turn>", "<end_of_turn>",
    "[INST]", "[/INST]", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
)


class ControlStrings:
    """Finds any of some control strings in the text fields of messages: content, reasoning, tool-call arguments."""

    def __init__(self, strings: list[str]):
        self._pattern = any_of(strings)

    def find(self, messages: list[Message]) -> tuple[str, str] | None:
        """(control string, JSONPath of the field) of the first one found, else None."""
        if self._pattern is None:
            return None
        for i, message in enumerate(messages):
            for path, text in _text_fields(message, i):
                found = self._pattern.search(text)
                if found:
                    return found.group(0), path
        return None


def any_of(strings: list[str]) -> re.Pattern | None:
    """A pattern matching any of `strings`, longest first (where one contains another, the match is the
    whole token); None for none."""
    ordered = sorted(set(s for s in strings if s), key=lambda s: (-len(s), s))
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


def record_messages(record: Record) -> list[Message]:
    """Every message of a conversation or a preference pair, in order."""
    if isinstance(record, Conversation):
        return record.messages
    return [*record.prompt, *record.chosen, *record.rejected]


def _text_fields(message: Message, index: int) -> Iterator[tuple[str, str]]:
    """(JSONPath, text) of a message's content, reasoning and tool-call argument strings."""
    origin = message.origin or f"$.messages[{index}]"
    yield message.origin_content or f"{origin}.content", message.content
    if message.reasoning:
        yield f"{origin}.reasoning", message.reasoning
    for j, call in enumerate(message.tool_calls or []):
        function = call.get("function", call) if isinstance(call, dict) else {}
        yield from _strings(function.get("arguments") if isinstance(function, dict) else None,
                            f"{origin}.tool_calls[{j}].function.arguments")


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for k, item in enumerate(value):
            yield from _strings(item, f"{path}[{k}]")
