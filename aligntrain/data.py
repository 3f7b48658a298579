"""From shards to packed micro-batches: checks, deterministic order, process split, token budget.

    shards/ --check_shards--> manifest --open_split--> ShardSplit (memory-mapped, never loaded whole)
      step s --step_indices--> total_batch_size rows (epoch permutation, a pure function of seed/epoch)
             --process_share--> this process's contiguous share
             --micro_batches--> gradient_accumulation_steps equal parts, or parts under a token budget
             --ShardSplit.rows + collate--> one packed stream of tokens, no padding (see `collate`)

Because a step's rows depend only on (seed, step), resuming at step s needs no saved sampler state.
Each epoch drops its last incomplete batch, as the seed project does.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from aligndata.write.shards import REF_COLUMNS, ShardMismatch, open_split, read_manifest, verify_shards
from aligndata.encode.tokenizer import tokenizer_identity

from .config import Config


# -- checking the shards against the config and the tokenizer --------------------------------------

def check_shards(shards: str | Path, cfg: Config, tokenizer: Any, task: str) -> dict[str, Any]:
    """Read and verify the manifest; refuse shards made for another task, length or tokenizer."""
    shards = Path(shards)
    manifest = read_manifest(shards)
    verify_shards(shards, manifest)
    if manifest["task"] != task:
        raise ShardMismatch(f"{shards}: shards were converted for task {manifest['task']!r}, but loss.name "
                         f"{cfg.loss.name!r} trains on {task!r} shards; convert with --to {task}")
    settings = manifest.get("settings", {})
    if settings.get("max_length") != cfg.max_length:
        raise ShardMismatch(f"{shards}: shards were converted with max_length={settings.get('max_length')} but the config "
                         f"says max_length={cfg.max_length}; re-convert with --max-length {cfg.max_length} "
                         f"or set max_length: {settings.get('max_length')}")
    differences = tokenizer_differences(manifest.get("tokenizer", {}), tokenizer)
    if differences:
        raise ShardMismatch(f"{shards}: shards were made with another tokenizer than {cfg.tokenizer_path!r}: "
                         + "; ".join(differences))
    return manifest


def tokenizer_differences(recorded: dict[str, Any], tokenizer: Any) -> list[str]:
    """What differs between the manifest's tokenizer identity and `tokenizer` (empty when they agree).
    The identity comes from aligndata itself, so both sides hash the tokenizer the same way."""
    current = tokenizer_identity(tokenizer, recorded.get("name_or_path"))
    return [f"{key} is {recorded[key]!r} in the manifest, {current[key]!r} now"
            for key in ("sha256", "vocab_size", "bos_token_id", "eos_token_id")
            if key in recorded and recorded[key] != current[key]]


def pad_token_id(tokenizer: Any) -> int:
    """Padding is masked out everywhere; any id works, the tokenizer's pad or else its eos."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# -- a split of shards ----------------------------------------------------------------------------

class ShardSplit:
    """One split as a memory-mapped table, with each row's packed size (tokens forwarded) precomputed
    from list offsets: SFT its sequence, DPO prompt + chosen + rejected (the prompt once)."""

    def __init__(self, shards: str | Path, split: str, manifest: dict[str, Any]):
        self.table: pa.Table = open_split(shards, split, manifest)
        self.task: str = manifest["task"]
        self.name = split
        if self.task == "sft":
            self.widths = _lengths(self.table, "input_ids")
        else:
            self.widths = sum(_lengths(self.table, c) for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
        self.has_reference = all(c in self.table.column_names for c in REF_COLUMNS)

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, indices: np.ndarray) -> list[dict[str, Any]]:
        """Only these rows are read from the memory map."""
        return self.table.take(pa.array(np.asarray(indices, dtype=np.int64))).to_pylist()


def _lengths(table: pa.Table, column: str) -> np.ndarray:
    return pc.list_value_length(table.column(column)).to_numpy().astype(np.int64)


# -- the order of training rows ---------------------------------------------------------------------

