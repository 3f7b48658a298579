"""Map trained character spans onto the one tokenization: the SFT loss mask, the DPO prompt/completion split.

Both ends of a trained span must fall on token boundaries, otherwise the record is refused
("boundary-mismatch"): a span that starts inside a token would train on a tokenization the model never sees
at generation time. Whitespace before the end (the newline after ``<|im_end|>``) is not trained; the
end-of-turn token itself is. The ends of turns need the tokens too: the trailer and the generation prompt
that `spans` describes start at a whole token, found here.
"""

from __future__ import annotations

from aligndata.encode.results import EncodedDPO, EncodedSFT, EncodeError
from aligndata.encode.spans import RenderedDPO, RenderedSFT, common_prefix_length, first_difference
from aligndata.encode.tokens import Tokens


def sft_mask(rendered: RenderedSFT, tokens: Tokens) -> EncodedSFT:
    """The conversation's ids with 1 on the tokens of each trained assistant turn, 0 elsewhere."""
    ending = _Ending(tokens, rendered.turns[0].start, rendered.before, rendered.opener)
    mask = [0] * len(tokens.ids)
    for turn in rendered.turns:
        what = f"assistant message {turn.index}"
        if turn.continued is None:
            body_end = ending.last_turn_end(tokens.text)
        else:
            body_end = _continued_turn_end(tokens.text, ending.without_prompt(turn.continued), turn.start,
                                           turn.own_start, what)
        first, stop = _token_span(tokens, turn.start, body_end, what)
        mask[first:stop] = [1] * (stop - first)
    return EncodedSFT(tokens.ids, mask)


def dpo_split(rendered: RenderedDPO, chosen: Tokens, rejected: Tokens) -> EncodedDPO:
    """Prompt ids and the two completions' ids; the prompt must tokenize the same before both."""
    cut = rendered.prompt_length
    ending = _Ending(chosen, cut, rendered.before)
    spans = []
    for name, tokens in (("chosen", chosen), ("rejected", rejected)):
        spans.append(_token_span(tokens, cut, ending.last_turn_end(tokens.text), f"the {name} completion"))
    (c_first, c_stop), (r_first, r_stop) = spans
    prompt_ids = chosen.ids[:c_first]
    if rejected.ids[:r_first] != prompt_ids:
        raise EncodeError(
            "boundary-mismatch",
            "the prompt tokenizes differently before the chosen and before the rejected completion "
            f"({_first_id_difference(prompt_ids, rejected.ids[:r_first])})",
        )
    return EncodedDPO(prompt_ids, chosen.ids[c_first:c_stop], rejected.ids[r_first:r_stop])


class _Ending:
    """The trailer and the generation prompt of one record's template (see `spans`), from whole tokens on.

    `before` ends with the trailer where the prompt of the first trained turn (`tokens.text[:prompt_end]`)
    ends with the generation prompt. Where the two begin with the same characters (Phi-3's ``<|endoftext|>``
    and ``<|assistant|>``), a token that covers them on either side, in the prompt or at the end of the
    conversation, tells where they start.
    """

    def __init__(self, tokens: Tokens, prompt_end: int, before: str | None, opener: str = ""):
        self._trailer = self._bare_trailer = self._prompt = ""
        if before is None:  # the template only appends its generation prompt: nothing to tell apart
            return
        full = tokens.text
        prompt = full[:prompt_end]
        parted = common_prefix_length(before, prompt)
        shared = _chars_before_token_start(tokens, parted) if parted < len(before) else 0
        self._bare_trailer = before[parted:]
        trailer_at = len(full) - len(self._bare_trailer)
        if self._bare_trailer and full.endswith(self._bare_trailer):
            at_end = _chars_before_token_start(tokens, trailer_at)
            if full[trailer_at - at_end:trailer_at] == before[parted - at_end:parted]:
                shared = max(shared, at_end)
        self._trailer = before[parted - shared:]
        self._prompt = prompt[parted - shared:] + opener

    def last_turn_end(self, full: str) -> int:
        """Char of `full` where its last message ends: before the trailer, else at the very end."""
        for trailer in (self._trailer, self._bare_trailer):
            if trailer and full.endswith(trailer):
                return len(full) - len(trailer)  # a bare trailer that a token straddles fails in _token_span
        return len(full)

    def without_prompt(self, continued: str) -> str:
        """`continued` less the generation prompt, where it was rendered with one that the template wrote."""
        if continued.endswith(self._prompt):
            return continued[: len(continued) - len(self._prompt)]
        return continued  # the template writes no generation prompt after an assistant turn


