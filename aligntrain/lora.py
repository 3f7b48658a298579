"""LoRA adapters with peft: the policy is the frozen base model plus trained low-rank adapters.

    model.name_or_path (+ model.archive) ──load, frozen, in reference_dtype──> base
    base ──get_peft_model(model.lora)──> policy: adapters (and modules_to_save) in float32, trained
    DPO reference = the same policy with its adapters switched off (peft's disable_adapter): no
    second model in memory, and exactly the model `Reference` and `precompute-ref` load
    (name_or_path + archive in reference_dtype, under the training autocast), so live, stored and
    separately loaded reference log-probs agree.

A checkpoint of a LoRA run holds the adapter in peft's layout (adapter_config.json +
adapter_model.safetensors), which `PeftModel.from_pretrained(base, checkpoint)` loads; its
config.yaml says which archive, if any, was merged into the base first.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import Config, ConfigError, LoraConfig, require_peft
from .modeling import first_line, load_archive, load_causal_lm, model_inputs

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_config(lora: LoraConfig):
    """Our `model.lora` section as peft's LoraConfig."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    return PeftLoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or None)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def lora_policy(cfg: Config, resume_from: Path | None):
    """The trainable policy of a LoRA run; on resume its adapter weights come from the checkpoint."""
    from peft import get_peft_model

    base = load_causal_lm(cfg.model.name_or_path, cfg.model.reference_dtype, cfg.model.attn_implementation)
    if cfg.model.archive:
        load_archive(base, cfg.model.archive)
    try:
        with torch.random.fork_rng(devices=[]):  # lora_A's random init follows the run's seed, and only it
            torch.manual_seed(cfg.seed)
            policy = get_peft_model(base, peft_config(cfg.model.lora))
    except ValueError as e:  # target or modules_to_save names that the model does not have
        raise ConfigError(f"model.lora: {first_line(e)}") from None
    for p in policy.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # float32 master weights, as in full training (the base may be bf16)
    if resume_from is not None:
        load_adapter_weights(policy, resume_from)
    return policy


def load_adapter_weights(policy, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = checkpoint / ADAPTER_WEIGHTS
    if not path.exists():
        raise ConfigError(f"{checkpoint}: no {ADAPTER_WEIGHTS}; it was not written by a run with model.lora")
    try:
        result = set_peft_model_state_dict(policy, load_file(str(path)))
    except RuntimeError as e:  # shapes differ: model.lora.r or target_modules changed since the checkpoint
        raise ConfigError(f"{checkpoint}: the adapter does not fit model.lora ({first_line(e)})") from None
    if result.unexpected_keys:
        raise ConfigError(f"{checkpoint}: the adapter has weights that model.lora does not create, e.g. "
                          f"{result.unexpected_keys[:3]} (did target_modules or modules_to_save change?)")


class AdapterOffReference:
    """DPO's reference under LoRA: the training model itself with its adapters switched off.
    `model` is the (accelerate-prepared) SequenceLogps around `policy`, so FSDP and autocast apply."""

    def __init__(self, model, policy):
        self.model = model
        self.policy = policy

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        with self.policy.disable_adapter():
            return self.model(**model_inputs(batch))[0]


def fsdp_wrap_policy(policy):
    """FSDP units for a peft model: each decoder layer, and each trainable leaf (lora_A, lora_B, the
    copies of modules_to_save) on its own, so that no unit mixes the frozen base's dtype with the
    adapters' float32 (FSDP flattens a unit's parameters into one tensor of one dtype)."""
    from peft.utils.other import fsdp_auto_wrap_policy

    return fsdp_auto_wrap_policy(policy)


# -- adapters after training: merge, load for generation --------------------------------------------

def merge_adapter_into(model, adapter_dir: Path) -> None:
    """Add the adapter's low-rank updates into `model`'s own weights, in place (an adapter as model.archive)."""
    from peft import PeftModel

    require_peft(f"{adapter_dir}: a LoRA adapter")
    trainable = [p.requires_grad for p in model.parameters()]
    PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    for p, flag in zip(model.parameters(), trainable):  # peft froze them; a full-weight policy trains them
        p.requires_grad_(flag)


def adapter_base(adapter_dir: Path) -> tuple[str, str | None]:
    """(base model path, archive merged into it or None) of an adapter directory: the base from
    adapter_config.json, the archive from the run config saved beside it (a checkpoint of ours)."""
    import yaml

    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    run_config = adapter_dir / "config.yaml"
    archive = None
    if run_config.exists():
        archive = (yaml.safe_load(run_config.read_text(encoding="utf-8")).get("model") or {}).get("archive")
    if not base or not Path(base).exists():
        raise ConfigError(f"{adapter_dir}: the LoRA adapter's base model {base!r} (base_model_name_or_path in "
                          f"{ADAPTER_CONFIG}) does not exist here")
    return base, archive


def load_adapter_model(adapter_dir: Path, dtype: str = "float32"):
    """Base (+ archive) with the adapter of `adapter_dir` applied (a peft model), frozen."""
    from peft import PeftModel

    require_peft(f"{adapter_dir}: a LoRA adapter")
    base_path, archive = adapter_base(adapter_dir)
    base = load_causal_lm(base_path, dtype, trainable=False)
    if archive:
        load_archive(base, archive)
    return PeftModel.from_pretrained(base, str(adapter_dir))
