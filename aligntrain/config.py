"""The training config: typed dataclasses, read from the seed project's YAML, validated on load.

A config is YAML with the seed project's keys (`seed`, `exp_name`, `lr`, `total_batch_size`,
`model: {name_or_path, ...}`, `loss: {name, beta, ...}`, ...) plus the few a longer-lived trainer
needs (scheduler, weight decay, a token budget per micro-batch). `load_config` reads the file,
applies `--overrides key=value` (dotted keys reach nested groups), resolves `${key}` references,
then checks every key before anything heavy is imported or loaded:

    unknown key        config.yml: unknown key 'lrr' (did you mean 'lr'?)
    missing key        config.yml: missing required key 'model.name_or_path'
    wrong type         config.yml: key 'lr' must be a number, got 'fast' (str)
    bad override       --overrides: unknown key 'model.polcy_dtype' (did you mean 'model.policy_dtype'?)
                       --overrides lr=fast: key 'lr' must be a number, got 'fast' (str)

Keys that other trainers spell differently get a suggestion by meaning (`learning_rate` -> `lr`). A config
needs `exp_name` and `model.name_or_path` (and `loss.name` under `aligntrain train`); every other key has a
default, and `defaults_note` names the ones a run took from there.

Some seed keys were renamed; the seed spellings are still read and mean the same thing:
`output_dirs` -> `output_dir`, `save_model_step` -> `save_every_steps`, `print_log_step` ->
`log_every_steps`, and `batch_size` (the seed README's `--overrides batch_size=32`) ->
`total_batch_size`. The resolved config (our spellings) is what `to_yaml` writes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from aligndata.errors import InvalidDataError

from .losses import PREFERENCE_LOSSES

# The dtype names a config accepts, each with accelerate's mixed-precision name; the name is also
# torch's attribute name (modeling.torch_dtype), so this table is the only list of dtypes.
MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
DtypeName = Literal[tuple(MIXED_PRECISION)]
TASK_OF_LOSS = {"sft": "sft", **{name: "dpo" for name in PREFERENCE_LOSSES}}
LossName = Literal[tuple(TASK_OF_LOSS)]

SEED_ALIASES = {"output_dirs": "output_dir", "save_model_step": "save_every_steps", "print_log_step": "log_every_steps",
                "batch_size": "total_batch_size"}
REQUIRED = ("exp_name", "model.name_or_path", "loss.name")
TRAIN_MAX_LENGTH = 512  # what `aligntrain train` converts with when the config sets no max_length (the seed's default)


class ConfigError(InvalidDataError):
    """The config cannot be used: the message names the key and what to change."""


@dataclass
class DatasetConfig:
    type: Literal["custom_dataset", "huggingface_dataset"]  # only custom_dataset (a local JSON/JSONL file) is converted
    path: str | None = None  # the raw file, relative to the working directory
    name: str | None = None  # seed's huggingface_dataset name (hh, shp, se): refused, we never download


@dataclass
class LoraConfig:
    """LoRA adapters (peft): the base weights stay frozen; only the adapters (and modules_to_save) train."""
    r: int = 16  # the adapters' rank
    alpha: float = 32.0  # scale: the update is B @ A * alpha / r
    dropout: float = 0.0  # on the adapters' input (the base model's own dropout stays off)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # module names (q_proj, ...) or every linear layer but the head
    modules_to_save: list[str] = field(default_factory=list)  # modules trained in full, e.g. [embed_tokens, lm_head]


@dataclass
class ModelConfig:
    name_or_path: str = ""  # a local Hugging Face model directory (nothing is downloaded)
    tokenizer_name_or_path: str | None = None  # defaults to name_or_path
    archive: str | None = None  # seed policy.pt, one of our checkpoints, or one of our run dirs (latest checkpoint)
    policy_dtype: DtypeName = "float32"  # bfloat16/float16 = mixed precision
    reference_dtype: DtypeName = "float32"  # the frozen reference's weights
    fsdp_policy_mp: DtypeName | None = None  # seed key: FSDP param dtype
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    cudnn_attention: bool = False  # true lets SDPA pick cuDNN's kernel on CUDA (slower here: a host-side plan per padded shape)
    flash_attention: Literal["fa2", "fa4"] | None = None  # padding-free attention's kernel on CUDA: aten's FlashAttention 2, or FA4 (flash-attn-4, Hopper/Blackwell); null: fa4 where it is installed and runs, for models at least 2048 wide, not under cuda_graphs (flash4.configure)
    lora: LoraConfig | None = None  # train LoRA adapters instead of the full weights (needs peft)


@dataclass
class LossConfig:
    name: LossName = "sft"  # sft or a name in losses.PREFERENCE_LOSSES
    beta: float = 0.1  # DPO temperature; IPO's tau; hinge's 1/margin
    label_smoothing: float = 0.0  # conservative DPO: probability that a preference label is flipped
    reference_free: bool = False  # ignore the reference model (an implicit uniform reference)
    precomputed_reference: Literal["auto", "ignore"] = "auto"  # use shard ref log-probs when present


@dataclass
class WandbConfig:
    enabled: bool = False
    entity: str | None = None
    project: str = "aligntools"


@dataclass
class Config:
    # -- seed keys ------------------------------------------------------------------------------
    exp_name: str = ""  # names the run (and its default output_dir)
    seed: int = 0
    debug: bool = False  # seed meaning: no wandb, no checkpoints
    datasets: list[DatasetConfig] = field(default_factory=list)  # raw files for `aligntrain train`
    trainer: Literal["BasicTrainer", "FSDPTrainer"] = "BasicTrainer"
    optimizer: Literal["AdamW", "Adam", "RMSprop", "SGD"] = "AdamW"
    lr: float = 5e-7
    total_batch_size: int = 8  # examples per optimizer step, over all processes and micro-batches
    gradient_accumulation_steps: int = 1  # micro-batches per step (unless tokens_per_batch is set)
    eval_batch_size: int = 8
    max_length: int | None = None  # must equal the shards' max_length; null: the shards' (`train`: TRAIN_MAX_LENGTH)
    max_prompt_length: int | None = None  # preference losses: the prompt's budget; null: half of max_length
    n_epochs: int | None = 1
    n_examples: int | None = None  # if set, train on this many examples (wins over n_epochs)
    warmup_steps: int = 0
    max_grad_norm: float | None = 10.0
    activation_checkpointing: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    report_to_tensorboard: bool = False
    do_first_eval: bool = False
    eval_every_steps: int | None = None
    n_eval_examples: int | None = 256
    output_dir: str = "runs/${exp_name}"  # seed: output_dirs
    save_every_steps: int | None = None  # seed: save_model_step; a final checkpoint is always written
    log_every_steps: int = 1  # seed: print_log_step
    save_optimizer: bool = True  # seed key; without optimizer state a checkpoint cannot be resumed
    # -- added ------------------------------------------------------------------------------------
    scheduler: Literal["constant", "linear", "cosine"] = "constant"  # after warmup (seed: constant)
    min_lr_ratio: float = 0.0  # floor of linear/cosine decay, as a fraction of lr
    weight_decay: float = 0.0  # on matrices only, never on norms and biases
    tokens_per_batch: int | None = None  # token budget per micro-batch (replaces the fixed split): padded tokens, or real ones when padding-free
    padding_free: bool | None = None  # one stream of real tokens per micro-batch, attention per sequence; null: wherever the model allows
    share_prompt: bool = True  # padding-free DPO: forward each prompt once, both completions attending to it
    compile: bool | None = None  # torch.compile each decoder layer and the head's log-softmax; null: on CUDA without LoRA
    working_weights: bool | None = None  # bf16 working copies of the decoder layers' linear weights beside their float32 masters (masters.py); null: on one GPU, compiled, bfloat16 Adam(W)
    cuda_graphs: bool = False  # padding-free training forwards replay CUDA graphs of the decoder stack (graphs.py)
    cuda_graph_buckets: int = 4  # stream lengths recorded (one graph pair and one set of gradient buffers each)
    logprob_chunk_tokens: int | None = None  # rows per lm-head chunk; null: 1024, or 2 GiB of logits for SFT's Triton head
    keep_checkpoints: int | None = None  # keep only the newest N checkpoints
    eval_fraction: float = 0.0  # `aligntrain train`: share of records converted into the eval split
    chat_template: str | None = None  # `aligntrain train`: template for conversion (default: the tokenizer's)
    length_policy: Literal["drop", "truncate"] = "drop"  # `aligntrain train`: records longer than max_length
    on_error: Literal["fail", "skip"] = "fail"  # `aligntrain train`: an invalid raw record stops, or goes to the rejects file

    # Not a config key: the keys neither the file nor --overrides set, in order (set by load_config), so that a run
    # can say which values it took from the defaults.
    defaulted = ()

    @property
    def task(self) -> str:
        return TASK_OF_LOSS[self.loss.name]

    @property
    def tokenizer_path(self) -> str:
        return self.model.tokenizer_name_or_path or self.model.name_or_path


# -- loading ------------------------------------------------------------------------------------

def load_config(path: str | Path, overrides: list[str] | None = None, defaults: dict[str, Any] | None = None) -> Config:
    """Read YAML, apply `key=value` overrides, resolve `${key}`, type-check and validate.
    `defaults` ({"loss.name": "sft"}) fill dotted keys the file leaves unset, before the overrides."""
    path = Path(path)
    where = path.name
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"), where)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, got {type(raw).__name__}")
    raw = _apply_aliases(raw, where)
    for item in overrides or []:
        key, value = parse_override(item)
        _check_override_type(_canonical_key(key), value, item)
        _set_dotted(raw, _canonical_key(key), value)
    defaulted = _unset_keys(raw)
    for key, value in (defaults or {}).items():
        if _get_dotted(raw, key) is None:
            _set_dotted(raw, key, value)
    _check_keys(Config, raw, where, prefix="")  # a typo is named before any reference is resolved
    raw, from_environment = _resolve_references(raw, where)
    cfg = _build(Config, raw, where, prefix="")
    cfg._written = from_environment
    cfg.defaulted = defaulted
    _expand_home(cfg)
    validate(cfg, where)
    return cfg


def _expand_home(cfg: Config) -> None:
    """`~/...` in path keys means the home directory, as in a shell."""
    m = cfg.model
    m.name_or_path, m.tokenizer_name_or_path, m.archive = (
        os.path.expanduser(p) if p else p for p in (m.name_or_path, m.tokenizer_name_or_path, m.archive))
    cfg.output_dir = os.path.expanduser(cfg.output_dir)
    for ds in cfg.datasets:
        ds.path = os.path.expanduser(ds.path) if ds.path else ds.path


def parse_override(item: str) -> tuple[str, Any]:
    """`model.policy_dtype=bfloat16` -> ('model.policy_dtype', 'bfloat16'); the value is read as YAML."""
    if "=" not in item or not item.split("=", 1)[0].strip():
        raise ConfigError(f"--overrides: {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = read_yaml(text, "--overrides") if text.strip() else ""
    except ConfigError as e:
        if not isinstance(e.__cause__, yaml.YAMLError):  # an alias bomb is refused here too
            raise
        value = text  # not YAML: the text itself, as the seed's `--overrides exp_name=a:b` meant
    known = _all_keys(Config)
    canonical = _canonical_key(key)
    if canonical not in known and not any(k.startswith(canonical + ".") for k in known):
        raise ConfigError(f"--overrides: unknown key {key!r}{_suggest(key, known)}")
    return key, value


def _check_override_type(key: str, value: Any, item: str) -> None:
    """A value of the wrong type is the override's error, not the file's: `--overrides lr=fast: key 'lr' ...`."""
    cls: Any = Config
    *groups, name = key.split(".")
    for group in groups:
        cls = _section_class(get_type_hints(cls).get(group))
        if cls is None:
            return  # not a section: an unknown key, named with the file's keys
    tp = get_type_hints(cls).get(name)
    if tp is None or dataclasses.is_dataclass(tp) or (isinstance(value, str) and "${" in value):
        return  # a whole group, or a reference resolved later: checked with the file
    _coerce(tp, value, f"--overrides {item}", key)


def defaults_note(cfg: Config, width: int = 100) -> str | None:
    """One block naming every value a run took from the defaults (the keys neither file nor overrides set)."""
    if not cfg.defaulted:
        return None
    values = []
    for key in cfg.defaulted:
        group = key.rpartition(".")[0]
        if group and _section(cfg, group) is None:  # a section left out (model.lora): its keys do not apply
            continue
        value = _section(cfg, key)
        values.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    return textwrap.fill("defaults (not set in the config): " + ", ".join(values), width=width,
                         subsequent_indent="  ", break_on_hyphens=False)


def _section(cfg: Config, dotted: str) -> Any:
    """The value or section at a dotted key; None under a section that is None."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None) if node is not None else None
    return node


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as saved (config.yaml, checkpoints, wandb): a value that read an environment variable is
    written as the reference it was written as (`${oc.env:WANDB_KEY}`), never resolved; a secret passed
    through the environment stays out of the run's files."""
    out = dataclasses.asdict(cfg)
    for keys, text in getattr(cfg, "_written", {}).items():
        node = out
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = text
    if cfg.model.lora is None:  # a config without LoRA is saved exactly as before the section existed
        del out["model"]["lora"]
    return out


