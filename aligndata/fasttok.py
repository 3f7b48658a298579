"""Byte-level BPE tokenization with a piece cache: the tokenizers library's ids and offsets, 3-4x faster.

The tokenizers library turns a text into tokens in stages: split off added (special) tokens, normalize,
pre-tokenize with a regular expression into pieces, run BPE on each piece, assemble an Encoding. For
byte-level BPE models (GPT-2, GPT-NeoX, Llama 3, Qwen 2/2.5/3, ...) the tokens of a piece depend on the
piece alone, and chat data repeats the same pieces (" the", "<|im_start|>", "assistant") endlessly. So
`PieceTokenizer` splits off added tokens and pre-tokenizes with the tokenizer's own expression (compiled
by the `regex` module), looks every piece up in a cache, and hands the library only the pieces it has
not seen yet. Most of the work then happens in C (`findall`, dict lookups, `chain`); the library's
per-text pipeline is what it saves.

It must give exactly the library's ids and offsets, so it is used only where that is known to hold and
checked where it is not provable up front:

- Shape: only for tokenizers whose JSON says BPE without dropout; a ByteLevel pre-tokenizer with GPT-2's
  expression, or a regex Split (isolated) followed by ByteLevel without its expression, neither adding a
  prefix space; no normalizer or a Unicode normal form; added tokens without lstrip/rstrip/single_word
  and not split as text. Any other tokenizer tokenizes every text with the library.
- Added tokens are split off as the library does: the non-normalized ones first, then the normalized
  ones, each pass leftmost-longest.
- Normal form: a text segment that the normalizer would change goes to the library whole.
- The expression: Oniguruma (in the library) and `regex` (here) must agree on its character classes.
  Every ASCII character is probed when the tokenizer is loaded, every other character before its first
  use: the two engines pre-tokenize the character in many contexts and must split identically. A text
  holding a character where they do not goes to the library.
- A piece's ids and offsets come from the library, tokenizing the piece alone; a piece that the
  library's pre-tokenizer would split further when alone (possible with look-around expressions) is
  never cached, and texts holding it go to the library.
- Spot checks: the first 64 texts and every 128th after are also tokenized by the library and compared,
  ids and offsets. A difference stops the run with `TokenizerMismatch` naming the text; nothing is ever
  silently tokenized differently. `--no-fast-tokenize` (convert) uses the library for every text.
"""

from __future__ import annotations

import json
import unicodedata
from bisect import bisect_right
from itertools import accumulate, chain
from typing import Any

import regex

from .templates import TemplateError

# The expression of ByteLevel(use_regex=True), as in the tokenizers library (GPT-2's).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
NORMAL_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
CHECK_FIRST = 64
CHECK_EVERY = 128
CACHE_LIMIT = 1 << 20  # pieces; the cache is emptied when it grows past this
# Neighbours a probed character is pre-tokenized between: letters, digits, spaces, newlines, apostrophes
# with each contraction's first letter, punctuation, and non-ASCII letters/digits/punctuation.
_CONTEXTS = ("", "a", "7", " ", "  ", "\n", "\r\n", "'s", "'LL", ".", "é", "\u00a0")
_VERDICTS: dict[str, tuple[set[str], set[str]]] = {}


class TokenizerMismatch(TemplateError):
    """The piece cache and the tokenizers library disagree on a text (a bug: please report it)."""


def piece_tokenizer(backend: Any) -> "PieceTokenizer | None":
    """A PieceTokenizer over `backend` (a `tokenizers.Tokenizer`), or None where it would not be exact."""
    try:
        pattern = _pattern(_state(backend.pre_tokenizer))
        form = _normal_form(_state(backend.normalizer))
        model = backend.model
        added = list(backend.get_added_tokens_decoder().items())
    except Exception:  # noqa: BLE001 - a tokenizer we cannot inspect is simply not accelerated
        return None
    if pattern is None or form is False or type(model).__name__ != "BPE" or getattr(model, "dropout", None):
        return None
    if getattr(backend, "encode_special_tokens", False):
        return None
    if any(t.lstrip or t.rstrip or t.single_word for _, t in added):
        return None
    try:
        compiled = regex.compile(pattern)
    except regex.error:
        return None
    return PieceTokenizer(backend, compiled, form, [(i, t.content, t.normalized) for i, t in added])


def _state(component: Any) -> Any:
    return None if component is None else json.loads(component.__getstate__())


def _pattern(pre: Any) -> str | None:
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers") or []) != 2:
        return None
    split, byte_level = pre["pretokenizers"]
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True) or byte_level.get("add_prefix_space"):
        return None
    expr = split.get("pattern") or {}
    return expr.get("Regex") if isinstance(expr.get("Regex"), str) else None


