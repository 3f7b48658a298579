"""Render a record and find where its trained text lies, in characters, by rendering alone.

This works for any template (no ``{% generation %}`` markers needed):

- start of assistant message i: ``len(render(messages[:i], add_generation_prompt=True))``. That rendering
  must be a textual prefix of the full rendering, otherwise the template renders earlier turns differently
  once later turns exist (e.g. it strips reasoning) and the record is refused ("template-mask").
- end: ``render(messages[:i+1])`` must equal the full rendering up to that point, apart from a *trailer* the
  template writes only at the very end of a conversation (Phi-3 appends EOS there). The trailer is found by
  comparing the full rendering with the same messages rendered with ``add_generation_prompt=True``; it is
  widened to whole tokens, so the end is settled once the text is tokenized (in `mask`).

DPO uses the same ends: the prompt is ``render(prompt, add_generation_prompt=True)`` and each completion runs
from there to its end-of-turn token, so ``prompt_ids + chosen_ids`` is by construction a prefix of the
tokenization of the rendered prompt+chosen conversation.
"""

from __future__ import annotations

from dataclasses import dataclass

from aligndata.encode.results import EncodeError
from aligndata.encode.template import ChatRenderer
from aligndata.records import Message


@dataclass
class RenderedSFT:
    """A conversation rendered, with where each trained assistant turn starts."""

    text: str  # the full conversation, rendered without a generation prompt
    with_generation_prompt: str | None  # the same with one, to find the trailer (None: there is none)
    turns: list[tuple[int, int, str | None]]  # (message index, start char, rendering up to it; None if last)


@dataclass
class RenderedDPO:
    """prompt+chosen and prompt+rejected rendered; both completions start at `prompt_length`."""

    prompt_length: int  # chars of the prompt rendered with the generation prompt
    texts: tuple[str, str]  # prompt+chosen and prompt+rejected, rendered
    with_generation_prompt: tuple[str | None, str | None]


def render_sft(renderer: ChatRenderer, messages: list[dict], tools: list | None, train_on: str) -> RenderedSFT:
    """Render a conversation and locate the start of each assistant turn trained under `train_on`."""
    full = renderer.render(messages, tools, False)
    targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not targets:
        raise EncodeError("no-trained-tokens", "the conversation has no assistant message to train on")
    if train_on == "last":
        targets = targets[-1:]
    last = len(messages) - 1
    turns = []
    for i in targets:
        prefix = renderer.render(messages[:i], tools, True)
        if not full.startswith(prefix):
            raise EncodeError(
                "template-mask",
                f"assistant message {i}: the conversation before it, rendered with the generation prompt, "
                f"is not a prefix of the full rendering ({first_difference(prefix, full)}); the template "
                "renders earlier turns differently once later turns exist, so the trained span cannot be located",
            )
        upto = None if i == last else renderer.render(messages[: i + 1], tools, False)
        turns.append((i, len(prefix), upto))
    return RenderedSFT(full, _with_generation_prompt(renderer, messages, tools), turns)


def render_dpo(
    renderer: ChatRenderer, prompt: list[dict], chosen: list[Message], rejected: list[Message], tools: list | None
) -> RenderedDPO:
    """Render prompt+chosen and prompt+rejected; the rendered prompt must be a prefix of both."""
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if len(completion) != 1:
            raise EncodeError(
                "multi-message-completion" if completion else "empty-completion",
                f"the {name} completion has {len(completion)} messages; DPO needs exactly one assistant message",
            )
        if completion[0].role != "assistant":
            raise EncodeError(
                "completion-role", f"the {name} completion is a {completion[0].role!r} message, not 'assistant'"
            )
    prompt_text = renderer.render(prompt, tools, True)
    texts, with_prompts = [], []
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        messages = [*prompt, completion[0].to_json()]
        full = renderer.render(messages, tools, False)
        if not full.startswith(prompt_text):
            raise EncodeError(
                "boundary-mismatch",
                f"the rendered prompt is not a prefix of the rendered prompt+{name} conversation "
                f"({first_difference(prompt_text, full)}); the template renders the prompt differently "
                "once a completion follows",
            )
        texts.append(full)
        with_prompts.append(_with_generation_prompt(renderer, messages, tools))
    return RenderedDPO(len(prompt_text), (texts[0], texts[1]), (with_prompts[0], with_prompts[1]))


def _with_generation_prompt(renderer: ChatRenderer, messages: list[dict], tools: list | None) -> str | None:
    """The comparison rendering that reveals a trailer; None where there cannot be one."""
    if renderer.prompt_only_appends:
        return None
    try:
        return renderer.render(messages, tools, True)
    except EncodeError:
        return None  # some templates refuse a generation prompt after an assistant turn: no trailer then


def common_prefix_length(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    low, high = 0, min(len(a), len(b))  # a[:low] == b[:low] holds; a[:high+1] differs somewhere
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def first_difference(a: str, b: str) -> str:
    """Where two renderings part, for error messages."""
    at = common_prefix_length(a, b)
    return f"first difference at char {at}: {a[at:at + 40]!r} vs {b[at:at + 40]!r}"
