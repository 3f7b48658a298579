"""Map trained character spans onto the one tokenization: the SFT loss mask, the DPO prompt/completion split.

Both ends of a trained span must fall on token boundaries, otherwise the record is refused
("boundary-mismatch"): a span that starts inside a token would train on a tokenization the model never sees
at generation time. Whitespace before the end (the newline after ``<|im_end|>``) is not trained; the
end-of-turn token itself is. The end of a turn needs the tokens too: the trailer that `spans` describes is
widened to whole tokens here before it is taken off.
"""

from __future__ import annotations

from aligndata.encode.results import EncodedDPO, EncodedSFT, EncodeError
from aligndata.encode.spans import RenderedDPO, RenderedSFT, common_prefix_length, first_difference
from aligndata.encode.tokens import Tokens


def sft_mask(rendered: RenderedSFT, tokens: Tokens) -> EncodedSFT:
    """The conversation's ids with 1 on the tokens of each trained assistant turn, 0 elsewhere."""
    trailer = _trailer(tokens, rendered.with_generation_prompt)
    mask = [0] * len(tokens.ids)
    for i, start, upto in rendered.turns:
        body_end = _turn_end(tokens.text, trailer, upto, i)
        first, stop = _token_span(tokens, start, body_end, f"assistant message {i}")
        mask[first:stop] = [1] * (stop - first)
    return EncodedSFT(tokens.ids, mask)


def dpo_split(rendered: RenderedDPO, chosen: Tokens, rejected: Tokens) -> EncodedDPO:
    """Prompt ids and the two completions' ids; the prompt must tokenize the same before both."""
    cut = rendered.prompt_length
    spans = []
    for name, tokens, with_prompt in zip(("chosen", "rejected"), (chosen, rejected), rendered.with_generation_prompt):
        body_end = len(tokens.text) - len(_trailer(tokens, with_prompt))
        spans.append(_token_span(tokens, cut, body_end, f"the {name} completion"))
    (c_first, c_stop), (r_first, r_stop) = spans
    prompt_ids = chosen.ids[:c_first]
    if rejected.ids[:r_first] != prompt_ids:
        raise EncodeError(
            "boundary-mismatch",
            "the prompt tokenizes differently before the chosen and before the rejected completion "
            f"({_first_id_difference(prompt_ids, rejected.ids[:r_first])})",
        )
    return EncodedDPO(prompt_ids, chosen.ids[c_first:c_stop], rejected.ids[r_first:r_stop])


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


def _trailer(tokens: Tokens, with_generation_prompt: str | None) -> str:
    """What the template writes only at the end of a conversation (e.g. Phi-3's EOS), in whole tokens."""
    full = tokens.text
    if with_generation_prompt is None:
        return ""
    common = common_prefix_length(full, with_generation_prompt)
    if common >= len(full):
        return ""
    index = tokens.token_at(common)
    start = common if index is None else min(common, tokens.chars(index)[0])
    return full[start:]


def _turn_end(full: str, trailer: str, upto: str | None, index: int) -> int:
    """Char where assistant message `index` ends in `full` (its end-of-turn included, whitespace not stripped)."""
    if upto is None:  # the last message
        return len(full) - len(trailer)
    body = upto[: len(upto) - len(trailer)] if trailer and upto.endswith(trailer) else upto
    if not full.startswith(body):
        raise EncodeError(
            "template-mask",
            f"assistant message {index}: rendered as the last message it differs from its rendering inside the "
            f"full conversation ({first_difference(body, full)}); the template renders a turn differently once "
            "later turns exist, so the trained span cannot be located",
        )
    return len(body)


def _strip_end(text: str, start: int, end: int) -> int:
    """Move `end` back over whitespace (the newline a template puts after its end-of-turn token)."""
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


def _first_id_difference(a: list[int], b: list[int]) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{len(a)} vs {len(b)} tokens, first difference at token {at}: {a[at:at + 5]} vs {b[at:at + 5]}"
