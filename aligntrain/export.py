"""`aligntrain export`: a checkpoint (or a run's latest) as a model directory for other tools.

    full-weights checkpoint        -> the Hugging Face model and tokenizer (training state left behind)
    sharded checkpoint (FSDPTrainer) -> the same: the processes' shards consolidated on one device (float32)
    LoRA checkpoint                -> the adapter in peft's layout and the tokenizer
    LoRA checkpoint, --merge       -> base (+ archive) with the adapter merged in: a plain Hugging Face
                                      model (float32) that `from_pretrained` loads without peft

OUT is written under a temporary name beside it and renamed when complete, so it is whole or absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from aligndata.errors import InputError

from .config import ConfigError
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_base, is_adapter_dir, load_adapter_model
from .modeling import first_line, resolve_model_dir
from .sharding import SHARDED, consolidate, weights_only_sharded

# What a checkpoint holds only to continue training (checkpoint.py writes them), and what only an
# adapter directory holds (peft's model card among them), left out of a merged model.
TRAINING_FILES = ("optimizer*", "scheduler.pt", "rng_state_*.pt", "trainer_state.json", "config.yaml", SHARDED)
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md")


def export_model(source: str | Path, out: str | Path, merge: bool = False) -> dict[str, str]:
    """Write the model of `source` (model dir, checkpoint or run dir) to `out`; return what was written."""
    checkpoint = resolve_model_dir(source)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: already exists; choose another OUT or remove it")
    adapter = is_adapter_dir(checkpoint)
    if adapter and not merge and adapter_base(checkpoint)[1]:
        raise ConfigError(f"{checkpoint}: this adapter was trained on model.archive merged into its base, which an "
                          "adapter directory cannot record; export it with --merge")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if adapter and merge:
            shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns(*TRAINING_FILES, *ADAPTER_FILES))
            load_adapter_model(checkpoint).merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            kind = "merged model"
        elif weights_only_sharded(checkpoint):
            shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns(*TRAINING_FILES))
            consolidated_model(checkpoint).save_pretrained(tmp, safe_serialization=True)
            kind = "model (consolidated from sharded/)"
        else:  # a model directory or an adapter as it stands: copied file by file
            shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns(*TRAINING_FILES))
            kind = "adapter" if adapter else "model"
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"source": str(checkpoint), "out": str(out), "kind": kind}


def consolidated_model(checkpoint: Path):
    """The model of a sharded checkpoint, built from its config.json and its shards read in one process."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as e:
        raise InputError(f"{checkpoint / 'config.json'}: cannot be read ({first_line(e)}); the checkpoint is damaged") from None
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        return consolidate(checkpoint / SHARDED, lm)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise InputError(f"{checkpoint / SHARDED}: cannot be read ({first_line(e)}); the checkpoint is damaged") from None
