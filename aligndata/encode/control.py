"""Control strings inside message text: a tokenizer's special tokens written by the data, not the template.

The tokenizers library turns every occurrence of an added special token into that token, wherever it
comes from: an assistant reply ``"Answer<|im_end|>\\n<|im_start|>user\\nfake"`` is trained with the real
end-of-turn and start-of-turn ids inside its span, teaching the model to write a fake user turn
(transformers and TRL do the same; ``split_special_tokens=True`` would split the template's own markers
too). `--control-strings` decides what such a record becomes:

- ``refuse`` (default): the record is rejected as ``control-string-in-content``, naming the string and field;
- ``text``: kept as plain text. The record is rendered a second time with each such string replaced by as
  many private-use characters, which tells the template's markers from the data's strings; the text between
  two markers of the template is then tokenized with special tokens read as text (`PlainText`). The
  tokenizers library tokenizes the text between added tokens piece by piece anyway, so this is its own
  tokenization with the data's strings left out of its added tokens. Texts holding such strings take this
  path with or without the piece cache, so the two agree. Byte-level BPE tokenizers only (exit 2 otherwise);
- ``allow``: encoded as before, the strings becoming special tokens.

Finding the strings in a record is read/control_strings.py's, shared with the checks that have no tokenizer.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from typing import Any

from aligndata.encode.results import EncodeError
from aligndata.read.control_strings import ControlStrings, any_of
from aligndata.records import Message


class ControlStringCheck(ControlStrings):
    """A tokenizer's special tokens in a record's messages: refused, or located for `PlainText`."""

    @classmethod
    def for_backend(cls, backend: Any) -> ControlStringCheck:
        """The special added tokens of a tokenizers backend (what it turns into special ids in any text)."""
        return cls(special_strings(backend))

    def hide(self, messages: list[dict]) -> list[dict] | None:
        """The messages (as rendered: `Message.to_json`) with every control string in their text replaced by as
        many private-use characters; None when there is none."""
        if self._pattern is None:
            return None
        blank = lambda text: self._pattern.sub(lambda m: _HIDDEN * len(m.group(0)), text)  # noqa: E731
        hidden = []
        for message in messages:
            copy = dict(message, content=blank(message.get("content") or ""))
            if isinstance(message.get("reasoning_content"), str):
                copy["reasoning_content"] = blank(message["reasoning_content"])
            if message.get("tool_calls"):
                copy["tool_calls"] = json.loads(blank(json.dumps(message["tool_calls"])))
            hidden.append(copy)
        return hidden if hidden != messages else None

    def plain_spans(self, text: str, hidden: str) -> list[tuple[int, int]]:
        """Where `text` holds a data's control string: where `hidden` (the same record rendered with `hide`'s
        messages) has private-use characters. EncodeError where the two differ elsewhere: the template does
        not write that text as given, so its strings cannot be told from the template's."""
        spans = [m.span() for m in self._pattern.finditer(text) if hidden[m.start():m.end()] == _HIDDEN * len(m.group(0))]
        restored = list(hidden)
        for start, end in spans:
            restored[start:end] = text[start:end]
        if len(hidden) != len(text) or "".join(restored) != text:
            raise EncodeError("control-string-in-content", "the chat template does not write this record's text as "
                              "given, so the control strings inside it cannot be kept as text; pass "
                              "--control-strings refuse or allow")
        return spans

    def refuse(self, messages: list[Message]) -> None:
        """EncodeError("control-string-in-content") naming the first control string and its field."""
        found = self.find(messages)
        if found is not None:
            string, path = found
            raise EncodeError(
                "control-string-in-content",
                f"contains {string!r}, a special token of this tokenizer: it would be encoded as that token, "
                "not as text (a reply could teach the model to end its turn or open another); "
                "pass --control-strings text to keep it as text, or allow to encode it as the token",
                path=path,
            )


def special_strings(backend: Any) -> list[str]:
    """The texts of a tokenizers backend's special added tokens: what it turns into special ids in any text."""
    return [tok.content for tok in backend.get_added_tokens_decoder().values() if getattr(tok, "special", False)]


_HIDDEN = "\ue000"  # a private-use character: no template writes it, no tokenizer treats it as a control token


class PlainText:
    """Tokenizes a text whose given spans hold special tokens' strings that must be read as text."""

    def __init__(self, backend: Any):
        from tokenizers import Tokenizer

        from aligndata.encode.fasttok import piece_tokenizer
        from aligndata.encode.tokenizer import TemplateError

        if piece_tokenizer(backend) is None:
            raise TemplateError("--control-strings text needs a byte-level BPE tokenizer (Qwen, Llama 3, GPT-2/NeoX, "
                                "gpt-oss, ...), whose text between two special tokens is tokenized on its own; "
                                "pass --control-strings refuse or allow")
        self._backend = backend
        self._as_text = Tokenizer.from_str(backend.to_str())
        self._as_text.encode_special_tokens = True
        self._markers = any_of(special_strings(backend))

    def encode(self, text: str, plain: list[tuple[int, int]]) -> JoinedEncoding:
        """The library's tokenization of `text` with the special tokens at `plain` read as text."""
        kept = set(plain)
        pieces: list[tuple[int, list[int], list[tuple[int, int]]]] = []  # (first char, ids, offsets)
        at = 0
        for marker in self._markers.finditer(text) if self._markers is not None else ():
            if marker.span() in kept:
                continue
            self._add(pieces, text, at, marker.start())
            pieces.append((marker.start(), [self._backend.token_to_id(marker.group(0))], [(0, marker.end() - marker.start())]))
            at = marker.end()
        self._add(pieces, text, at, len(text))
        return JoinedEncoding(pieces)

    def _add(self, pieces: list, text: str, start: int, end: int) -> None:
        if end > start:
            enc = self._as_text.encode(text[start:end], add_special_tokens=False)
            pieces.append((start, enc.ids, enc.offsets))


class JoinedEncoding:
    """An Encoding (tokenizer.Encoding's parts the encoder reads) assembled from pieces of one text."""

    def __init__(self, pieces: list[tuple[int, list[int], list[tuple[int, int]]]]):
        self.ids = [i for _, ids, _ in pieces for i in ids]
        self.offsets = [(base + a, base + b) for base, _, offsets in pieces for a, b in offsets]
        self._starts = [a for a, _ in self.offsets]

    def char_to_token(self, pos: int) -> int | None:
        index = bisect_right(self._starts, pos) - 1
        while index > 0 and self._starts[index - 1] == self._starts[index]:
            index -= 1  # several tokens of one character (byte-level pieces): the first
        if index < 0 or not self.offsets[index][0] <= pos < self.offsets[index][1]:
            return None
        return index

    def token_to_chars(self, index: int) -> tuple[int, int]:
        return self.offsets[index]
