"""Templates whose generation prompt opens a reasoning block: what a trained turn after it is.

QwQ-32B, the DeepSeek-R1 distills, llama.cpp's deepseek-r1, Qwen3.5 and StepFun-3.5 end their generation
prompt with ``<think>\\n`` (some, with ``enable_thinking`` unset, with a closed ``<think>\\n</think>``), while the
finished conversation renders the reply without it (R1 and QwQ strip reasoning from every assistant turn) or
with a block whose empty form ``<think>\\n\\n</think>`` merges the prompt's last newline into the next token.
So the rendering of the whole conversation cannot show what the model sees and writes at generation time.

The rule (`--reasoning`): the last assistant turn is written as the continuation of its generation prompt,

    prompt = render(messages before it, add_generation_prompt=True)              ends with <think>\\n
    text   = prompt + REASONING + "\\n</think>" + SEP + the reply as the conversation renders it

where REASONING is the turn's reasoning under ``keep`` (the default: a ``reasoning_content`` / ``reasoning`` /
``thinking`` field, or a ``<think>...</think>`` part of the content, as the template itself reads it) and
nothing under ``empty``; an empty block is written ``<think>\\n</think>`` + SEP, so that the prompt ends on a
token boundary. SEP is what the template writes after ``</think>`` where it writes the block (Qwen3.5: two
newlines, StepFun: one), else two newlines. A prompt that closes the block itself is followed by the reply
alone; reasoning to keep is then refused (``template-drops-content``). The trained span is everything after
the prompt, so DPO's prompt is exactly what the model is given. Turns that more messages follow are trained
as the conversation renders them, from the end of their header on.
"""

from __future__ import annotations

from dataclasses import dataclass
from aligndata.encode.results import EncodeError
from aligndata.encode.template import ChatRenderer
from aligndata.options import Reasoning

OPEN, CLOSE = "<think>", "</think>"
_PROBE = [{"role": "user", "content": "Hi"}]


@dataclass(frozen=True)
class ReasoningPrompt:
    """A template whose generation prompt writes `opener` (from its ``<think>`` on) last, and the rule's mode."""

    opener: str  # "<think>\n", or "<think>\n</think>" where the prompt closes the block itself
    mode: Reasoning

    def applies(self, prompt: str, full: str) -> bool:
        """Whether a turn after `prompt` needs the rule: the prompt leaves the block open, or the conversation
        renders the turn without the prompt's block (a prompt whose closed block the turn also has does not)."""
        return CLOSE not in self.opener or not full.startswith(prompt)

    def header_end(self, prompt: str, full: str) -> int | None:
        """Where a turn starts in `full` after the header its generation prompt ends with; None if it differs."""
        if not prompt.endswith(self.opener):
            return None
        head = len(prompt) - len(self.opener)
        return head if full.startswith(prompt[:head]) else None

    def continue_prompt(self, prompt: str, full: str, message: dict) -> str:
        """The conversation ending with `message`, its last turn written after `prompt` (see the module)."""
        head = self.header_end(prompt, full)
        if head is None:
            raise EncodeError("template-mask", "the last assistant turn: the conversation before it, rendered with the "
                              "generation prompt, is not the start of the full rendering up to the turn's header")
        reply, written, sep = _split_block(full[head:])
        reasoning = (written or _data_reasoning(message)) if self.mode == "keep" else ""
        if CLOSE in self.opener:
            if reasoning:
                raise EncodeError("template-drops-content", "the generation prompt closes the reasoning block "
                                  f"({self.opener!r}), so this turn's reasoning cannot be trained after it; "
                                  "pass --reasoning empty to train the reply without it")
            return prompt + reply
        # The separator stands for the newlines a reply stripped of its reasoning may start with.
        return prompt + (f"{reasoning}\n" if reasoning else "") + CLOSE + sep + reply.lstrip("\n")


def reasoning_prompt(renderer: ChatRenderer, mode: Reasoning) -> ReasoningPrompt | None:
    """The rule for this template, or None where its generation prompt writes no ``<think>``."""
    try:
        without, with_prompt = (renderer.render(_PROBE, None, flag) for flag in (False, True))
    except EncodeError:
        return None
    added = with_prompt[len(without):] if with_prompt.startswith(without) else ""
    at = added.rfind(OPEN)
    return None if at < 0 else ReasoningPrompt(added[at:], mode)


def _split_block(turn: str) -> tuple[str, str, str]:
    """(reply, reasoning, separator) of a turn the template rendered; no block: (turn, "", two newlines)."""
    if not turn.startswith(OPEN) or CLOSE not in turn:
        return turn, "", "\n\n"
    inside, after = turn[len(OPEN):].split(CLOSE, 1)
    reply = after.lstrip("\n")
    return reply, inside.strip("\n"), after[: len(after) - len(reply)]


def _data_reasoning(message: dict) -> str:
    """The reasoning a template reads from a message: its reasoning field, else the content's think part."""
    field = message.get("reasoning_content")
    if isinstance(field, str):
        return field.strip("\n")
    content = message.get("content") or ""
    if CLOSE not in content:
        return ""
    return content.split(CLOSE)[0].split(OPEN)[-1].strip("\n")