def _chars_before_token_start(tokens: Tokens, pos: int) -> int:
    """How far char `pos` lies inside its token (0 on a boundary or outside any token)."""
    index = tokens.token_at(pos)
    return 0 if index is None else max(0, pos - tokens.chars(index)[0])


def _continued_turn_end(full: str, body: str, start: int, own_start: int, what: str) -> int:
    """Char of `full` where a turn that more messages follow ends: `body`, its closing as when more follows.

    Where the template renders the turn otherwise as the last message (Qwen3 gives only the last turn its
    ``<think>`` block), the turn as the full conversation renders it is the longest tail of that rendering
    found at the turn's start: what the template adds to a last turn comes before its reply. `own_start`, where
    the turn starts in `body` when the turns before it are rendered otherwise there (spans._located_start)."""
    if full.startswith(body) and own_start < 0:
        return len(body)
    shared = own_start < 0 and full.startswith(body[:start])
    tail, probe = body[own_start if own_start >= 0 else start:], full[start:start + 1]
    at = tail.find(probe) if probe and (shared or own_start >= 0) else -1
    while at >= 0:
        if full.startswith(tail[at:], start):
            return start + len(tail) - at
        at = tail.find(probe, at + 1)
    raise EncodeError(
        "template-mask",
        f"{what}: rendered as the last message it differs from its rendering inside the "
        f"full conversation ({first_difference(body, full)}); the template renders a turn differently once "
        "later turns exist, so the trained span cannot be located",
    )


def _token_span(tokens: Tokens, start: int, body_end: int, what: str) -> tuple[int, int]:
    """Token indices [first, stop) of chars [start, body_end) less trailing whitespace; both must be boundaries."""
    first = tokens.boundary(start)
    if first is None and tokens.token_at(start) is None and not tokens.text[start:start + 1].isspace():
        raise EncodeError(
            "boundary-mismatch",
            f"the start of {what} is not a token boundary: {tokens.describe(start)}; the tokenizer turns this "
            "text into no tokens at all (its normalizer or pre-tokenizer drops it): check that it is the "
            "tokenizer you meant and that it loads as intended",
        )
    if first is None:
        raise EncodeError(
            "boundary-mismatch",
            f"the start of {what} is not a token boundary: {tokens.describe(start)}; the generation prompt and "
            "the text after it merge into one token, so the prompt tokenized alone would differ",
        )
    end = _strip_end(tokens.text, start, body_end)
    stop = tokens.boundary(end)
    if stop is None:
        # An end-of-turn token declared with rstrip (Phi-3's <|end|>) swallows the newline after it: the
        # token is still the end-of-turn token, so it is trained whole.
        index = tokens.token_at(end)
        if index is not None:
            token_start, token_end = tokens.chars(index)
            if start <= token_start < end and token_end <= body_end and tokens.text[end:token_end].isspace():
                stop = index + 1
    if stop is None:
        raise EncodeError("boundary-mismatch", f"the end of {what} is not a token boundary: {tokens.describe(end)}")
    return first, stop


def _strip_end(text: str, start: int, end: int) -> int:
    """Move `end` back over whitespace (the newline a template puts after its end-of-turn token)."""
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


def _first_id_difference(a: list[int], b: list[int]) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{len(a)} vs {len(b)} tokens, first difference at token {at}: {a[at:at + 5]} vs {b[at:at + 5]}"