def _normal_form(normalizer: Any) -> str | None | bool:
    """None (no normalizer), a normal form's name, or False (a normalizer this module cannot vouch for)."""
    if normalizer is None:
        return None
    if isinstance(normalizer, dict) and normalizer.get("type") in NORMAL_FORMS:
        return normalizer["type"]
    return False


def _splitter(contents: list[str]) -> Any:
    """re.split-like function for the added tokens, leftmost-longest (alternatives longest first)."""
    if not contents:
        return None
    alternatives = "|".join(regex.escape(c) for c in sorted(set(contents), key=lambda c: (-len(c), c)))
    return regex.compile(f"({alternatives})").split


class PieceTokenizer:
    """Drop-in for the `encode_batch(texts, add_special_tokens=False)` of a `tokenizers.Tokenizer`."""

    def __init__(self, backend: Any, pattern: Any, form: str | None, added: list[tuple[int, str, bool]]):
        self.backend = backend
        self._pattern = pattern.pattern
        self._findall = pattern.findall
        self._finditer = pattern.finditer
        self._form = form
        self._split_raw = _splitter([content for _, content, normalized in added if not normalized])
        self._split_normalized = _splitter([content for _, content, normalized in added if normalized])
        self._added_ids = {content: (i,) for i, content, _ in added}
        self._added_spans = {content: ((0, len(content)),) for _, content, _ in added}
        self._ids: dict[str, tuple[int, ...]] = dict(self._added_ids)
        self._spans: dict[str, tuple[tuple[int, int], ...]] = dict(self._added_spans)
        self._bad_pieces: set[str] = set()
        # Probe verdicts per character, shared by every PieceTokenizer with the same expression.
        self._safe, self._unsafe = _VERDICTS.setdefault(self._pattern, (set(), set()))
        self.texts = 0  # texts encoded (through either path)
        self.fallbacks = 0  # of them, tokenized by the library because a guard said so
        self.checked = 0  # spot checks made
        self._ascii_ok = all([self._probe(chr(i)) for i in range(128)])

    def __getattr__(self, name: str) -> Any:  # everything else is the library's
        return getattr(self.backend, name)

    # ---- guards -------------------------------------------------------------------------------

    def _probe(self, char: str) -> bool:
        """Do both engines pre-tokenize `char` alike in every context? Remembered per character."""
        if char in self._safe:
            return True
        if char in self._unsafe:
            return False
        probe = "\n".join([left + char + right for left in _CONTEXTS for right in _CONTEXTS]
                          + [char * 3, f" {char}{char} x", f"{char}'s {char}'S"])
        ours = [m.span() for m in self._finditer(probe)]
        theirs = [span for _, span in self.backend.pre_tokenizer.pre_tokenize_str(probe)]
        ok = ours == theirs
        (self._safe if ok else self._unsafe).add(char)
        return ok

    def _chars_ok(self, text: str) -> bool:
        """Are all characters of `text` probed safe? Probes the new ones."""
        chars = set(text)
        if chars <= self._safe:
            return True
        for char in chars.difference(self._safe):
            if not self._probe(char):
                return False
        return True

    # ---- encoding -----------------------------------------------------------------------------

    def _pieces(self, text: str) -> list[str] | None:
        """The pre-tokenized pieces of `text` with its added tokens, or None where the library must do it."""
        ascii_text = text.isascii()
        if not (ascii_text and self._ascii_ok) and not self._chars_ok(text):
            return None
        check_form = self._form is not None and not ascii_text
        if self._split_raw is None:
            segments = [text]
        else:
            segments = self._split_raw(text)
        if len(segments) == 1 and self._split_normalized is None and not check_form:
            return self._findall(text)
        pieces: list[str] = []
        findall = self._findall
        for k, segment in enumerate(segments):
            if k & 1:
                pieces.append(segment)
                continue
            if not segment:
                continue
            if check_form and not unicodedata.is_normalized(self._form, segment):
                return None
            if self._split_normalized is None:
                pieces += findall(segment)
                continue
            for k2, part in enumerate(self._split_normalized(segment)):
                if k2 & 1:
                    pieces.append(part)
                elif part:
                    pieces += findall(part)
        return pieces

    def _learn(self, missing: set[str]) -> None:
        """Tokenize unseen pieces with the library, each alone; cache those the library keeps whole."""
        if len(self._ids) + len(missing) > CACHE_LIMIT:
            self._ids = dict(self._added_ids)
            self._spans = dict(self._added_spans)
        pieces = sorted(missing)
        for piece, encoding in zip(pieces, self.backend.encode_batch(pieces, add_special_tokens=False)):
            words = encoding.word_ids
            if words and words[-1] != 0:  # pre-tokenized into more than one piece when alone
                self._bad_pieces.add(piece)
                continue
            self._ids[piece] = tuple(encoding.ids)
            self._spans[piece] = tuple(encoding.offsets)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[Any]:
        if add_special_tokens:
            return self.backend.encode_batch(texts, add_special_tokens=True)
        out: list[Any] = [None] * len(texts)
        library: list[int] = []
        plans: list[tuple[int, list[str], list[Any]]] = []
        missing: set[str] = set()
        get = self._ids.get
        for i, text in enumerate(texts):
            pieces = self._pieces(text)
            if pieces is None:
                library.append(i)
                continue
            entries = list(map(get, pieces))
            if None in entries:
                missing.update(pieces)
            plans.append((i, pieces, entries))
        if missing:
            ids, bad = self._ids, self._bad_pieces
            self._learn({p for p in missing if p not in ids and p not in bad})
            get = self._ids.get
        for i, pieces, entries in plans:
            if None in entries:
                entries = list(map(get, pieces))
                if None in entries:  # a piece the library would split when alone
                    library.append(i)
                    continue
            out[i] = PieceEncoding(list(chain.from_iterable(entries)), pieces, entries, self._spans)
        if library:
            for i, encoding in zip(library, self.backend.encode_batch([texts[i] for i in library],
                                                                       add_special_tokens=False)):
                out[i] = encoding
        self.fallbacks += len(library)
        self._spot_check(texts, out, set(library))
        return out

    def _spot_check(self, texts: list[str], out: list[Any], library: set[int]) -> None:
        base = self.texts
        self.texts += len(texts)
        picked = [i for i in range(len(texts))
                  if i not in library and (base + i < CHECK_FIRST or (base + i) % CHECK_EVERY == 0)]
        if not picked:
            return
        self.checked += len(picked)
        for i, reference in zip(picked, self.backend.encode_batch([texts[i] for i in picked], add_special_tokens=False)):
            ours = out[i]
            if ours.ids != reference.ids or ours.offsets != reference.offsets:
                raise TokenizerMismatch(_describe_mismatch(texts[i], base + i + 1, ours, reference))


