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
- Spot checks: the first 32 texts and every 128th after are also tokenized by the library and compared,
  ids and offsets; a difference stops the run with `TokenizerMismatch` naming the text. The checks are
  a sample: they are there to catch a case the guards above missed (tests/aligndata/test_fasttok.py
  compares every text of its random and real corpora, and none differs). `--no-fast-tokenize` (convert)
  uses the library for every text.

Where pieces rarely repeat (Chinese or Japanese sentences are single pieces) the cache costs more than
it saves; batch after batch of mostly new pieces sends the next batches straight to the library.
"""

from __future__ import annotations

import json
import unicodedata
from bisect import bisect_right
from itertools import accumulate, chain
from typing import Any

import regex

from aligndata.encode.tokenizer import TemplateError

# The expression of ByteLevel(use_regex=True), as in the tokenizers library (GPT-2's).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
NORMAL_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
CHECK_FIRST = 32
CHECK_EVERY = 128
CACHE_LIMIT = 1 << 20  # pieces; the cache is emptied when it grows past this
MISS_LIMIT = 0.25  # after MISSED_BATCHES batches in a row with more new pieces than this share of their
MISSED_BATCHES = 2  # pieces, the next BYPASS_BATCHES batches go to the library (doubling while it lasts)
BYPASS_BATCHES = 8
# How a probed character c is pre-tokenized here tells its classes apart in any of the expressions:
# next to letters (is it one?), digits (a number?), spaces (does it take the space in front, or is it
# one?), in a run of itself, after an apostrophe (a contraction letter under (?i)?), around line breaks.
_PROBE = "a{c}a 7{c}7 {c} '{c} {c}{c}\n{c}a {c}.\n\n{c}  '{c}{c}é"
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
    if compiled.match("") is not None:  # an expression that can match nothing: the two engines' empty
        return None                      # matches need not agree
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


def _unsplit(text: str) -> list[str]:
    return [text]


class PieceTokenizer:
    """A `tokenizers.Tokenizer` behind a piece cache, as the encoder calls it (tokenizer.TokenizerBackend)."""

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
        self._learnt: list[str] = []  # pieces learnt here since the last export_learnt()
        # Probe verdicts per character, shared by every PieceTokenizer with the same expression.
        self._safe, self._unsafe = _VERDICTS.setdefault(self._pattern, (set(), set()))
        self.texts = 0  # texts encoded (through either path)
        self.fallbacks = 0  # of them, tokenized by the library because a guard said so
        self.bypassed = 0  # of them, tokenized by the library because the cache was not paying off
        self.checked = 0  # spot checks made
        self._bypass = 0
        self._misses = 0
        specials = [(content, i) for i, content, normalized in added if not normalized and content]
        self._separator = min(specials, key=lambda s: (len(s[0]), s[0])) if specials else None
        ascii_chars = [chr(i) for i in range(128)]
        self._probe(ascii_chars)
        self._ascii_ok = self._safe.issuperset(ascii_chars)

    # ---- the encoder's interface (tokenizer.TokenizerBackend) ---------------------------------

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[Any]:
        """The library's ids and offsets for `texts`, as PieceEncodings where the cache can serve a text.

        Steps: split each text into pieces (added tokens split off, normal form and characters checked,
        pre-tokenized) and look them up; tokenize the unseen pieces with the library, each alone; assemble
        each text's encoding from its pieces; the library tokenizes the texts a guard refused; spot-check.
        """
        if add_special_tokens:
            return self.backend.encode_batch(texts, add_special_tokens=True)
        if self._bypass > 0:
            return self._bypassed(texts)
        plans, library, missing, total = self._look_up(texts)
        spans = self._spans  # what the texts found whole were looked up in (learning may empty the cache)
        if missing:
            self._learn_batch(missing, total)
        out = self._assemble(plans, library, len(texts), spans)
        self._library_encode(texts, library, out)
        self._spot_check(texts, out, set(library))
        return out

    def get_added_tokens_decoder(self) -> dict[int, Any]:
        return self.backend.get_added_tokens_decoder()

    # ---- encode_batch, step by step -----------------------------------------------------------

    def _bypassed(self, texts: list[str]) -> list[Any]:
        """The whole batch through the library, while the cache is not paying off (see _learn_batch)."""
        self._bypass -= 1
        self.texts += len(texts)
        self.bypassed += len(texts)
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def _look_up(self, texts: list[str]) -> tuple[list[tuple[int, list[str], list[Any]]], list[int], set[str], int]:
        """Split every text into pieces and look them up: (index, pieces, cache entries with None where
        missing) per text the cache can serve, the indices of the others, the missing pieces, the pieces."""
        plans: list[tuple[int, list[str], list[Any]]] = []
        library: list[int] = []
        missing: set[str] = set()
        get = self._ids.get
        total = 0
        for i, text in enumerate(texts):
            pieces = self._pieces(text)
            if pieces is None:
                library.append(i)
                continue
            total += len(pieces)
            entries = list(map(get, pieces))
            if None in entries:
                missing.update(pieces)
            plans.append((i, pieces, entries))
        return plans, library, missing, total

    def _pieces(self, text: str) -> list[str] | None:
        """The pre-tokenized pieces of `text` with its added tokens, or None where the library must do it."""
        ascii_text = text.isascii()
        if not (ascii_text and self._ascii_ok) and not self._chars_ok(text):
            return None
        check_form = self._form is not None and not ascii_text
        segments = [text] if self._split_raw is None else self._split_raw(text)
        if len(segments) == 1 and self._split_normalized is None and not check_form:
            return self._findall(text)
        pieces: list[str] = []
        findall = self._findall
        split_normalized = self._split_normalized or _unsplit
        for k, segment in enumerate(segments):  # odd places: an added token, split off the raw text
            if k & 1:
                pieces.append(segment)
            elif segment:
                if check_form and not unicodedata.is_normalized(self._form, segment):
                    return None
                for k2, part in enumerate(split_normalized(segment)):  # the same for normalized added tokens
                    if k2 & 1:
                        pieces.append(part)
                    elif part:
                        pieces += findall(part)
        return pieces

    def _learn_batch(self, missing: set[str], total: int) -> None:
        """Learn the batch's new pieces; after batches of mostly new pieces, bypass the cache for a while."""
        ids, bad = self._ids, self._bad_pieces
        new = {p for p in missing if p not in ids and p not in bad}
        self._learn(new)
        if len(new) > MISS_LIMIT * total and len(new) > 64:
            # Text that rarely repeats a piece (Chinese sentences are single pieces): when the cache
            # keeps missing, the library takes the next batches whole, more of them each time.
            self._misses += 1
            if self._misses >= MISSED_BATCHES:
                self._bypass = BYPASS_BATCHES << min(self._misses - MISSED_BATCHES, 4)
        else:
            self._misses = 0

    def _learn(self, missing: set[str]) -> None:
        """Tokenize unseen pieces with the library, each alone; cache those the library keeps whole.

        The pieces go in as one text joined by an added token: the library splits on added tokens
        before anything else and pre-tokenizes and tokenizes each part alone, so this is each piece
        alone, in one call (one Encoding, not one per piece). A piece whose tokens carry more than
        one word index was pre-tokenized further when alone and is never cached."""
        if len(self._ids) + len(missing) > CACHE_LIMIT:
            self._ids = dict(self._added_ids)
            self._spans = dict(self._added_spans)
            self._learnt = []
        pieces = sorted(missing)
        if self._separator is None:
            parts = [(e.ids, e.offsets, e.word_ids) for e in self.backend.encode_batch(pieces, add_special_tokens=False)]
        else:
            parts = self._encode_joined(pieces)
        ids_cache, spans_cache, bad = self._ids, self._spans, self._bad_pieces
        for piece, (ids, offsets, words) in zip(pieces, parts):
            if words and words[0] != words[-1]:
                bad.add(piece)
                continue
            ids_cache[piece] = tuple(ids)
            spans_cache[piece] = tuple(offsets)
            self._learnt.append(piece)

    def _encode_joined(self, pieces: list[str]) -> list[tuple[list[int], list[tuple[int, int]], list[int]]]:
        sep, sep_id = self._separator
        encoding = self.backend.encode(sep.join(pieces), add_special_tokens=False)
        ids, offsets, words = encoding.ids, encoding.offsets, encoding.word_ids
        out = []
        t, n, start = 0, len(ids), 0
        for piece in pieces:
            end = start + len(piece)
            first = t
            while t < n and offsets[t][0] < end:
                t += 1
            out.append((ids[first:t], [(a - start, b - start) for a, b in offsets[first:t]], words[first:t]))
            if t < n:  # the separator token
                if ids[t] != sep_id or offsets[t] != (end, end + len(sep)):
                    raise TokenizerMismatch(f"internal check failed: the added token {sep!r} did not separate the "
                                            "pieces; rerun with --no-fast-tokenize, and please report this")
                t += 1
            start = end + len(sep)
        return out

    def _assemble(self, plans: list[tuple[int, list[str], list[Any]]], library: list[int], n: int,
                  looked_up_in: dict) -> list[Any]:
        """A PieceEncoding per planned text from the cache; a text with a piece the library would split
        when alone (never cached) joins `library`. A text found whole at look-up keeps the span cache it
        was found in (`looked_up_in`): when learning emptied the cache, the new one lacks its pieces."""
        out: list[Any] = [None] * n
        get = self._ids.get  # after _learn: an emptied cache is a new dict
        for i, pieces, entries in plans:
            spans = looked_up_in
            if None in entries:
                entries = list(map(get, pieces))
                spans = self._spans
                if None in entries:
                    library.append(i)
                    continue
            out[i] = PieceEncoding(list(chain.from_iterable(entries)), pieces, entries, spans)
        return out

    def _library_encode(self, texts: list[str], library: list[int], out: list[Any]) -> None:
        """The texts the guards or the cache sent to the library, in one call."""
        if library:
            for i, encoding in zip(library, self.backend.encode_batch([texts[i] for i in library],
                                                                       add_special_tokens=False)):
                out[i] = encoding
        self.fallbacks += len(library)

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


    # ---- guards -------------------------------------------------------------------------------

    def _agree(self, probe: str) -> bool:
        ours = [m.span() for m in self._finditer(probe)]
        return ours == [span for _, span in self.backend.pre_tokenizer.pre_tokenize_str(probe)]

    def _probe(self, chars: set[str] | list[str]) -> None:
        """Sort new characters into safe and unsafe: do both engines pre-tokenize each of them alike
        between letters, digits, spaces, line breaks, apostrophes (contractions) and punctuation?
        All of them in one probe text (_PROBE per character, joined); only when that differs, one
        character at a time."""
        chars = sorted(set(chars) - self._safe - self._unsafe)
        if not chars:
            return
        probes = [_PROBE.format(c=c) for c in chars]
        if self._agree("\n".join(probes)):
            self._safe.update(chars)
            return
        for c, probe in zip(chars, probes):
            (self._safe if self._agree(probe) else self._unsafe).add(c)

    def _chars_ok(self, text: str) -> bool:
        """Are all characters of `text` probed safe? Probes the new ones."""
        chars = set(text)
        if chars <= self._safe:
            return True
        self._probe(chars)
        return chars <= self._safe

    # ---- sharing the cache between processes --------------------------------------------------

    def export_learnt(self) -> dict[str, tuple[tuple[int, ...], tuple[tuple[int, int], ...]]]:
        """The pieces learnt here since the last call, with their ids and spans, for `import_learnt` in
        another process with the same tokenizer (convert's workers learn the common pieces once, not
        once per process)."""
        learnt, self._learnt = self._learnt, []
        ids, spans = self._ids, self._spans
        return {piece: (ids[piece], spans[piece]) for piece in learnt}

    def import_learnt(self, pieces: dict[str, tuple[tuple[int, ...], tuple[tuple[int, int], ...]]]) -> None:
        """Add pieces exported by another PieceTokenizer over the same tokenizer (not exported again)."""
        if len(self._ids) + len(pieces) > CACHE_LIMIT:
            return  # a full cache: learning them again is only slower
        ids, spans = self._ids, self._spans
        for piece, (piece_ids, piece_spans) in pieces.items():
            if piece not in ids:
                ids[piece] = piece_ids
                spans[piece] = piece_spans


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
