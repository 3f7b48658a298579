"""`aligntrain precompute-ref`: reference log-probs computed once and stored in the shards.

DPO then trains without a reference model in memory. The rewrite is atomic: new shard files are
written next to the old ones under new names (`shard-00000-ref-<id>.arrow`), then the manifest is
replaced in one rename (the commit point), then the old files and the `datasets` sidecars are
updated. A crash before the manifest rename leaves the old, valid dataset (plus stray files the
next run removes); a crash after leaves the new one.

The reference's identity is a hash of its weight files (model.name_or_path, then model.archive)
together with reference_dtype; training refuses stored log-probs of a different reference.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligndata.write.shards import (REF_COLUMNS, ShardWriter, write_datasets_sidecars, finish_output,
                              open_split, sha256_file, shard_path)

from . import flash4
from .compiling import compile_wanted
from .config import Config
from .data import check_shards, collate, pad_token_id, to_device
from .modeling import Reference, load_tokenizer, resolve_model_dir
from .packing import PADDED

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
# compile: null compiles the reference of a pass over at least this many pairs. Compiling costs a fixed ~7-8 s;
# on an H200 (Qwen2.5-0.5B shape, benchmarks/RESULTS.md) the compiled pass then ran ~300 pairs/s and the eager
# one ~170: the cost is earned back after about 3,000 pairs.
COMPILE_FROM_PAIRS = 4096


def reference_identity(cfg: Config) -> dict[str, Any]:
    """What the manifest records about the reference model (see module docstring)."""
    h = hashlib.sha256()
    for label, path in _weight_files(cfg):
        h.update(f"{label}:{sha256_file(path)}\n".encode())
    return {"model": cfg.model.name_or_path, "archive": cfg.model.archive, "dtype": cfg.model.reference_dtype,
            "sha256": h.hexdigest()}


def _weight_files(cfg: Config) -> list[tuple[str, Path]]:
    model_dir = Path(cfg.model.name_or_path)
    files = [("model/" + p.name, p) for pattern in WEIGHT_FILES for p in sorted(model_dir.glob(pattern))]
    if cfg.model.archive:
        archive = Path(cfg.model.archive)
        if archive.is_dir():
            archive_dir = resolve_model_dir(archive)
            files += [("archive/" + p.name, p) for p in sorted(archive_dir.glob("*.safetensors"))]
        elif archive.exists():
            files.append(("archive/" + archive.name, archive))
    return files


def compile_reference(cfg: Config, device: torch.device, pairs: int) -> bool:
    """Whether the pass compiles its reference: `compile` as set, or with compile: null where a run would
    compile (compiling.compile_wanted) and the pass is long enough to earn back the compile time."""
    wanted = compile_wanted(cfg, device)
    return wanted if cfg.compile is not None else wanted and pairs >= COMPILE_FROM_PAIRS


@torch.no_grad()
def precompute_reference(shards: str | Path, cfg: Config, batch_size: int | None = None, progress=None) -> dict[str, Any]:
    """Add `ref_chosen_logp` / `ref_rejected_logp` to every split; return the new manifest.
    Does nothing when the shards already carry log-probs of this very reference."""
    shards = Path(shards)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    manifest = check_shards(shards, cfg, tokenizer, "dpo")
    identity = reference_identity(cfg)
    if manifest.get("reference") == identity:
        return manifest

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pairs = sum(f["rows"] for info in manifest["splits"].values() for f in info["files"])
    reference = Reference(cfg, device, compile_reference(cfg, device, pairs))
    flash4.configure(cfg.model.flash_attention, device, reference.layout != PADDED,
                     flash4.attention_width(reference.model.lm.config))
    batch_size = batch_size or cfg.eval_batch_size
    tag = identity["sha256"][:12]

    tmp = shards / ".precompute-ref"
    shutil.rmtree(tmp, ignore_errors=True)
    rows_per_file = max(f["rows"] for info in manifest["splits"].values() for f in info["files"])
    writer = ShardWriter(tmp, "dpo", shard_rows=rows_per_file, extra_columns=REF_COLUMNS)
    for split in manifest["splits"]:
        table = open_split(shards, split, manifest)
        for start in range(0, table.num_rows, batch_size):
            rows = table.take(np.arange(start, min(start + batch_size, table.num_rows))).to_pylist()
            batch = collate(rows, "dpo", pad_token_id(tokenizer), reference.layout, cfg.max_length)
            logps = reference(to_device(batch, device))
            n = len(rows)
            for row, chosen, rejected in zip(rows, logps[:n].tolist(), logps[n:].tolist()):
                row = {k: v for k, v in row.items() if k not in REF_COLUMNS}
                writer.write(split, {**row, "ref_chosen_logp": chosen, "ref_rejected_logp": rejected})
            if progress is not None:
                progress(split, min(start + batch_size, table.num_rows), table.num_rows)
    new_splits = writer.close()

    # move the new files in under new names; the old manifest still describes the old files
    for split, info in new_splits.items():
        for f in info["files"]:
            name = Path(f["path"]).name.replace(".arrow", f"-ref-{tag}.arrow")
            target = shard_path(shards, f"{split}/{name}")
            shutil.move(str(tmp / f["path"]), target)
            f["path"] = f"{split}/{name}"
        new_splits[split] = {**manifest["splits"][split], **info}
    new_manifest = {**manifest, "splits": new_splits, "reference": identity}
    old_files = [shard_path(shards, f["path"]) for info in manifest["splits"].values() for f in info["files"]]
    finish_output(shards, new_manifest)  # the commit point: an atomic rename of manifest.json

    for split, info in new_splits.items():
        write_datasets_sidecars(shards / split, info["files"], writer.schema)
    keep = {shard_path(shards, f["path"]) for info in new_splits.values() for f in info["files"]}
    for path in old_files + [p for split in new_splits for p in (shards / split).glob("shard-*-ref-*.arrow")]:
        if path not in keep and path.exists():
            path.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    return new_manifest

