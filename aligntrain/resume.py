"""What --resume may change, and what it keeps.

A resumed run continues the steps of the checkpoint's run, so keys that decide which rows a step
reads or what the restored optimizer state means must not change: the seed and total_batch_size
(the data order is a pure function of them and the step), the shards' content, the model, the
loss, the optimizer and the trainer. Such a change is refused with the differences listed.

Every other key may change at the resume step (lr, the schedule, weight decay, eval/save/log
cadence, n_epochs, the micro-batch split, which does not change a step's loss): the change takes
effect, is printed, recorded in metrics.jsonl (`"split": "resume"`) and appended to config.yaml as
a comment, so that the run's config says what ran before and after.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from .config import Config, ConfigError, to_yaml

FIXED_ON_RESUME = ("seed", "total_batch_size", "optimizer", "trainer", "max_length", "model.name_or_path",
                   "model.tokenizer_name_or_path", "model.archive", "model.lora", "loss.name", "loss.reference_free")
RESUMED = "resumed at step "  # starts record_changes' line, which config.yaml keeps as a "# " comment


def shards_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What identifies the rows of a run: the conversion's settings hash (tokenizer, template, settings,
    every source's hash) and the row count per split. Reference columns added later do not count."""
    return {"task": manifest["task"], "settings_sha256": manifest.get("settings_sha256"),
            "rows": {split: info["rows"] for split, info in manifest["splits"].items()}}


def resume_changes(checkpoint: Path, cfg: Config, manifest: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (before, now)} of the keys that changed since the checkpoint's run; ConfigError (exit 1)
    listing every difference when one of them may not change on resume."""
    before = _flat(yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8")) or {})
    now = _flat(yaml.safe_load(to_yaml(cfg)))  # as saved: references to the environment compare as written
    keys = sorted((set(before) | set(now)) - {"output_dir"})  # a run directory may be moved and resumed
    changed = {k: (before.get(k), now.get(k)) for k in keys if before.get(k) != now.get(k)}
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    if "shards" in state and state["shards"] != shards_identity(manifest):
        changed["shards"] = (_show_shards(state["shards"]), _show_shards(shards_identity(manifest)))
    refused = {k: v for k, v in changed.items() if k == "shards" or k in FIXED_ON_RESUME
               or k.startswith("model.lora.")}  # the adapters' shape and placement are the optimizer state's
    if refused:
        raise ConfigError(f"--resume: {checkpoint} was trained with other settings that a resumed run cannot change "
                          f"({_describe(refused)}); restore them, or start a new run in another output_dir")
    return changed


def record_changes(run_dir: Path, step: int, changed: dict[str, tuple[Any, Any]]) -> str:
    """Append the change to metrics.jsonl; return the line the console shows (and config.yaml, as a comment)."""
    record = {"step": step, "split": "resume", "time": round(time.time(), 3),
              "changed": {k: {"before": a, "now": b} for k, (a, b) in changed.items()}}
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return f"{RESUMED}{step} with changed settings: {_describe(changed)}"


def config_text(cfg: Config, run_dir: Path, start: int) -> str:
    """config.yaml: the config that runs from now on, after the history of changes of earlier resumes
    up to `start` (those of steps a crash threw away are dropped, as their metrics are)."""
    old = run_dir / "config.yaml"
    history = []
    if start and old.exists():
        history = [line for line in old.read_text(encoding="utf-8").splitlines()
                   if line.startswith("# " + RESUMED) and _history_step(line) <= start]
    return to_yaml(cfg) + "".join(line + "\n" for line in history)


def trim_metrics(run_dir: Path, start: int) -> str | None:
    """Keep metrics.jsonl records of steps <= start (those after it are redone). A torn line (the
    process was killed while writing it) is dropped; the returned note says so."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if start else []
    kept, torn = [], []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            torn.append(number)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= start:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    if torn:
        return f"{path}: dropped line {', '.join(map(str, torn))}, not complete JSON (written when the run was killed?)"
    return None


def take_current_hyperparameters(cfg: Config, optimizer, scheduler, weight_decays: list[float]) -> None:
    """After restoring optimizer and scheduler: their states carry the old run's lr and weight decay;
    the current config's values win (the schedule's shape already comes from the config)."""
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    lrs = [cfg.lr * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
    for group, lr, decay in zip(optimizer.param_groups, lrs, weight_decays):
        group.update(lr=lr, initial_lr=cfg.lr, weight_decay=decay)
    scheduler._last_lr = lrs  # what get_last_lr() reports; a key of the scheduler's own state_dict


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" if k != "shards" else f"shards: {a} -> {b}" for k, (a, b) in changes.items())


def _show_shards(identity: dict[str, Any]) -> str:
    rows = ", ".join(f"{split} {n} rows" for split, n in sorted(identity["rows"].items()))
    return f"{identity['task']} shards ({rows}; settings {str(identity['settings_sha256'])[:12]})"


def _history_step(line: str) -> int:
    digits = line[len("# " + RESUMED):].split(" ", 1)[0]
    return int(digits) if digits.isdigit() else 0
