"""Rows of a split token by token, as `aligndata inspect DIR --show N` prints them: trained vs masked.

    picked rows + the tokenizer -> token pieces (each token's text in the context of the ones before it)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from aligndata.errors import InputError
from aligndata.report.shard_stats import ShardReport
from aligndata.write.shards import dpo_loss_mask
from aligndata.write.shards import open_split

CONTEXT_TOKENS = 3  # tokens decoded before each shown token, for tokenizers whose text depends on them


@dataclass
class Piece:
    """One displayed token (or a few, when a character spans several byte tokens)."""

    ids: list[int]
    text: str
    trained: bool
    special: bool

    def to_json(self) -> dict[str, Any]:
        return {"ids": self.ids, "text": self.text, "trained": self.trained, "special": self.special}


@dataclass
class ShownRecord:
    task: str
    split: str
    row: int
    source: str
    record: int
    parts: dict[str, list[Piece]]  # sft: {"tokens"}; dpo: {"prompt", "chosen", "rejected"}

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "row": self.row, "source": self.source, "record": self.record,
                **{k: [p.to_json() for p in v] for k, v in self.parts.items()}}


def pick_rows(n_rows: int, show: int, index: int | None = None, random: bool = False,
              seed: int | None = None, split: str = "train") -> list[int]:
    """Which rows `--show N [--index I | --random [--seed S]]` means (I is a 0-based row of the split)."""
    if show < 1:
        raise InputError(f"--show {show}: must be at least 1")
    if random:
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(n_rows, size=min(show, n_rows), replace=False).tolist())
    start = index or 0
    if not 0 <= start < n_rows:
        raise InputError(f"--index {start}: the {split} split has {n_rows} rows (0 to {n_rows - 1})")
    return list(range(start, min(n_rows, start + show)))


def records_to_show(report: ShardReport, split: str, show: int, index: int | None = None, random: bool = False,
                    seed: int | None = None) -> list[ShownRecord]:
    """`--show N [--index I | --random [--seed S]] [--split NAME]` as records ready to render."""
    if split not in report.splits:
        raise InputError(f"--split {split}: the shards have {', '.join(report.splits)}")
    return show_records(report, pick_rows(report.splits[split].rows, show, index, random, seed, split), split)


def show_records(report: ShardReport, rows: list[int], split: str = "train") -> list[ShownRecord]:
    """Decode the given rows of a split into trained / masked token pieces (needs the tokenizer)."""
    tok = report.tokenizer
    if tok is None:
        raise InputError("--show needs the tokenizer: " + "; ".join(report.notes))
    if split not in report.splits:
        raise InputError(f"--split {split}: the shards have {', '.join(report.splits)}")
    table = open_split(report.path, split, report.manifest)
    picked = table.take(pa.array(rows, type=pa.int64())).to_pylist()  # a few rows only
    sources = [s.get("path", "?") for s in report.manifest.get("sources", [])]
    out = []
    for row, r in zip(rows, picked):
        if report.task == "sft":
            parts = {"tokens": token_pieces(tok, r["input_ids"], r["loss_mask"])}
        else:
            prompt, chosen, rejected = r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]
            parts = {"prompt": token_pieces(tok, prompt, dpo_loss_mask(len(prompt), 0)),
                     "chosen": token_pieces(tok, chosen, dpo_loss_mask(0, len(chosen))),
                     "rejected": token_pieces(tok, rejected, dpo_loss_mask(0, len(rejected)))}
        src = sources[r["source"]] if 0 <= r["source"] < len(sources) else "?"
        out.append(ShownRecord(report.task, split, row, src, r["source_index"], parts))
    return out


def token_pieces(tok: Any, ids: list[int], mask: list[int]) -> list[Piece]:
    """Each token's own text, decoded in the context of the tokens before it.

    Decoding a token alone loses what depends on its neighbours (sentencepiece drops the leading
    space of "▁the"); so a token's text is decode(context + token) minus decode(context). Tokens that
    hold part of a character are joined until the character is whole.
    """
    special = set(getattr(tok, "all_special_ids", []) or [])

    def decode(x: list[int]) -> str:
        return tok.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces: list[Piece] = []
    start = 0
    for end in range(1, len(ids) + 1):
        group = ids[start:end]
        context = ids[max(0, start - CONTEXT_TOKENS):start]
        base = decode(context) if context else ""
        full = decode(context + group)
        text = full[len(base):] if full.startswith(base) else decode(group)
        if text.endswith("\ufffd") and len(group) < 4 and end < len(ids):
            continue  # an incomplete UTF-8 sequence: the next token completes it
        if not text:
            text = "".join(tok.convert_ids_to_tokens(group)) or "∅"
        pieces.append(Piece(group, text, bool(mask[start]), any(x in special for x in group)))
        start = end
    return pieces
