"""Render a record and find where its trained text lies, in characters, by rendering alone.

This works for any template (no ``{% generation %}`` markers needed):

- start of assistant message i: ``len(render(messages[:i], add_generation_prompt=True))``, where that rendering
  is a textual prefix of the full rendering. Where it is not, the template renders earlier turns differently
  once later turns exist (Qwen3.5's <think> blocks): the turn starts after the one place in the full rendering
  that holds the longest tail of that prompt (`_located_start`), else the record is refused ("template-mask").
  A generation prompt that opens a reasoning block has its own rule (reasoning.py): the last turn is written
  after that prompt, earlier turns start at the end of their header.
- end of a turn that more messages follow: where the template closes it when the conversation goes on, that
  is ``render(messages[:i+1], add_generation_prompt=True)`` less the generation prompt (gpt-oss closes it with
  ``<|end|>`` there but with ``<|return|>`` at the very end), a prefix of the full rendering; where the
  template renders a last turn otherwise (Qwen3's block in front of it), the longest tail of that rendering
  found at the turn's start (mask._continued_turn_end).
- end of the last message: the end of the full rendering, less a *trailer*: what the template writes at the
  very end of any conversation rendered without a generation prompt, in its place. Phi-3 writes its EOS
  there, after ``<|end|>\n``: not trained. gpt-oss writes nothing there (a conversation that ends with a user
  turn ends in ``<|end|>``): the ``<|return|>`` of its last assistant turn is that turn's end of turn, trained.

Trailer and generation prompt are told apart on `before`, the conversation up to the first trained turn
rendered without a generation prompt: with it, the template writes the generation prompt where `before` has
the trailer. Both start at a whole token, found in `mask` (Phi-3's EOS and ``<|assistant|>`` share their
first characters). Templates whose last statement only appends the generation prompt (most) need none of
this: for them ``render(messages[:i+1])`` ends where the turn ends in the full rendering, and there is no
trailer.

DPO uses the same ends: the prompt is ``render(prompt, add_generation_prompt=True)`` and each completion runs
from there to its end-of-turn token, so ``prompt_ids + chosen_ids`` is by construction a prefix of the
tokenization of the rendered prompt+chosen conversation.
"""

from __future__ import annotations

from dataclasses import dataclass

from aligndata.encode.coverage import check_rendered
from aligndata.encode.reasoning import ReasoningPrompt
from aligndata.encode.results import EncodeError
from aligndata.encode.template import ChatRenderer
from aligndata.records import Message

@dataclass
class Turn:
    """One trained assistant turn: where it starts, and how the template closes it when more follows."""

    index: int  # of the message
    start: int  # char of the full rendering where the trained span begins
    continued: str | None  # messages[:index+1] rendered as when more follows (see RenderedSFT); None if last
    own_start: int = -1  # char of `continued` where the span begins (-1: `start`, the history rendered alike)


@dataclass
class RenderedSFT:
    """A conversation rendered, with where each trained assistant turn starts and what closes it."""

    text: str  # the full conversation, rendered without a generation prompt
    turns: list[Turn]
    # None where the template only appends its generation prompt (or refuses one after an assistant turn):
    # `continued` is then rendered without it. Else `continued` is rendered with it, and this is the
    # conversation before the first trained turn, rendered without it.
    before: str | None
    # The generation prompt's reasoning opener where the first trained turn starts before it (reasoning.py):
    # the rest of that prompt, which `continued` renderings end with.
    opener: str = ""
    plain: list[tuple[int, int]] | None = None  # char spans of control strings kept as text (control.py)


@dataclass
class RenderedDPO:
    """prompt+chosen and prompt+rejected rendered; both completions start at `prompt_length`."""

    prompt_length: int  # chars of the prompt rendered with the generation prompt
    texts: tuple[str, str]  # prompt+chosen and prompt+rejected, rendered
    before: str | None  # the prompt rendered without the generation prompt; None as in RenderedSFT
    plain: tuple[list[tuple[int, int]], list[tuple[int, int]]] | None = None  # per text, as in RenderedSFT