# -- limits on what a config may make us do -------------------------------------------------------

MAX_YAML_NODES = 10_000  # a config has about 60 values; aliases expanding past this are an "alias bomb"
MAX_REFERENCE_DEPTH = 16  # ${a} -> ${b} -> ... chains
MAX_VALUE_CHARS = 65_536  # one value after its references are substituted


def read_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, refusing documents whose aliases expand past MAX_YAML_NODES nodes (counted on the
    composed graph, before anything is built) and nesting too deep for the parser."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            size = _expanded_size(node, {})
            if size > MAX_YAML_NODES:
                raise ConfigError(f"{where}: the YAML expands to more than {MAX_YAML_NODES} values through its "
                                  "aliases (*name); write the values out")
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({_one_line(e)})") from e
    except RecursionError:
        raise ConfigError(f"{where}: the YAML is nested too deeply") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes of the document once every alias is expanded; each shared node is counted once per use
    but measured once. A node that contains itself (`&a [*a]`) would be infinite."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = MAX_YAML_NODES + 1  # seen again before it is measured: it contains itself
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else (
        node.value if isinstance(node, yaml.SequenceNode) else [])
    total = 1
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_YAML_NODES:
            break
    sizes[id(node)] = total
    return total


# -- validation beyond types ------------------------------------------------------------------

