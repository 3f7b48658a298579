"""Plain-text preference pairs and Anthropic HH-RLHF dialogue strings."""

from __future__ import annotations

import re
from typing import Any

from aligndata.records import Message, PreferencePair
from aligndata.read.formats.common import Issues

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def adapt_text_preference(value: dict[str, Any], issues: Issues) -> PreferencePair:
    prompt = []
    if value.get("system", "").strip():
        prompt.append(Message("system", value["system"], origin="$.system", origin_content="$.system"))
    prompt.append(Message("user", value["prompt"], origin="$.prompt", origin_content="$.prompt"))
    return PreferencePair(
        prompt,
        [Message("assistant", value["chosen"], origin="$.chosen", origin_content="$.chosen")],
        [Message("assistant", value["rejected"], origin="$.rejected", origin_content="$.rejected")],
    )


def split_hh(text: str, path: str, issues: Issues) -> list[Message] | None:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [user a, assistant b]. Text before the first marker is an error."""
    marks = list(_HH_TURN.finditer(text))
    if not marks:
        issues.add(path, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found", "hh-format")
        return None
    if text[: marks[0].start()].strip():
        issues.add(path, "text before the first '\\n\\nHuman:' marker", "hh-format")
        return None
    out = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        content = text[m.end():end].strip()
        out.append(Message(_HH_ROLE[m.group(1)], content, origin=f"{path} (turn {i + 1})", origin_content=f"{path} (turn {i + 1})"))
    return out


def adapt_hh(value: dict[str, Any], issues: Issues) -> PreferencePair | None:
    chosen = split_hh(value["chosen"], "$.chosen", issues)
    rejected = split_hh(value["rejected"], "$.rejected", issues)
    if chosen is None or rejected is None:
        return None
    prompt = chosen[:-1]
    if [(m.role, m.content) for m in rejected[:-1]] != [(m.role, m.content) for m in prompt]:
        at = next((i for i, (a, b) in enumerate(zip(rejected, prompt)) if (a.role, a.content) != (b.role, b.content)),
                  min(len(rejected), len(prompt)) - 1)
        issues.add("$.rejected", f"does not continue the same dialogue as $.chosen (turn {at + 1} differs); "
                                 "only the last reply may differ", "hh-format")
        return None
    return PreferencePair(prompt, chosen[-1:], rejected[-1:])
