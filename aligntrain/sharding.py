"""FSDP2 (torch's `fully_shard`) for `trainer: FSDPTrainer` over several processes, and its checkpoints.

Each decoder layer is sharded on its own (its weights gathered just before it runs and freed after),
and the wrapper that computes log-probs (modeling.SequenceLogps) is the root: the embeddings, the final
norm and the LM head belong to it, so they are gathered when its forward starts, also where the head's
weight is read directly rather than through `lm_head`'s forward. Parameters become DTensors sharded on
dim 0 over the processes; the optimizer is built over them afterwards and keeps only its shard of the
state. Gradients are reduce-scattered as each layer's backward ends, averaged over the processes like
DDP's, so the trainer's loss scaling holds unchanged.

Accelerate still launches the processes, joins them into one process group (NCCL on GPUs, gloo on CPU)
and runs the optimizer; it is not given the model, which it would wrap in DDP. Mixed precision is the
run's autocast (policy_dtype) over float32 master weights, as on one device; `model.fsdp_policy_mp` (the
seed's key) also gathers the weights and reduces the gradients in that dtype.

Checkpoints: every process writes its own shard of the weights and of the optimizer state
(torch.distributed.checkpoint, `sharded/` in the checkpoint directory), no process gathers the model,
and resuming reads them back into the same sharding, or another number of processes (the reader
reshards). The checkpoint at the end of training also holds the consolidated Hugging Face weights;
`aligntrain export` consolidates any sharded checkpoint on one device (`consolidate`).
"""

from __future__ import annotations

import contextlib
import errno
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

SHARDED = "sharded"  # the folder of a checkpoint that holds torch.distributed.checkpoint's files


def fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (public from torch 2.6)
    except ImportError:
        return False
    return True


def shard(wrapper: nn.Module, device: torch.device, mp_dtype: torch.dtype | None = None,
          reshard_root: bool = False) -> nn.Module:
    """fully_shard every decoder layer of `wrapper.lm`, then `wrapper` itself, in place (on `device` first).
    `mp_dtype`: the dtype weights are gathered and gradients reduced in (None: their own, float32).
    `reshard_root`: free the root's gathered weights after its forward too (a model only forwarded)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .compiling import decoder_layers

    wrapper.to(device)
    policy = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=mp_dtype) if mp_dtype is not None \
        else MixedPrecisionPolicy()
    layers = decoder_layers(wrapper.lm)
    if not layers:
        raise ValueError(f"{type(wrapper.lm).__name__} names no decoder layer class (_no_split_modules) to shard by")
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(wrapper, mp_policy=policy, reshard_after_forward=reshard_root)
    return wrapper


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch older than 2.6: nothing is
        return False
    return isinstance(model, FSDPModule)


def weights_only_sharded(checkpoint: Path) -> bool:
    """A checkpoint whose weights are in sharded/ alone (not its run's last): `aligntrain export` makes a model
    directory of it."""
    checkpoint = Path(checkpoint)
    return (checkpoint / SHARDED).is_dir() and not any(
        (checkpoint / name).exists() for name in ("model.safetensors", "model.safetensors.index.json",
                                                  "adapter_model.safetensors", "pytorch_model.bin"))


def gradient_sync(model: nn.Module, sync: bool):
    """A context in which backward reduce-scatters gradients (sync) or keeps accumulating them unsharded
    (a micro-batch that is not the step's last)."""
    @contextlib.contextmanager
    def context():
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    return context()


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """The global gradient norm over every process's shards, gradients scaled down to max_norm if above."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm, foreach=True)
    return float(norm)


def _options(full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...}: this process's shards (DTensors), as torch.distributed.checkpoint
    writes and reads them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, [optimizer] if optimizer is not None else [],
                                               options=_options(False))
    return {"model": model_state, **({"optimizer": optim_state} if optimizer is not None else {})}


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Every process writes its shards of the weights (and of the optimizer state) under `directory`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(_state(model, optimizer), checkpoint_id=str(directory))
    except CheckpointException as e:  # a BaseException that holds each process's error (a full disk, ...)
        raise OSError(errno.EIO, f"write failed, disk full? ({_failure(e)})", str(directory)) from None


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Read a save_sharded directory back into `model` (and `optimizer`), sharded as they are now (or not
    sharded: one process reads every shard)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    _load(state, directory, no_dist=not _distributed())
    set_state_dict(model, [optimizer] if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}), options=_options(False))


def _load(state: dict[str, Any], directory: Path, no_dist: bool) -> None:
    """dcp.load; a missing, truncated or foreign file is a ValueError saying what the reader found."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # that no process group is up, when none is meant to be
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(directory), no_dist=no_dist)
    except CheckpointException as e:
        raise ValueError(_failure(e)) from None


def _failure(e: BaseException) -> str:
    """The first process's error of a CheckpointException (rank -> (exception, traceback)), on one line."""
    failures = getattr(e, "failures", None) or {}
    first = next(iter(failures.values()), e)
    error = first[0] if isinstance(first, tuple) and first else first
    text = str(error).strip().splitlines()
    return type(error).__name__ + (f": {text[-1]}" if text else "")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def has_optimizer_state(directory: Path) -> bool:
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    return any(key.startswith("optimizer.") for key in metadata.state_dict_metadata)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, on the CPU of the main process (collective: every process calls it; the
    others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(True))


def consolidate(directory: Path, lm: nn.Module, prefix: str = "lm.") -> nn.Module:
    """Load the weights of a save_sharded directory into `lm`, an unsharded model of the same architecture,
    in one process (no process group): the checkpoint's `prefix` keys are lm's."""
    weights = lm.state_dict()
    state: dict[str, Any] = {"model": {prefix + k: v for k, v in weights.items()}}
    _load(state, directory, no_dist=True)
    lm.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items()})
    return lm