def render_sft(
    renderer: ChatRenderer, messages: list[dict], tools: list | None, train_on: str,
    reasoning: ReasoningPrompt | None = None,
) -> RenderedSFT:
    """Render a conversation and locate the start of each assistant turn trained under `train_on`."""
    full = renderer.render(messages, tools, False)
    targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not targets:
        raise EncodeError("no-trained-tokens", "the conversation has no assistant message to train on")
    if train_on == "last":
        targets = targets[-1:]
    last = len(messages) - 1
    text, starts, opener = full, [], ""
    for i in targets:
        prompt = renderer.render(messages[:i], tools, True)
        if reasoning is not None and reasoning.applies(prompt, full):
            if i == last:
                text = reasoning.continue_prompt(prompt, full, messages[i])
                starts.append((len(prompt), -1))
                continue
            head = reasoning.header_end(prompt, full)
            if head is not None:  # trained as the conversation renders it, from the end of its header
                starts.append((head, -1))
                opener = reasoning.opener if i == targets[0] else opener
                continue
        if full.startswith(prompt):
            starts.append((len(prompt), -1))
            continue
        own = len(prompt) - len(reasoning.opener) if reasoning and prompt.endswith(reasoning.opener) else len(prompt)
        at = _located_start(prompt[:own], full) if i != last else None
        if at is None:
            raise EncodeError(
                "template-mask",
                f"assistant message {i}: the conversation before it, rendered with the generation prompt, "
                f"is not a prefix of the full rendering ({first_difference(prompt, full)}); the template "
                "renders earlier turns differently once later turns exist, so the trained span cannot be located",
            )
        starts.append((at, own))
    check_rendered(full, messages, tools)
    continued, before = _closings(renderer, messages, tools, targets)
    closings = iter(continued)
    turns = [Turn(i, start, None if i == last else next(closings), own) for i, (start, own) in zip(targets, starts)]
    return RenderedSFT(text, turns, before, opener)


def _located_start(head: str, full: str) -> int | None:
    """Where a turn starts in `full` when the template renders the turns before it otherwise once the
    conversation goes on (Qwen3.5 gives every turn after the last user message a <think> block): after the
    one place in `full` that holds the longest tail of `head`, its prompt up to the end of its header (the
    messages just before it and the header, rendered alike). None where that place is not unique."""
    parted = common_prefix_length(head, full)
    tail = head[parted:]
    low, high = 0, len(tail)  # the last `low` chars of tail occur in full after `parted`
    while low < high:
        mid = (low + high + 1) // 2
        if full.find(tail[len(tail) - mid:], parted) >= 0:
            low = mid
        else:
            high = mid - 1
    piece = tail[len(tail) - low:]
    at = full.find(piece, parted) if low else -1
    if at < 0 or full.find(piece, at + 1) >= 0:
        return None
    return at + low


def _closings(
    renderer: ChatRenderer, messages: list[dict], tools: list | None, targets: list[int]
) -> tuple[list[str], str | None]:
    """The `continued` renderings of the trained turns that more messages follow, and `before` (RenderedSFT)."""
    closing = [i for i in targets if i != len(messages) - 1]
    if not renderer.prompt_only_appends:
        try:
            before = renderer.render(messages[: targets[0]], tools, False)
            return [renderer.render(messages[: i + 1], tools, True) for i in closing], before
        except EncodeError:
            pass  # some templates refuse a generation prompt after an assistant turn: no trailer then
    return [renderer.render(messages[: i + 1], tools, False) for i in closing], None


def render_dpo(
    renderer: ChatRenderer, prompt: list[dict], chosen: list[Message], rejected: list[Message], tools: list | None,
    reasoning: ReasoningPrompt | None = None,
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
    conversations = [[*prompt, chosen[0].to_json()], [*prompt, rejected[0].to_json()]]
    texts = []
    for name, messages in zip(("chosen", "rejected"), conversations):
        full = renderer.render(messages, tools, False)
        if reasoning is not None and reasoning.applies(prompt_text, full):
            full = reasoning.continue_prompt(prompt_text, full, messages[-1])
        elif not full.startswith(prompt_text):
            _refuse_moved_prompt(full, prompt, tools, name)
            raise EncodeError(
                "boundary-mismatch",
                f"the rendered prompt is not a prefix of the rendered prompt+{name} conversation "
                f"({first_difference(prompt_text, full)}); the template renders the prompt differently "
                "once a completion follows",
            )
        texts.append(full)
    check_rendered(prompt_text, prompt, tools)
    for text, messages in zip(texts, conversations):
        check_rendered(text[len(prompt_text):], messages[-1:], None, first=len(prompt))
    if not renderer.prompt_only_appends:
        try:
            return RenderedDPO(len(prompt_text), (texts[0], texts[1]), renderer.render(prompt, tools, False))
        except EncodeError:
            pass  # as in render_sft
    return RenderedDPO(len(prompt_text), (texts[0], texts[1]), None)


def _refuse_moved_prompt(full: str, prompt: list[dict], tools: list | None, name: str) -> None:
    """EncodeError("template-moves-prompt") where the prompt+completion rendering lacks part of the prompt.

    Mistral-Nemo writes the system prompt into the last user turn only when that turn ends the
    conversation: the prompt the model sees at generation time has it, the rendering with a completion
    has none, and no split of that rendering is the prompt the model was given."""
    try:
        check_rendered(full, prompt, tools)
    except EncodeError as exc:
        raise EncodeError(
            "template-moves-prompt",
            f"the chat template renders part of the prompt only while the prompt ends the conversation: in the "
            f"prompt+{name} rendering {exc.message.split(':', 1)[0]} is missing; no split of that rendering is "
            "the prompt the model sees at generation time",
        ) from exc


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
