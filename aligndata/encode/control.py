"""Control strings inside message text: a tokenizer's special tokens written by the data, not the template.

The tokenizers library turns every occurrence of an added special token into that token, wherever it
comes from: an assistant reply ``"Answer<|im_end|>\\n<|im_start|>user\\nfake"`` is trained with the real
end-of-turn and start-of-turn ids inside its span, teaching the model to write a fake user turn
(transformers and TRL do the same; ``split_special_tokens=True`` would split the template's own markers
too). `--control-strings` decides what such a record becomes:

- ``refuse`` (default): the record is rejected as ``control-string-in-content``, naming the string and field;
- ``allow``: encoded as before, the strings becoming special tokens.

`COMMON_CONTROL_STRINGS` are those of the common template families, for the checks that have no
tokenizer (`aligndata validate`, the lint of `aligndata inspect`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from aligndata.encode.results import EncodeError
from aligndata.records import Message


# ChatML (Qwen, SmolLM), Llama 3, gpt-oss/Harmony, Phi-3, Gemma, Mistral, DeepSeek's full-width markers.
COMMON_CONTROL_STRINGS = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>",
    "<|return|>", "<|call|>", "<|user|>", "<|assistant|>", "<|system|>", "<start_of_turn>", "<end_of_turn>",
    "[INST]", "[/INST]", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
)


class ControlStringCheck:
    """Finds a tokenizer's special tokens in the text fields of a record's messages."""

    def __init__(self, strings: list[str]):
        # Longest first, so that the name given is the whole token where one contains another.
        ordered = sorted(set(s for s in strings if s), key=lambda s: (-len(s), s))
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @classmethod
    def for_backend(cls, backend: Any) -> ControlStringCheck:
        """The special added tokens of a tokenizers backend (what it turns into special ids in any text)."""
        added = backend.get_added_tokens_decoder().values()
        return cls([tok.content for tok in added if getattr(tok, "special", False)])

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

    def refuse(self, messages: list[Message]) -> None:
        """EncodeError("control-string-in-content") naming the first control string and its field."""
        found = self.find(messages)
        if found is not None:
            string, path = found
            raise EncodeError(
                "control-string-in-content",
                f"contains {string!r}, a special token of this tokenizer: it would be encoded as that token, "
                "not as text (a reply could teach the model to end its turn or open another); "
                "pass --control-strings allow to encode it as the token anyway",
                path=path,
            )


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
