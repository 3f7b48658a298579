"""The length policy: what becomes of an encoded record longer than max_length.

"drop" refuses it ("too-long"). "truncate" drops the oldest exchanges first (the system message kept),
re-encoding the shorter conversation through the caller's `encode` so that its mask stays exact, and cuts
tokens at the right only when that is not enough. DPO truncates as the original DPO code does: the prompt to
max_prompt_length (oldest turns first, then cut from the left), then both completions at the right.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from aligndata.encode.results import EncodedDPO, EncodedSFT, EncodeError

def fit_sft(
    enc: EncodedSFT, messages: list[dict], encode: Callable[[list[dict]], EncodedSFT], *,
    max_length: int | None, length_policy: str,
) -> EncodedSFT:
    """`enc` within max_length under the policy; `encode` encodes a shorter version of `messages`."""
    limit = max_length
    if limit is not None and len(enc.input_ids) > limit:
        if length_policy == "drop":
            raise EncodeError("too-long", f"{len(enc.input_ids)} tokens > max_length {limit}",
                              length=len(enc.input_ids))
        enc = _truncate_sft(messages, encode, limit)
    if not any(enc.loss_mask):
        raise EncodeError("no-trained-tokens", "no token of this conversation is trained")
    return enc


def _truncate_sft(messages: list[dict], encode: Callable[[list[dict]], EncodedSFT], limit: int) -> EncodedSFT:
    """Drop the oldest exchanges (keeping the system message) until it fits, else cut at the right."""
    enc = None
    for shorter in _shorter_conversations(messages):
        enc = encode(shorter)
        enc.truncated = "prompt"
        if len(enc.input_ids) <= limit:
            return enc
    if enc is None:  # nothing to drop
        enc = encode(messages)
    return EncodedSFT(enc.input_ids[:limit], enc.loss_mask[:limit], "completion")


def fit_dpo(
    enc: EncodedDPO, prompt: list[dict], encode: Callable[[list[dict]], EncodedDPO], *,
    max_length: int | None, max_prompt_length: int | None, length_policy: str,
) -> EncodedDPO:
    """`enc` within max_length under the policy; `encode` encodes the pair with a shorter `prompt`."""
    limit = max_length
    if limit is not None and _dpo_length(enc) > limit:
        if length_policy == "drop":
            raise EncodeError(
                "too-long",
                f"prompt {len(enc.prompt_ids)} + longest completion "
                f"{max(len(enc.chosen_ids), len(enc.rejected_ids))} tokens > max_length {limit}",
                length=_dpo_length(enc),
            )
        enc = _truncate_dpo(enc, prompt, encode, limit, max_prompt_length)
    if not enc.chosen_ids or not enc.rejected_ids:
        raise EncodeError("no-trained-tokens", "a completion has no tokens")
    return enc


def _truncate_dpo(
    enc: EncodedDPO, prompt: list[dict], encode: Callable[[list[dict]], EncodedDPO], limit: int,
    prompt_limit: int | None,
) -> EncodedDPO:
    """As the original DPO code: prompt to max_prompt_length (oldest turns first), then cut completions."""
    if prompt_limit is not None and len(enc.prompt_ids) > prompt_limit:
        for shorter in _shorter_prompts(prompt):
            enc = encode(shorter)
            if len(enc.prompt_ids) <= prompt_limit:
                break
        if len(enc.prompt_ids) > prompt_limit:
            enc.prompt_ids = enc.prompt_ids[-prompt_limit:]
        enc.truncated = "prompt"
    if _dpo_length(enc) > limit:
        room = limit - len(enc.prompt_ids)
        if room <= 0:
            raise EncodeError(
                "too-long",
                f"the prompt alone has {len(enc.prompt_ids)} tokens >= max_length {limit}; "
                "set max_prompt_length to truncate it",
            )
        enc.chosen_ids = enc.chosen_ids[:room]
        enc.rejected_ids = enc.rejected_ids[:room]
        enc.truncated = "completion"
    return enc


def _dpo_length(enc: EncodedDPO) -> int:
    """What max_length bounds for a pair: the prompt plus the longer completion."""
    return len(enc.prompt_ids) + max(len(enc.chosen_ids), len(enc.rejected_ids))


def _shorter_conversations(messages: list[dict]) -> Iterator[list[dict]]:
    """The conversation starting at each later user message (oldest dropped first), system message kept."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    last_assistant = max((j for j, m in enumerate(body) if m["role"] == "assistant"), default=-1)
    for j, message in enumerate(body):
        if 0 < j < last_assistant and message["role"] == "user":
            yield head + body[j:]


def _shorter_prompts(messages: list[dict]) -> Iterator[list[dict]]:
    """The prompt starting at each later user message, system kept; finally the last exchange without it."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    starts = [j for j, m in enumerate(body) if j > 0 and m["role"] == "user"]
    for j in starts:
        yield head + body[j:]
    if head:
        yield body[starts[-1]:] if starts else body