def _describe_mismatch(text: str, number: int, ours: "PieceEncoding", reference: Any) -> str:
    a, b = list(zip(ours.ids, ours.offsets)), list(zip(reference.ids, reference.offsets))
    at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    where = reference.offsets[at][0] if at < len(b) else len(text)
    return (f"internal check failed: the piece cache tokenized text {number} differently from the tokenizers "
            f"library (token {at}, near {text[max(0, where - 20):where + 20]!r}: {a[at:at + 3]} vs {b[at:at + 3]}); "
            "rerun with --no-fast-tokenize, and please report this with the tokenizer")


class PieceEncoding:
    """The parts of `tokenizers.Encoding` aligndata uses: ids, offsets, char_to_token, token_to_chars."""

    __slots__ = ("ids", "_pieces", "_entries", "_spans", "_starts", "_token_starts")

    def __init__(self, ids: list[int], pieces: list[str], entries: list[tuple[int, ...]], spans: dict):
        self.ids = ids
        self._pieces = pieces
        self._entries = entries
        self._spans = spans  # the owner's span cache; a piece's spans are looked up lazily
        self._starts: list[int] | None = None

    def _index(self) -> None:
        if self._starts is None:
            self._starts = list(accumulate(map(len, self._pieces), initial=0))
            self._token_starts = list(accumulate(map(len, self._entries), initial=0))

    def _piece_spans(self, k: int) -> tuple[tuple[int, int], ...]:
        # The dict this encoding was made with: an emptied cache is replaced, never cleared in place.
        return self._spans[self._pieces[k]]

    def char_to_token(self, pos: int) -> int | None:
        self._index()
        k = bisect_right(self._starts, pos) - 1
        if pos < 0 or k >= len(self._pieces):
            return None
        rel = pos - self._starts[k]
        for j, (start, end) in enumerate(self._piece_spans(k)):
            if start <= rel < end:
                return self._token_starts[k] + j
        return None

    def token_to_chars(self, index: int) -> tuple[int, int]:
        self._index()
        k = bisect_right(self._token_starts, index) - 1
        start, end = self._piece_spans(k)[index - self._token_starts[k]]
        base = self._starts[k]
        return base + start, base + end

    @property
    def offsets(self) -> list[tuple[int, int]]:
        self._index()
        return [(base + s, base + e) for k, base in enumerate(self._starts[:-1]) for s, e in self._piece_spans(k)]
