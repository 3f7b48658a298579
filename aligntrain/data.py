"""From shards to padded micro-batches: checks, deterministic order, process split, token budget.

    shards/ --check_shards--> manifest --open_split--> ShardSplit (memory-mapped, never loaded whole)
      step s --step_indices--> total_batch_size rows (epoch permutation, a pure function of seed/epoch)
             --process_share--> this process's contiguous share
             --micro_batches--> gradient_accumulation_steps equal parts, or parts under a token budget
             --ShardSplit.rows + collate--> padded tensors, or one padding-free stream (packing.py)

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

from aligndata.write.shards import (REF_COLUMNS, ShardMismatch, check_contents, open_split, read_manifest,
                                    verify_shards)
from aligndata.encode.tokenizer import tokenizer_identity

from .config import Config, ConfigError
from .flops import item_counts
from .modeling import trained_positions
from .packing import PADDED, SHARED, pack


# -- checking the shards against the config and the tokenizer --------------------------------------

def check_shards(shards: str | Path, cfg: Config, tokenizer: Any, task: str) -> dict[str, Any]:
    """Read and verify the manifest; refuse shards made for another task, length or tokenizer."""
    shards = Path(shards)
    manifest = read_manifest(shards)
    verify_shards(shards, manifest)
    check_contents(shards, manifest)
    if manifest["task"] != task:
        raise ShardMismatch(f"{shards}: shards were converted for task {manifest['task']!r}, but loss.name "
                            f"{cfg.loss.name!r} trains on {task!r} shards; convert with --to {task}")
    settings = manifest.get("settings", {})
    if cfg.max_length is None:  # the config leaves it to the shards; the saved config then says what ran
        cfg.max_length = settings.get("max_length")
    elif settings.get("max_length") != cfg.max_length:
        theirs = settings.get("max_length")
        fix = (f"set max_length: {theirs}" if theirs is not None else
               "remove max_length from the config (it then follows the shards, converted without a limit)")
        raise ShardMismatch(f"{shards}: shards were converted with max_length={theirs} but the config says "
                            f"max_length={cfg.max_length}; re-convert with --max-length {cfg.max_length} or {fix}")
    differences = tokenizer_differences(manifest.get("tokenizer", {}), tokenizer)
    if differences:
        raise ShardMismatch(f"{shards}: shards were made with another tokenizer than {cfg.tokenizer_path!r}: "
                            + "; ".join(differences))
    return manifest


def shards_chat_template(shards: Path, manifest: dict[str, Any], tokenizer: Any, cfg: Config) -> str | None:
    """The text of the chat template the shards were rendered with, found by the manifest's sha256 among
    the config's `chat_template` (a built-in name or a file), the manifest's built-in and the tokenizer's
    own. Checkpoints ship it, so that generation uses the format training saw. The manifest records
    only the hash: when none of these has it, ShardMismatch says how to provide the template."""
    from aligndata.encode.template import resolve_chat_template
    from aligndata.encode.tokenizer import TemplateError

    recorded = manifest.get("chat_template") or {}
    own = getattr(tokenizer, "chat_template", None)
    if "sha256" not in recorded:  # written before the manifest recorded a template
        return own
    source = str(recorded.get("source", ""))
    candidates = [cfg.chat_template] if cfg.chat_template else []  # names for resolve_chat_template
    if source.startswith("builtin:"):
        candidates.append(source.split(":", 1)[1])
    if own:
        candidates.append(None)  # the tokenizer's own
    tried = []
    for name in dict.fromkeys(candidates):
        try:
            template = resolve_chat_template(tokenizer, name)
        except TemplateError as e:
            if name is not None and name == cfg.chat_template:
                raise ConfigError(f"chat_template: {e}") from None
            tried.append(str(e))
            continue
        if template.sha256 == recorded["sha256"]:
            return template.text
        tried.append(f"{template.source} has sha256 {template.sha256[:12]}")
    raise ShardMismatch(f"{shards}: the shards were rendered with chat template {source or 'unknown'} (sha256 "
                        f"{recorded['sha256'][:12]}), which is not available here ({'; '.join(tried) or 'nothing to compare'}); "
                        "set chat_template: to that template (a built-in name or its .jinja file) so that checkpoints "
                        "ship the format the model is trained on, or re-convert the shards with the tokenizer's template")


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
    """One split as a memory-mapped table, with each row's padded width (its longest sequence) precomputed
    from list offsets."""

    def __init__(self, shards: str | Path, split: str, manifest: dict[str, Any]):
        self.table: pa.Table = open_split(shards, split, manifest)
        self.task: str = manifest["task"]
        self.name = split
        if self.task == "sft":
            self.widths = _lengths(self.table, "input_ids")
            self._prompts, self._sequences = np.zeros_like(self.widths), self.widths
        else:
            prompt, chosen, rejected = (_lengths(self.table, c) for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
            self.widths = prompt + np.maximum(chosen, rejected)
            self._prompts, self._sequences = prompt, 2 * prompt + chosen + rejected
        self.has_reference = all(c in self.table.column_names for c in REF_COLUMNS)

    def __len__(self) -> int:
        return self.table.num_rows

    def stream_tokens(self, layout: str) -> np.ndarray | None:
        """Tokens each row adds to a padding-free stream (a shared prompt once); None when padded."""
        if layout == PADDED:
            return None
        return self._sequences - (self._prompts if layout == SHARED else 0)

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


def micro_batches(indices: np.ndarray, widths: np.ndarray, parts: int, tokens_per_batch: int | None,
                  sequences_per_row: int, sizes: np.ndarray | None = None) -> list[np.ndarray]:
    """Split a process's rows into micro-batches, keeping their order (no sorting by length).

    Without a budget: `parts` equal parts. With `tokens_per_batch`: greedy, a micro-batch grows while the
    tokens it forwards stay within the budget: padded, sequences x longest row (`widths`); padding-free,
    the sum of the rows' `sizes` (ShardSplit.stream_tokens). A row over the budget goes alone.
    """
    if tokens_per_batch is None:
        return [p for p in np.array_split(indices, parts) if len(p)]
    out, current, longest, total = [], [], 0, 0
    for i in indices:
        w = int(widths[i])
        size = 0 if sizes is None else int(sizes[i])
        if sizes is None:
            over = (len(current) + 1) * max(longest, w) * sequences_per_row > tokens_per_batch
        else:
            over = total + size > tokens_per_batch
        if current and over:
            out.append(np.array(current))
            current, longest, total = [], 0, 0
        current.append(int(i))
        longest, total = max(longest, w), total + size
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

def collate(rows: list[dict[str, Any]], task: str, pad_id: int, layout: str = PADDED,
            max_length: int | None = None) -> dict[str, Any]:
    """One micro-batch. SFT: one sequence per row. DPO: 2B sequences, the B chosen ones (prompt + chosen)
    first, then the B rejected ones; only completion tokens are trained. PADDED: right-padded [S, T]
    tensors; PACKED / SHARED: packing.pack's stream (SHARED forwards each prompt once). Every layout adds
    `lengths` [S], the tokens of each sequence, and the batch's useful_tokens, attention_pairs and
    trained_tokens (ints, counted on the host).
    `max_length`: the run's, which bounds the segments of a padding-free stream (packing.segment_bound)."""
    if task == "sft":
        sequences = [r["input_ids"] for r in rows]
        masks = [r["loss_mask"] for r in rows]
    else:
        sequences, masks = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for r in rows:
                sequences.append(r["prompt_ids"] + r[side])
                masks.append([0] * len(r["prompt_ids"]) + [1] * len(r[side]))
    if layout == PADDED:
        batch = _pad(sequences, masks, pad_id)
    else:
        prompts = [len(r["prompt_ids"]) for r in rows] if layout == SHARED else None
        batch = pack([np.asarray(s, dtype=np.int64) for s in sequences], [np.asarray(m, dtype=bool) for m in masks],
                     prompts, bound=max_length)
    counts = [item_counts((len(r["input_ids"]),) if task == "sft" else
                          (len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"]))) for r in rows]
    batch["useful_tokens"] = sum(c[0] for c in counts)  # for the FLOPs of a step (flops.py): a prompt once
    batch["attention_pairs"] = sum(c[1] for c in counts)
    batch["trained_tokens"] = trained_tokens(batch)  # before the batch goes to a device: no sync to count it
    if task != "sft" and all(c in rows[0] for c in REF_COLUMNS):
        batch["ref_chosen"] = torch.tensor([r["ref_chosen_logp"] for r in rows], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([r["ref_rejected_logp"] for r in rows], dtype=torch.float32)
    return batch


def to_device(batch: dict[str, Any], device, non_blocking: bool = False) -> dict[str, Any]:
    """A collated batch on `device` (its tensors and the padding-free Segments; numbers stay as they are).
    `non_blocking` on CUDA: the tensors go through pinned memory and the copies are queued behind the work
    already on the stream, without the host waiting for them (the trainer's prefetch of the next step)."""
    device = torch.device(device)
    if non_blocking and device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor)
                else v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def trained_tokens(batch: dict[str, Any]) -> int:
    """Trained (predicted) tokens of a collated batch, either layout."""
    if "targets" in batch:
        return int(batch["targets"].numel())
    return int(trained_positions(batch["loss_mask"], batch["attention_mask"]).sum())


def _pad(sequences: list[list[int]], masks: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, :len(seq)] = 1
        loss_mask[i, :len(seq)] = torch.tensor(mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask,
            "lengths": torch.tensor([len(s) for s in sequences], dtype=torch.long)}
