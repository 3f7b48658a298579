"""What the raw-file lint and the shard checks both report: findings, counted examples, length bias."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EXAMPLES = 10  # record numbers kept per finding
TOP_DUPLICATES = 5
# Chosen longer than rejected in more than BIAS_HIGH (or fewer than BIAS_LOW) of the pairs is a bias.
BIAS_LOW, BIAS_HIGH = 0.35, 0.65


@dataclass
class Finding:
    """One warning about data that is valid but deserves a look before training."""

    kind: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.message}


@dataclass
class Examples:
    """How many records a finding concerns, and the first EXAMPLES of them (record numbers, or per-record values)."""

    count: int = 0
    examples: list[Any] = field(default_factory=list)

    def add(self, example: Any) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)


@dataclass
class LengthBias:
    """In how many pairs the chosen completion is longer than the rejected one, shorter, or as long."""

    longer: int = 0
    shorter: int = 0
    same: int = 0

    def add(self, chosen: int, rejected: int) -> None:
        if chosen > rejected:
            self.longer += 1
        elif chosen < rejected:
            self.shorter += 1
        else:
            self.same += 1

    @property
    def share(self) -> float | None:
        """Share of the pairs that differ in length whose chosen completion is the longer one."""
        n = self.longer + self.shorter
        return self.longer / n if n else None

    def to_json(self) -> dict[str, Any]:
        return {"chosen_longer": self.longer, "chosen_shorter": self.shorter, "same_length": self.same,
                "share_chosen_longer": self.share}


def length_biased(share: float | None) -> bool:
    """Whether chosen is longer than rejected in far more (or far fewer) of the pairs than half."""
    return share is not None and not BIAS_LOW <= share <= BIAS_HIGH


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def record_list(numbers: list[int], total: int) -> str:
    """The example record numbers, with ", ..." when there are more than shown."""
    shown = ", ".join(str(i) for i in numbers)
    return shown + (", ..." if total > len(numbers) else "")
