"""Where metrics go: a live display, RUN/metrics.jsonl, TensorBoard, wandb. Main process only.

Every record is `{"step": s, "split": "train" | "eval", "time": unix, <metric>: value, ...}`; the same
names go to TensorBoard and wandb as `<split>/<metric>` (e.g. `eval/rewards/accuracies`).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from rich.console import Console
from rich.table import Column
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .config import Config, cache_dir, to_dict

# shown in the one-line summary, in this order, when present
HEADLINE = ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "lr", "examples_per_s", "tokens_per_s", "mfu")


class MetricsLogger:
    def __init__(self, cfg: Config, run_dir: Path, total_steps: int, start_step: int, enabled: bool,
                 console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True, soft_wrap=True, highlight=False)
        self.total_steps = total_steps
        self._jsonl = self._tensorboard = self._wandb = self._progress = None
        if not enabled:
            return
        self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.report_to_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        if cfg.wandb.enabled and not cfg.debug:
            self._wandb = _start_wandb(cfg, Path(run_dir))
        if self.console.is_terminal:
            # Where the line is narrow, what a user watches comes first and the metrics are cut at the right:
            # step/total, elapsed and ETA keep their width, the bar is short, the metrics take what is left.
            self._progress = Progress(TextColumn("step"), MofNCompleteColumn(), TimeElapsedColumn(),
                                      TextColumn("ETA"), TimeRemainingColumn(), BarColumn(bar_width=12),
                                      TextColumn("{task.fields[status]}",
                                                 table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                                      console=self.console, expand=True)
            self._task = self._progress.add_task(cfg.exp_name, total=total_steps, completed=start_step, status="")
            self._progress.start()

    def log(self, step: int, split: str, metrics: dict[str, float], show: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for name, value in metrics.items():
                self._tensorboard.add_scalar(f"{split}/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{name}": value for name, value in metrics.items()}, step=step)
        line = summary_line(step, self.total_steps, split, metrics)
        if self._progress is not None:
            if split == "train":
                self._progress.update(self._task, completed=step, status=line.split("  ", 1)[1])
            if split == "eval" or show:
                self._progress.console.print(line)
        elif show or split == "eval":
            self.console.print(line, highlight=False)

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl = self._tensorboard = self._wandb = self._progress = None


def summary_line(step: int, total: int, split: str, metrics: dict[str, float]) -> str:
    parts = [f"{split} {step}/{total}"]
    for name in HEADLINE:
        if name in metrics:
            value = metrics[name]
            parts.append(f"{name} {value:.2e}" if name == "lr" else f"{name} {value:.4g}")
    return "  ".join(parts)


def _start_wandb(cfg: Config, run_dir: Path):
    """wandb in the run dir; WANDB_MODE=offline works as wandb defines it. The run id is kept in the
    run dir so that `--resume` continues the same wandb run."""
    os.environ.setdefault("WANDB_CACHE_DIR", str(cache_dir() / "wandb"))
    import wandb

    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    return wandb.init(entity=cfg.wandb.entity, project=cfg.wandb.project, name=cfg.exp_name, dir=str(run_dir),
                      config=to_dict(cfg), id=run_id, resume="allow")