def total_steps(n_rows: int, cfg: Config) -> int:
    """Optimizer steps of the run: n_examples when set (rounded up, as the seed does), else n_epochs."""
    if n_rows < cfg.total_batch_size:
        raise ShardMismatch(f"the train split has {n_rows} rows, fewer than total_batch_size={cfg.total_batch_size}")
    if cfg.n_examples is not None:
        return math.ceil(cfg.n_examples / cfg.total_batch_size)
    return (n_rows // cfg.total_batch_size) * cfg.n_epochs


@functools.lru_cache(maxsize=2)
def epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def step_indices(step: int, n_rows: int, batch_size: int, seed: int) -> np.ndarray:
    """The global rows of optimizer step `step` (0-based): a slice of its epoch's permutation."""
    epoch, k = divmod(step, n_rows // batch_size)
    return epoch_permutation(n_rows, seed, epoch)[k * batch_size:(k + 1) * batch_size]


def process_share(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    return np.array_split(indices, world_size)[rank]


def micro_batches(indices: np.ndarray, widths: np.ndarray, parts: int, tokens_per_batch: int | None) -> list[np.ndarray]:
    """Split a process's rows into micro-batches, keeping their order (no sorting by length).

    Without a budget: `parts` equal parts. With `tokens_per_batch`: greedy, a micro-batch grows while
    its packed size (the sum of its rows' widths) stays within the budget; a row longer than the
    budget goes alone.
    """
    if tokens_per_batch is None:
        return [p for p in np.array_split(indices, parts) if len(p)]
    out, current, size = [], [], 0
    for i in indices:
        w = int(widths[i])
        if current and size + w > tokens_per_batch:
            out.append(np.array(current))
            current, size = [], 0
        current.append(int(i))
        size += w
    if current:
        out.append(np.array(current))
    return out


def eval_batches(n_rows: int, n_examples: int | None, batch_size: int, rank: int, world_size: int):
    """The first n_examples rows in order, batch by batch; each process gets an equal share, padded with
    repeats of its first row that carry weight 0 (every process must run the same forwards)."""
    n = n_rows if n_examples is None else min(n_rows, n_examples)
    for start in range(0, n, batch_size):
        shares = np.array_split(np.arange(start, min(n, start + batch_size)), world_size)
        width = max(len(s) for s in shares)
        mine = shares[rank] if len(shares[rank]) else np.array([start])
        weights = np.zeros(width, dtype=np.float32)
        weights[:len(shares[rank])] = 1.0
        yield np.resize(mine, width), weights


# -- collation --------------------------------------------------------------------------------------

def collate(rows: list[dict[str, Any]], task: str) -> dict[str, torch.Tensor]:
    """The rows as one packed stream of tokens, with no padding: the model sees [1, T].

    SFT: the sequences one after another. DPO: per pair the prompt once, then the chosen completion,
    then the rejected one; chosen and rejected both continue the prompt's positions and attend to it,
    never to each other (`doc` and `branch` say who may attend to whom; modeling.attention_mask).
    The S sequences whose log-probs come back are the rows (SFT), or the B chosen ones (prompt +
    chosen) then the B rejected ones (DPO).

        input_ids, position_ids [1, T]    doc [T] (row index)   branch [T] (0 shared, 1 chosen, 2 rejected)
        sources, targets [N]              hidden state `sources[i]` predicts token `targets[i]`
        counts [S]                        trained tokens of each sequence (sources/targets in sequence order)
        example_tokens [B]                tokens forwarded for each row
    """
    stream = _Stream()
    if task == "sft":
        for row in rows:
            stream.add_sequence([stream.add(row["input_ids"], branch=0)], [row["loss_mask"]])
            stream.end_row()
    else:
        chosen, rejected = [], []
        for r in rows:
            prompt = stream.add(r["prompt_ids"], branch=0)
            c = stream.add(r["chosen_ids"], branch=1, first_position=len(r["prompt_ids"]))
            j = stream.add(r["rejected_ids"], branch=2, first_position=len(r["prompt_ids"]))
            stream.end_row()
            prompt_mask = [0] * len(r["prompt_ids"])
            chosen.append(([prompt, c], [prompt_mask, [1] * len(r["chosen_ids"])]))
            rejected.append(([prompt, j], [prompt_mask, [1] * len(r["rejected_ids"])]))
        for spans, masks in chosen + rejected:
            stream.add_sequence(spans, masks)
    batch = stream.tensors()
    if task == "dpo" and all(c in rows[0] for c in REF_COLUMNS):
        batch["ref_chosen"] = torch.tensor([r["ref_chosen_logp"] for r in rows], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([r["ref_rejected_logp"] for r in rows], dtype=torch.float32)
    return batch


def predicted(positions: np.ndarray, loss_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The shift of causal LM training: the token at t is predicted from position t-1, so it is trained
    when loss_mask[t] is set and t > 0 (position 0 has no context and is never trained).
    positions [L]: where the sequence's tokens sit in the stream. -> (sources, targets' stream positions)."""
    t = np.flatnonzero(np.asarray(loss_mask[1:], dtype=bool)) + 1
    return positions[t - 1], positions[t]


class _Stream:
    """Accumulates the packed token stream of `collate`."""

    def __init__(self):
        self.ids, self.positions, self.docs, self.branches = [], [], [], []
        self.sources, self.targets, self.counts = [], [], []
        self.size, self.row_start, self.row_sizes = 0, 0, []

    def add(self, ids: list[int], branch: int, first_position: int = 0) -> np.ndarray:
        """Append a span of tokens to the current row; returns its stream positions."""
        n = len(ids)
        self.ids.append(np.asarray(ids, dtype=np.int64))
        self.positions.append(np.arange(first_position, first_position + n))
        self.docs.append(np.full(n, len(self.row_sizes), dtype=np.int32))
        self.branches.append(np.full(n, branch, dtype=np.int8))
        span = np.arange(self.size, self.size + n)
        self.size += n
        return span

    def end_row(self) -> None:
        self.row_sizes.append(self.size - self.row_start)
        self.row_start = self.size

    def add_sequence(self, spans: list[np.ndarray], masks: list[list[int]]) -> None:
        """One sequence whose log-prob is returned: its spans in order, with their loss masks."""
        positions = np.concatenate(spans)
        sources, targets = predicted(positions, np.concatenate([np.asarray(m, dtype=bool) for m in masks]))
        self.sources.append(sources)
        self.targets.append(targets)
        self.counts.append(len(targets))

    def tensors(self) -> dict[str, torch.Tensor]:
        ids = np.concatenate(self.ids)
        targets = np.concatenate(self.targets)
        return {"input_ids": torch.from_numpy(ids)[None], "position_ids": torch.from_numpy(np.concatenate(self.positions))[None],
                "doc": torch.from_numpy(np.concatenate(self.docs)), "branch": torch.from_numpy(np.concatenate(self.branches)),
                "sources": torch.from_numpy(np.concatenate(self.sources)), "targets": torch.from_numpy(ids[targets]),
                "counts": torch.tensor(self.counts, dtype=torch.long),
                "example_tokens": torch.tensor(self.row_sizes, dtype=torch.float32)}
