"""`aligntrain train`: the seed config's raw `datasets` converted to shards, cached.

    datasets: [{type: custom_dataset, path: raw.json}, ...]
      -> aligndata.write.convert.convert_files(...) into ${XDG_CACHE_HOME:-~/.cache}/aligntools/shards/<task>-<key>/

The key hashes the input files' contents and every conversion setting, so an unchanged config
and data reuse the shards; anything else converts into a new directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from aligndata.options import ENCODING_RULES, ConvertOptions
from aligndata.write.shards import sha256_file

from .config import Config, ConfigError, cache_dir


def raw_inputs(cfg: Config) -> list[Path]:
    if not cfg.datasets:
        raise ConfigError("config: `aligntrain train` needs datasets: [{type: custom_dataset, path: FILE}]; "
                          "to train on converted shards use `aligntrain sft|dpo SHARDS CONFIG`")
    paths = []
    for i, ds in enumerate(cfg.datasets):
        if ds.type != "custom_dataset":
            raise ConfigError(f"config: datasets[{i}] has type {ds.type!r}: only custom_dataset (a local JSON/JSONL "
                              "file) is supported; nothing is downloaded. Export the dataset to a file first")
        path = Path(ds.path)
        if not path.is_file():
            raise ConfigError(f"config: datasets[{i}].path {ds.path!r} is not a file")
        paths.append(path)
    return paths


def conversion_options(cfg: Config, progress: bool = False) -> ConvertOptions:
    """What `aligndata convert` is told for the config's datasets (the rest keeps its defaults)."""
    cuts_prompts = cfg.task == "dpo" and cfg.length_policy == "truncate"  # the only case max_prompt_length acts in
    return ConvertOptions(task=cfg.task, tokenizer=cfg.tokenizer_path, max_length=cfg.max_length,
                          max_prompt_length=cfg.max_prompt_length if cuts_prompts else None,
                          length_policy=cfg.length_policy, chat_template=cfg.chat_template,
                          eval_fraction=cfg.eval_fraction, seed=cfg.seed, on_error=cfg.on_error, progress=progress)


def shards_cache_dir(options: ConvertOptions, inputs: list[Path]) -> Path:
    # A new key converts every cached dataset again: keys are added only where old caches must not stand.
    key = {"inputs": [sha256_file(p) for p in inputs], "task": options.task,
           "tokenizer": str(Path(options.tokenizer).resolve()), "max_length": options.max_length,
           "max_prompt_length": options.max_prompt_length, "length_policy": options.length_policy,
           "chat_template": options.chat_template, "eval_fraction": options.eval_fraction, "seed": options.seed,
           "encoding_rules": ENCODING_RULES}  # new rules: a new cache, never an older conversion refused as foreign
    if options.on_error == "skip":  # shards that left records out are not those a failing run would refuse to make
        key["on_error"] = "skip"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "shards" / f"{options.task}-{digest}"


def prepare_shards(cfg: Config, progress: bool = False) -> tuple[Path, bool, str | None]:
    """Convert the config's datasets (or reuse an earlier conversion).
    Returns (shards dir, reused, a line on the records left out, or None)."""
    from aligndata.write.convert import convert_files  # imported here: conversion is only needed by `aligntrain train`

    from .modeling import load_tokenizer

    inputs = raw_inputs(cfg)
    load_tokenizer(cfg.tokenizer_path)  # a missing model directory is a config error, named as such
    options = conversion_options(cfg, progress)
    out_dir = shards_cache_dir(options, inputs)
    result = convert_files([str(p) for p in inputs], out_dir, options)
    rejected = sum((result.manifest.get("counts") or {}).get("rejected", {}).values())
    left_out = None
    if rejected:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(result.manifest["counts"]["rejected"].items()))
        noun = "record" if rejected == 1 else "records"
        left_out = f"{rejected} raw {noun} rejected ({reasons}); each with its reasons in {out_dir / 'rejects.jsonl'}"
    return out_dir, bool(result.skipped), left_out
