"""What encoding one record gives: its token ids and loss mask, or an EncodeError saying why not."""

from __future__ import annotations

from dataclasses import dataclass


class EncodeError(Exception):
    """One record cannot be encoded. `reason` is a short kebab-case key that summaries count by."""

    def __init__(self, reason: str, message: str, path: str = "$", length: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.path = path  # JSONPath of the field at fault, where one is
        self.length = length  # "too-long": the record's length in tokens, for the summary of what was dropped

    def __reduce__(self):  # keeps every argument when a worker process sends the error back
        return (type(self), (self.reason, self.message, self.path, self.length))


@dataclass
class EncodedSFT:
    input_ids: list[int]
    loss_mask: list[int]
    truncated: str | None = None  # None, "prompt" (oldest turns dropped) or "completion" (cut at the right)


@dataclass
class EncodedDPO:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: str | None = None  # None, "prompt" (turns dropped / left-cut) or "completion" (cut at the right)
