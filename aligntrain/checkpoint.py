"""Checkpoints: a Hugging Face model directory plus what it takes to continue exactly.

    RUN/checkpoints/step-0000040/
        config.json, model.safetensors, generation_config.json   from_pretrained / inference servers
          (model.lora: adapter_config.json, adapter_model.safetensors instead, peft's layout)
        tokenizer files                                          the directory is self-contained
        optimizer.pt, scheduler.pt                               (optimizer.pt unless save_optimizer: false)
        sharded/                                                 FSDPTrainer (FSDP2): each process's shards of the
                                                                 weights and optimizer state (torch.distributed.
                                                                 checkpoint) instead of optimizer.pt, and instead of
                                                                 model.safetensors but in the last checkpoint
        rng_state_<rank>.pt                                      python, numpy, torch (and CUDA) RNGs
        config.yaml                                              the run config (${oc.env:...} values as written)
        trainer_state.json                                       step, position, last metrics: written last

A checkpoint is written into `.tmp-step-...` and renamed when complete, so `latest_checkpoint`
never sees a half-written one; an interrupted save leaves only a `.tmp-` directory, removed by the
next save of the same step.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError

from aligndata.errors import InputError
from aligndata.write.atomic import atomic_write_text, fsync_dir

from .config import Config, ConfigError, to_yaml
from .modeling import first_line
from .sharding import SHARDED, full_weights, has_optimizer_state, is_sharded, load_sharded, save_sharded

CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `directory` (a checkpoints/ dir), or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / STATE).exists()]
    return max(found)[1] if found else None


def save_checkpoint(accelerator, run_dir: Path, step: int, model, optimizer, scheduler, tokenizer, cfg: Config,
                    state: dict[str, Any]) -> Path:
    """Write checkpoint `step` (every process must call this: FSDP gathers weights collectively)."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    sharded = is_sharded(model)
    if sharded:  # each process writes its shards; the whole model only at the end (and a LoRA run's small adapters)
        with _naming(tmp / SHARDED):
            save_sharded(tmp / SHARDED, model, getattr(optimizer, "optimizer", optimizer) if cfg.save_optimizer else None)
        whole = step == state.get("total_steps") or cfg.model.lora is not None
        full_state = full_weights(model) if whole else None
    else:
        full_state = accelerator.get_state_dict(model)
    plugin = _is_fsdp(accelerator)  # Accelerate's FSDP (never together with sharding.py's)
    if accelerator.is_main_process:
        lm = accelerator.unwrap_model(model).lm
        try:
            with _naming(tmp):
                if full_state is not None:
                    weights = {k[len("lm."):]: v for k, v in full_state.items() if k.startswith("lm.")}
                    lm.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
                else:  # the model's config files without its weights (sharded/ has them)
                    lm.config.save_pretrained(tmp)
                    if getattr(lm, "generation_config", None) is not None:
                        lm.generation_config.save_pretrained(tmp)
        except SafetensorError as e:  # a full disk, reported by the Rust writer
            raise OSError(errno.EIO, f"write failed, disk full? ({e})", str(tmp / "model.safetensors")) from None
        with _naming(tmp):
            tokenizer.save_pretrained(tmp)
        with _naming(tmp / "config.yaml"):
            (tmp / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        if cfg.save_optimizer and not (plugin or sharded):
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
    if cfg.save_optimizer and plugin:
        from accelerate.utils import save_fsdp_optimizer

        save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(tmp))
    _torch_save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        with _naming(tmp / STATE):
            atomic_write_text(tmp / STATE, json.dumps({**state, "step": step}, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        if cfg.keep_checkpoints:
            prune_checkpoints(root, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return final


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save; its zip writer reports a failed write (a full disk) as a RuntimeError: make it the OSError it is."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        raise OSError(errno.EIO, f"write failed, disk full? ({first_line(e)})", str(path)) from None


def load_training_state(checkpoint: Path, accelerator, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore optimizer, scheduler and this process's RNGs (the weights were loaded with the model).
    A missing or unreadable file is an InputError naming it."""
    if (checkpoint / SHARDED).is_dir():  # saved by sharding.py: read into this run's sharding (or none)
        try:
            with_optimizer = has_optimizer_state(checkpoint / SHARDED)
            if with_optimizer:
                load_sharded(checkpoint / SHARDED, model if is_sharded(model) else accelerator.unwrap_model(model),
                             getattr(optimizer, "optimizer", optimizer))
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise damaged_checkpoint(checkpoint, checkpoint / SHARDED, f"cannot be read ({first_line(e)})") from None
        if not with_optimizer:
            raise _no_optimizer_state(checkpoint, checkpoint / SHARDED)
    elif is_sharded(model):
        raise ConfigError(f"{checkpoint}: saved unsharded (optimizer.pt, by one process) and this run shards the model "
                          "over several; resume it in one process, or start a new run from its weights "
                          "(model.name_or_path)")
    elif _is_fsdp(accelerator):
        if not any(checkpoint.glob("optimizer*.bin")):
            raise _no_optimizer_state(checkpoint, checkpoint / "optimizer*.bin")
        from accelerate.utils import load_fsdp_optimizer

        load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(checkpoint))
    else:
        path = checkpoint / "optimizer.pt"
        if not path.exists():
            raise _no_optimizer_state(checkpoint, path)
        optimizer.load_state_dict(_torch_load(checkpoint, path))
    scheduler.load_state_dict(_torch_load(checkpoint, checkpoint / "scheduler.pt"))
    rng_path = checkpoint / f"rng_state_{accelerator.process_index}.pt"
    if rng_path.exists():
        set_rng_state(_torch_load(checkpoint, rng_path))
    return json.loads((checkpoint / STATE).read_text(encoding="utf-8"))


def damaged_checkpoint(checkpoint: Path, path: Path, why: str) -> InputError:
    return InputError(f"{path}: {why}; the checkpoint is damaged: move {checkpoint} away to resume from the one "
                      "before it")


def _torch_load(checkpoint: Path, path: Path) -> Any:
    if not path.exists():
        raise damaged_checkpoint(checkpoint, path, "missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a bad pickle: torch raises several types for the same "unreadable"
        raise damaged_checkpoint(checkpoint, path, f"cannot be read ({first_line(e)})") from None


def _no_optimizer_state(checkpoint: Path, path: Path) -> Exception:
    """Saved without it on purpose (a config choice), or lost since (a damaged checkpoint)."""
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8")) or {}
    if saved.get("save_optimizer") is False:
        return ConfigError(f"{checkpoint}: no optimizer state (saved with save_optimizer: false); cannot resume exactly")
    return damaged_checkpoint(checkpoint, path, "missing, though the run saved its optimizer state (deleted or moved?); "
                                                "cannot resume exactly")


@contextlib.contextmanager
def _naming(path: Path):
    """An OSError that names no file (a full disk inside a library's writer) names `path`."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def prune_checkpoints(root: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)))
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_fsdp(accelerator) -> bool:
    return getattr(accelerator.state, "fsdp_plugin", None) is not None and accelerator.num_processes > 1