def validate(cfg: Config, where: str = "config") -> None:
    def bad(key: str, message: str) -> ConfigError:
        return ConfigError(f"{where}: key {key!r} {message}")

    for key in REQUIRED:
        group, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, group) if group else cfg, name)
        if value in ("", None):
            raise ConfigError(f"{where}: missing required key {key!r}")
    if Path(cfg.exp_name).is_absolute() or ".." in Path(cfg.exp_name).parts:
        raise bad("exp_name", f"{cfg.exp_name!r} must stay inside the runs directory (no absolute path, no '..')")
    positive = ["total_batch_size", "gradient_accumulation_steps", "eval_batch_size", "log_every_steps",
                "cuda_graph_buckets"]
    optional_positive = ["logprob_chunk_tokens", "max_length", "max_prompt_length", "n_epochs", "n_examples", "eval_every_steps",
                         "n_eval_examples", "save_every_steps", "tokens_per_batch", "keep_checkpoints"]
    for key in positive + optional_positive:
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise bad(key, f"must be a positive integer, got {value}")
    run_dir = Path(cfg.output_dir).resolve()
    if run_dir == Path(run_dir.anchor) or run_dir == Path.home().resolve():
        what = "the filesystem root" if run_dir == Path(run_dir.anchor) else "the home directory itself"
        raise bad("output_dir", f"is {run_dir}, {what}; a run needs a directory of its own (e.g. runs/NAME)")
    if cfg.warmup_steps < 0:
        raise bad("warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    if cfg.lr <= 0:
        raise bad("lr", f"must be > 0, got {cfg.lr}")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise bad("max_grad_norm", f"must be > 0 or null (no clipping), got {cfg.max_grad_norm}")
    if cfg.weight_decay < 0:
        raise bad("weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise bad("min_lr_ratio", f"must be in [0, 1], got {cfg.min_lr_ratio}")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise bad("eval_fraction", f"must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.n_epochs is None and cfg.n_examples is None:
        raise ConfigError(f"{where}: set n_epochs or n_examples (both are null)")
    if cfg.task == "dpo" and cfg.max_length is not None:  # SFT never reads it, nor does training from shards
        if cfg.max_prompt_length is None:
            cfg.max_prompt_length = cfg.max_length // 2  # the seed's 256 of 512; the saved config says what ran
        elif cfg.max_prompt_length >= cfg.max_length:
            raise bad("max_prompt_length", f"must be smaller than max_length ({cfg.max_length}), got {cfg.max_prompt_length}")
    if cfg.tokens_per_batch is None and cfg.total_batch_size % cfg.gradient_accumulation_steps:
        raise bad("total_batch_size", f"({cfg.total_batch_size}) must be divisible by gradient_accumulation_steps "
                                      f"({cfg.gradient_accumulation_steps})")
    if cfg.tokens_per_batch is not None and cfg.trainer == "FSDPTrainer":
        raise bad("tokens_per_batch", "is not supported with trainer: FSDPTrainer (every process must run the "
                                      "same number of micro-batches); use gradient_accumulation_steps")
    loss = cfg.loss
    if loss.beta <= 0:
        raise bad("loss.beta", f"must be > 0, got {loss.beta}")
    if not 0.0 <= loss.label_smoothing < 0.5:
        raise bad("loss.label_smoothing", f"must be in [0, 0.5), got {loss.label_smoothing}")
    if loss.label_smoothing and loss.name != "dpo":
        raise bad("loss.label_smoothing", f"applies to loss.name: dpo only (conservative DPO), not {loss.name!r}")
    for i, ds in enumerate(cfg.datasets):
        if ds.type == "custom_dataset" and not ds.path:
            raise ConfigError(f"{where}: key 'datasets[{i}].path' is required for type custom_dataset")
    if cfg.working_weights:
        why = working_weights_conflict(cfg)
        if why:
            raise bad("working_weights", f"is true, and working copies need {why}; set working_weights: null")
    if cfg.model.flash_attention == "fa4" and cfg.cuda_graphs:
        raise bad("model.flash_attention", "is fa4, and FA4's kernels have not been run in CUDA graphs of the stack "
                  "(cuda_graphs: true); set model.flash_attention: null (FA2 under graphs) or cuda_graphs: false")
    if cfg.model.lora is not None:
        _validate_lora(cfg.model.lora, bad, where)


def working_weights_conflict(cfg: Config) -> str | None:
    """What in the config rules out working copies (masters.py), or None: they take full-weight training of
    one process's unsharded model in bfloat16 with Adam or AdamW (not float16's loss scaler, not CUDA graphs)."""
    if cfg.model.policy_dtype != "bfloat16":
        return f"model.policy_dtype: bfloat16 (not {cfg.model.policy_dtype})"
    if cfg.optimizer not in ("Adam", "AdamW"):
        return f"optimizer: Adam or AdamW (not {cfg.optimizer})"
    if cfg.model.lora is not None:
        return "full-weight training (not model.lora)"
    if cfg.trainer == "FSDPTrainer":
        return "trainer: BasicTrainer (not FSDPTrainer)"
    if cfg.cuda_graphs:
        return "cuda_graphs: false"
    return None


def _validate_lora(lora: LoraConfig, bad, where: str) -> None:
    if lora.r <= 0:
        raise bad("model.lora.r", f"must be a positive integer, got {lora.r}")
    if lora.alpha <= 0:
        raise bad("model.lora.alpha", f"must be > 0, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise bad("model.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    if isinstance(lora.target_modules, list) and not (lora.target_modules and all(lora.target_modules)):
        raise bad("model.lora.target_modules", "must be 'all-linear' or a non-empty list of module names")
    require_peft(f"{where}: key 'model.lora'")


def require_peft(what: str) -> None:
    """`what` needs peft, an optional extra: say how to install it rather than fail on the import."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"{what} needs the peft package: pip install 'aligntools[lora]' (or pip install 'peft>=0.13')")


# -- the generic typed builder --------------------------------------------------------------------

def _build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: key {prefix.rstrip('.') or 'config'!r} must be a mapping, got {_show(raw)}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    _refuse_unknown(names, raw, where, prefix)
    values = {name: _coerce(hints[name], raw[name], where, prefix + name) for name in names if name in raw}
    return cls(**values)


def _refuse_unknown(names: list[str], raw: dict[str, Any], where: str, prefix: str) -> None:
    for key in raw:
        if key not in names:
            choices = [prefix + n for n in names] + [prefix + a for a in SEED_ALIASES if not prefix]
            raise ConfigError(f"{where}: unknown key {prefix + str(key)!r}{_suggest(prefix + str(key), choices)}")


def _check_keys(cls: type, raw: Any, where: str, prefix: str) -> None:
    """Unknown keys anywhere in the raw tree (nested groups, list items); values are checked later."""
    if not isinstance(raw, dict):
        return  # a reference, or a wrong type that _build names
    hints = get_type_hints(cls)
    _refuse_unknown(list(hints), raw, where, prefix)
    for name, value in raw.items():
        tp = hints[name]
        inner = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp):
            _check_keys(tp, value, where, f"{prefix}{name}.")
        elif get_origin(tp) is list and inner and isinstance(value, list):
            for i, item in enumerate(value):
                _check_keys(inner[0], item, where, f"{prefix}{name}[{i}].")


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) > 1:  # list[str] | Literal[...]: a YAML list is read as the list, anything else as the literal
            (literal,) = [a for a in options if get_origin(a) is Literal]
            if not isinstance(value, list) and value not in get_args(literal):
                raise ConfigError(f"{where}: key {key!r} must be a list or {' or '.join(map(repr, get_args(literal)))}, "
                                  f"got {_show(value)}")
            options = [a for a in options if (a is literal) != isinstance(value, list)]
        (inner,) = options
        return _coerce(inner, value, where, key)
    if value is None:
        raise ConfigError(f"{where}: key {key!r} must not be null")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key {key!r} must be a list, got {_show(value)}")
        return [_coerce(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        if value not in args:
            hint = _suggest(str(value), [str(a) for a in args], lower=True)
            raise ConfigError(f"{where}: key {key!r} must be one of {', '.join(map(str, args))}; got {value!r}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key {key!r} must be true or false, got {_show(value)}")
        return value
    if tp is int:
        number = _number(value)
        if number is None or isinstance(value, bool) or number != int(number):
            raise ConfigError(f"{where}: key {key!r} must be an integer, got {_show(value)}")
        return int(number)
    if tp is float:
        number = _number(value)
        if number is None or isinstance(value, bool):
            raise ConfigError(f"{where}: key {key!r} must be a number, got {_show(value)}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key {key!r} must be a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module, not in the config


def _number(value: Any) -> float | None:
    """YAML 1.1 reads `5e-7` as a string (the seed's configs are full of those): accept it."""
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


# -- keys, aliases, overrides, references --------------------------------------------------------

def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        group = _section_class(hints[f.name])
        if group is not None:  # a section, optional (model.lora) or not
            keys.extend(_all_keys(group, prefix + f.name + "."))
    return keys


def _section_class(tp: Any) -> type | None:
    """The dataclass of a section's type, optional (model.lora: LoraConfig | None) or not; None for values
    (a list of sections such as datasets is a value here)."""
    options = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    return next((a for a in options if dataclasses.is_dataclass(a)), None)


def _unset_keys(raw: dict[str, Any]) -> tuple[str, ...]:
    """The config's keys (groups left out) that `raw` does not mention; `key: null` counts as set."""
    keys = _all_keys(Config)
    unset = []
    for key in keys:
        if any(k.startswith(key + ".") for k in keys):
            continue
        node: Any = raw
        for part in key.split("."):
            node = node.get(part, _UNSET) if isinstance(node, dict) else _UNSET
        if node is _UNSET:
            unset.append(key)
    return tuple(unset)


_UNSET = object()


def _canonical_key(key: str) -> str:
    head, dot, rest = key.partition(".")
    return SEED_ALIASES.get(head, head) + dot + rest


def _apply_aliases(raw: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(raw)
    for seed_key, ours in SEED_ALIASES.items():
        if seed_key in out:
            if ours in out:
                raise ConfigError(f"{where}: keys {seed_key!r} and {ours!r} mean the same thing; keep one")
            out[ours] = out.pop(seed_key)
    return out


def _get_dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


_REF = re.compile(r"\$\{([^}]*)\}")


def _resolve_references(raw: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[tuple, str]]:
    """Replace `${key}` and `${oc.env:NAME,default}` as OmegaConf does (the seed's configs use
    `output_dirs: ./outputs/${exp_name}`). Returns the resolved tree and, for each value that read the
    environment, its key path and the text it was written as (what `to_dict` saves).

    Each key is resolved once (chains that double at every step stay linear); chains deeper than
    MAX_REFERENCE_DEPTH and values longer than MAX_VALUE_CHARS are refused."""
    resolved: dict[str, tuple[Any, bool, int]] = {}  # dotted key -> (value, read the environment, chain depth)
    written: dict[tuple, str] = {}

    def lookup(dotted: str, seen: tuple[str, ...]) -> tuple[Any, bool, int]:
        if dotted.startswith("oc.env:"):
            name, _, default = dotted[len("oc.env:"):].partition(",")
            value = os.environ.get(name.strip()) or default.strip() or None
            if value is None:
                raise ConfigError(f"{where}: ${{{dotted}}}: environment variable {name.strip()} is not set")
            return value, True, 1
        if dotted in seen:
            raise ConfigError(f"{where}: ${{{dotted}}} refers to itself")
        if dotted not in resolved:
            node: Any = raw
            for part in dotted.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"{where}: ${{{dotted}}} refers to a key that is not set")
                node = node[part]
            value, env, depth = resolve(node, seen + (dotted,))
            if depth >= MAX_REFERENCE_DEPTH:
                raise ConfigError(f"{where}: ${{{dotted}}}: references nested more than {MAX_REFERENCE_DEPTH} deep")
            resolved[dotted] = value, env, depth + 1
        return resolved[dotted]

    def resolve(node: Any, seen: tuple[str, ...], path: tuple | None = None) -> tuple[Any, bool, int]:
        """`path`: where `node` sits in the file, for the values written as they were; None inside a lookup."""
        if isinstance(node, (dict, list)):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            done = {k: resolve(v, seen, None if path is None else path + (k,)) for k, v in items}
            values = {k: v for k, (v, _, _) in done.items()}
            return ((values if isinstance(node, dict) else list(values.values())),
                    any(env for _, env, _ in done.values()), max((d for _, _, d in done.values()), default=0))
        if not isinstance(node, str) or "${" not in node:
            return node, False, 0
        whole = _REF.fullmatch(node)
        if whole:
            value, env, depth = lookup(whole.group(1), seen)
        else:
            value, env, depth = _substitute(node, lambda ref: lookup(ref, seen), where)
        if env and path is not None:
            written[path] = node
        return value, env, depth

    if "output_dir" not in raw and "exp_name" in raw:
        raw = {**raw, "output_dir": Config.output_dir}
    return resolve(raw, (), ())[0], written


def _substitute(text: str, lookup, where: str) -> tuple[str, bool, int]:
    """Each `${ref}` in `text` by str(its value), stopping as soon as the result passes MAX_VALUE_CHARS."""
    parts, size, env, depth, last = [], 0, False, 0, 0
    for m in _REF.finditer(text):
        value, from_env, ref_depth = lookup(m.group(1))
        parts += [text[last:m.start()], str(value)]
        size += m.start() - last + len(parts[-1])
        env, depth, last = env or from_env, max(depth, ref_depth), m.end()
        if size > MAX_VALUE_CHARS:
            raise ConfigError(f"{where}: {text[:40]!r}...: its references expand past {MAX_VALUE_CHARS} characters")
    parts.append(text[last:])
    return "".join(parts), env, depth


# Other trainers' names for our keys (transformers, TRL, torchtune): suggested by meaning, not by spelling,
# where difflib would offer the closest string (learning_rate -> print_log_step).
MEANT = {"learning_rate": "lr", "epochs": "n_epochs", "num_epochs": "n_epochs", "num_train_epochs": "n_epochs",
         "warmup": "warmup_steps", "num_warmup_steps": "warmup_steps", "train_batch_size": "total_batch_size",
         "global_batch_size": "total_batch_size", "max_seq_length": "max_length", "max_seq_len": "max_length",
         "seq_len": "max_length", "gradient_accumulation": "gradient_accumulation_steps",
         "gradient_checkpointing": "activation_checkpointing", "lr_scheduler_type": "scheduler",
         "lr_scheduler": "scheduler", "logging_steps": "log_every_steps", "save_steps": "save_every_steps",
         "eval_steps": "eval_every_steps", "model_name_or_path": "model.name_or_path", "model_name": "model.name_or_path",
         "beta": "loss.beta", "loss_type": "loss.name", "output_path": "output_dir"}


def _suggest(key: str, choices: list[str], lower: bool = False) -> str:
    if key.rpartition(".")[2] in MEANT and not lower:
        return f" (did you mean {MEANT[key.rpartition('.')[2]]!r}?)"
    if lower:
        by_lower = {c.lower(): c for c in choices}
        match = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.5)
        return f" (did you mean {by_lower[match[0]]!r}?)" if match else ""
    match = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def cache_dir() -> Path:
    """`${XDG_CACHE_HOME:-~/.cache}/aligntools`: converted shards of `aligntrain train`, wandb's cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aligntools"
