"""Tokenize rendered texts once each, keeping the map between characters and tokens.

`Tokens` is one rendered text with its ids (the tokenizer's BOS in front when it wants one and the template
did not render it) and its character offsets; `mask` turns character spans into token spans through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aligndata.encode.spans import RenderedDPO
from aligndata.encode.tokenizer import Encoding, TokenizerBackend

if TYPE_CHECKING:
    from aligndata.encode.control import PlainText

Bos = tuple[int | None, str | None]  # (id, text) from tokenizer.bos_to_prepend


class Tokens:
    """One rendered text, tokenized once; `ids` has the tokenizer's BOS in front when it wants one."""

    __slots__ = ("text", "ids", "_encoding", "_shift")

    @property
    def shift(self) -> int:
        return self._shift

    def __init__(self, text: str, encoding: Encoding, bos_id: int | None):
        self.text = text
        self._encoding = encoding
        if bos_id is None:
            self.ids, self._shift = encoding.ids, 0
        else:
            self.ids, self._shift = [bos_id, *encoding.ids], 1

    def token_at(self, pos: int) -> int | None:
        index = self._encoding.char_to_token(pos)
        return None if index is None else index + self._shift

    def chars(self, index: int) -> tuple[int, int]:
        return (0, 0) if index < self._shift else tuple(self._encoding.token_to_chars(index - self._shift))

    def boundary(self, pos: int) -> int | None:
        """Index of the first token at or after char `pos` when `pos` lies between two tokens, else None."""
        if pos >= len(self.text):
            return len(self.ids)
        index = self.token_at(pos)
        if index is None or self.chars(index)[0] != pos:
            return None
        return index

    def describe(self, pos: int) -> str:
        around = f"{self.text[max(0, pos - 30):pos]!r} | {self.text[pos:pos + 30]!r}"
        index = self.token_at(pos)
        if index is None:
            return f"char {pos} ({around}) belongs to no token"
        start, end = self.chars(index)
        return f"token {index} {self.text[start:end]!r} (chars {start}-{end}) straddles char {pos} ({around})"


class _SharedTokens(Tokens):
    """prompt+rejected as the chosen side's tokens before char `split` plus the tail tokenized from there."""

    __slots__ = ("_prefix", "_split", "_reused")

    def __init__(self, text: str, prefix: Tokens, split: int, reused: int, tail: Encoding):
        self.text = text
        self._prefix, self._split, self._reused = prefix, split, reused
        self._encoding = tail
        self._shift = prefix.shift
        self.ids = prefix.ids[:reused] + tail.ids

    def token_at(self, pos: int) -> int | None:
        if pos < self._split:
            return self._prefix.token_at(pos)
        index = self._encoding.char_to_token(pos - self._split)
        return None if index is None else index + self._reused

    def chars(self, index: int) -> tuple[int, int]:
        if index < self._reused:
            return self._prefix.chars(index)
        start, end = self._encoding.token_to_chars(index - self._reused)
        return start + self._split, end + self._split


def tokenize(backend: TokenizerBackend, texts: list[str], bos: Bos) -> list[Tokens]:
    """All texts in one call to the tokenizer."""
    if not texts:
        return []
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    return [Tokens(text, enc, _bos_for(text, bos)) for text, enc in zip(texts, encodings)]


def tokenize_keeping_text(
    backend: TokenizerBackend, plain_text: PlainText, texts: list[str], plain: list[list[tuple[int, int]] | None],
    bos: Bos,
) -> list[Tokens]:
    """As `tokenize`; a text with `plain` spans (a data's control strings kept as text) through `plain_text`."""
    ordinary = iter(tokenize(backend, [text for text, spans in zip(texts, plain) if not spans], bos))
    return [Tokens(text, plain_text.encode(text, spans), _bos_for(text, bos)) if spans else next(ordinary)
            for text, spans in zip(texts, plain)]


def tokenize_sharing_prompt(
    backend: TokenizerBackend, split_ids: frozenset[int] | None, bos: Bos,
    rendered: list[RenderedDPO], chosen: list[Tokens],
) -> list[Tokens]:
    """Tokenize prompt+rejected, re-using the prompt tokens of prompt+chosen up to the prompt's last
    added (special) token.

    The tokenizers library splits its input on added tokens before normalizing, pre-tokenizing and
    running the model, and tokenizes the pieces independently: so tokenize(A + S + B) equals
    tokenize(A) + tokenize(S + B) when S is an added token. The rejected side therefore only needs
    S + the rest of the prompt + the completion tokenized (starting the tail *with* S keeps
    position-dependent rules such as Metaspace's prepend-first identical). Tokenizers with
    `single_word` added tokens (whose matching looks at the neighbouring characters) take the full path:
    `split_ids` (tokenizer.prompt_split_ids) is None for them.
    """
    tails: list[tuple[int, int]] = []  # (split char, prompt tokens re-used) per pair
    texts = []
    for pair, tokens in zip(rendered, chosen):
        split, reused = (0, 0)
        if split_ids is not None:
            split, reused = _prompt_split(pair, tokens, split_ids)
        tails.append((split, reused))
        texts.append(pair.texts[1][split:])
    if not texts:
        return []
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    out = []
    for pair, tokens, (split, reused), encoding in zip(rendered, chosen, tails, encodings):
        if reused == 0:
            out.append(Tokens(pair.texts[1], encoding, _bos_for(pair.texts[1], bos)))
        else:
            out.append(_SharedTokens(pair.texts[1], tokens, split, reused, encoding))
    return out


def _prompt_split(pair: RenderedDPO, tokens: Tokens, split_ids: frozenset[int]) -> tuple[int, int]:
    """(char, token index) where the last added token inside the prompt starts; (0, 0) if none."""
    end = tokens.token_at(pair.prompt_length - 1) if pair.prompt_length else None
    if end is None:
        return 0, 0
    ids = tokens.ids
    for index in range(end, tokens.shift - 1, -1):
        if ids[index] in split_ids:
            start = tokens.chars(index)[0]
            if pair.texts[1][:start] != pair.texts[0][:start]:
                return 0, 0
            return start, index
    return 0, 0


def _bos_for(text: str, bos: Bos) -> int | None:
    """The BOS id to put in front of `text`'s tokens: None where there is none or the template rendered it."""
    bos_id, bos_text = bos
    return bos_id if bos_id is not None and not text.startswith(bos_text) else None
