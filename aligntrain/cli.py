"""The `aligntrain` command line: a thin layer over aligntrain's library functions.

Exit codes (aligndata/errors.py, the same table as aligndata's): 0 done; 1 bad config or data (an
unknown/missing/mistyped key, a model or tokenizer path in it that cannot be loaded, shards that do not
match the config or tokenizer, invalid raw records); 2 usage or I/O (unknown option, missing file or
directory argument, shards missing or damaged, a full disk while writing a checkpoint, FSDPTrainer on several
GPUs without a launcher); 3 training stopped on a NaN/Inf loss (the last good checkpoint is kept); 130
interrupted; 143 stopped on SIGTERM or SIGUSR1 after saving a checkpoint.

Overrides follow the seed project: `--overrides lr=2e-5 loss.beta=0.1 model.policy_dtype=bfloat16`.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from aligndata.errors import EXIT_INPUT, EXIT_OK, InputError
from aligndata.usage import Command, add_version_option, command_class

from . import __version__
from .config import TASK_OF_LOSS, TRAIN_MAX_LENGTH, ConfigError, load_config


app = typer.Typer(name="aligntrain", help="Train SFT / DPO on aligndata shards (seed-project configs work unchanged).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
add_version_option(app, "aligntrain", __version__, out)

# `--overrides k=v k=v` is the seed's variadic flag; click has no such option type, so the command
# accepts extra arguments and `_overrides` reads them.
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
WithOverrides = command_class(("--overrides KEY=VALUE ...", "Change config keys (dotted for nested ones), e.g. "
                               "--overrides lr=2e-5 model.policy_dtype=bfloat16; values are read as YAML."))
ShardsArg = typer.Argument(..., exists=True, file_okay=False, metavar="SHARDS", help="A shard directory written by `aligndata convert`.")
ConfigArg = typer.Argument(..., exists=True, dir_okay=False, metavar="CONFIG", help="YAML config (the seed project's keys).")
ResumeOpt = typer.Option(False, "--resume", help="Continue from the run's latest checkpoint (exactly).")
JsonOpt = typer.Option(False, "--json", help="Print the summary as JSON on stdout.")


def _overrides(ctx: typer.Context) -> list[str]:
    items, flag_seen = [], False
    for arg in ctx.args:
        if arg == "--overrides":
            flag_seen = True
        elif arg.startswith("--overrides="):
            flag_seen = True
            items.append(arg.split("=", 1)[1])
        elif flag_seen and not arg.startswith("-"):
            items.append(arg)
        else:
            raise typer.BadParameter(f"unexpected argument {arg!r} (overrides go after --overrides: --overrides lr=2e-5)")
    return items


def _message(e: BaseException) -> str:
    """The one line printed for an expected error."""
    from aligndata.errors import InvalidRecordError, RunStopped, os_error_message

    if isinstance(e, KeyboardInterrupt):
        return str(e) or "interrupted"  # training's Interrupted names the last checkpoint
    if isinstance(e, InvalidRecordError):
        return (str(e).splitlines()[0] + " (first invalid record of the raw data; with on_error: skip such records "
                "go to a rejects file and training goes on)")
    if isinstance(e, RunStopped):
        return f"{e}; the last good checkpoint is kept"
    if isinstance(e, OSError):  # a full disk while saving: complete checkpoints stay intact
        return os_error_message(e)
    return str(e)


def reported(command: Callable) -> Callable:
    """Expected errors become `error: <one line>` and their exit code (aligndata.errors.exit_code, the table
    both command lines share); anything else is a bug and raises."""
    from aligndata.errors import exit_code

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BaseException as e:
            code = exit_code(e)
            if code is None:
                raise
            err.print(f"error: {_message(e)}", markup=False)
            raise typer.Exit(code)

    return run


@app.command(cls=WithOverrides, context_settings=EXTRA)
@reported
def sft(ctx: typer.Context, shards: Path = ShardsArg, config: Path = ConfigArg, resume: bool = ResumeOpt,
        as_json: bool = JsonOpt) -> None:
    """Supervised fine-tuning on SFT shards.

    \b
    aligntrain sft shards/ cfg.yml
    aligntrain sft shards/ cfg.yml --overrides lr=2e-5 n_epochs=2 --resume
    """
    _train(_task_config(ctx, config, "sft"), shards, resume, as_json)


@app.command(cls=WithOverrides, context_settings=EXTRA)
@reported
def dpo(ctx: typer.Context, shards: Path = ShardsArg, config: Path = ConfigArg, resume: bool = ResumeOpt,
        as_json: bool = JsonOpt) -> None:
    """Preference training (loss.name: dpo | ipo | hinge) on DPO shards.

    \b
    aligntrain dpo shards/ cfg.yml --overrides loss.beta=0.1
    accelerate launch --num_processes 4 -m aligntrain dpo shards/ cfg.yml
    """
    _train(_task_config(ctx, config, "dpo"), shards, resume, as_json)


@app.command(cls=WithOverrides, context_settings=EXTRA)
@reported
def train(ctx: typer.Context, config: Path = ConfigArg, resume: bool = ResumeOpt, as_json: bool = JsonOpt) -> None:
    """The seed project's way: `loss.name` picks the task, `datasets` lists raw files.

    The raw files are converted with aligndata into a cache keyed by their contents and the
    conversion settings (reused when unchanged), then trained on.

    \b
    aligntrain train config.yml --overrides lr=2e-5      (was: python train.py config.yml --overrides lr=2e-5)
    """
    from .sources import prepare_shards

    cfg = load_config(config, _overrides(ctx), defaults={"max_length": TRAIN_MAX_LENGTH})
    if "loss.name" in cfg.defaulted:  # SFT by default would train a DPO config's data the wrong way without a word
        raise ConfigError(f"{config.name}: missing required key 'loss.name' (`aligntrain train` trains what it names: "
                          f"{', '.join(TASK_OF_LOSS)})")
    _check_launcher(ctx, cfg)
    shards, reused, left_out = prepare_shards(cfg, progress=err.is_terminal)
    err.print(f"{'reusing' if reused else 'converted'} shards: {shards}")
    if left_out:
        err.print(left_out, markup=False)
    _train(cfg, shards, resume, as_json)


@app.command("precompute-ref", cls=WithOverrides, context_settings=EXTRA)
@reported
def precompute_ref(ctx: typer.Context, shards: Path = ShardsArg, config: Path = ConfigArg,
                   batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                                            help="Pairs per forward (default: eval_batch_size)."),
                   as_json: bool = JsonOpt) -> None:
    """Store the reference model's log-probs in DPO shards, so DPO needs no reference model.

    The reference is model.name_or_path (+ model.archive) in model.reference_dtype.

    \b
    aligntrain precompute-ref shards/ cfg.yml && aligntrain dpo shards/ cfg.yml
    """
    from .precompute import precompute_reference

    cfg = load_config(config, _overrides(ctx), defaults={"loss.name": "dpo"})
    show = (lambda split, done, total: err.print(f"{split}: {done}/{total} pairs", end="\r")) if err.is_terminal else None
    manifest = precompute_reference(shards, cfg, batch_size, progress=show)
    summary = {"shards": str(shards), "reference": manifest["reference"],
               "rows": {split: info["rows"] for split, info in manifest["splits"].items()}}
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        out.print(f"reference log-probs of {manifest['reference']['model']} ({manifest['reference']['dtype']}) "
                  f"stored in {shards} ({', '.join(f'{k}: {v} rows' for k, v in summary['rows'].items())})")


@app.command(cls=Command)
@reported
def generate(model_dirs: List[Path] = typer.Argument(..., exists=True, metavar="MODEL_DIR", help="Model dirs, checkpoints (LoRA ones too) or run dirs."),
             prompt: List[str] = typer.Option(..., "--prompt", "-p", metavar="TEXT", help="A user message (repeatable)."),
             system: Optional[str] = typer.Option(None, "--system", help="A system message before each prompt."),
             max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
             temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
             as_json: bool = JsonOpt) -> None:
    """Reply to prompts with one or more models (e.g. before and after training).

    \b
    aligntrain generate ~/.cache/aligntools/smollm2-135m-instruct runs/dpo-demo -p "What is the capital of France?"
    """
    from .generate import generate_replies

    if not err.is_terminal:  # a log file or a pipe gets no "Loading weights" bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    replies = {str(d): generate_replies(d, prompt, system=system, max_new_tokens=max_new_tokens,
                                        temperature=temperature) for d in model_dirs}
    if as_json:
        out.print_json(json.dumps([{"prompt": p, "replies": {d: r[i] for d, r in replies.items()}}
                                   for i, p in enumerate(prompt)]))
        return
    for i, p in enumerate(prompt):
        out.print(f"\n>>> {p}")
        for d, r in replies.items():
            out.print(f"[{d}]\n{r[i]}", markup=False)


@app.command(cls=Command)
@reported
def export(source: Path = typer.Argument(..., exists=True, file_okay=False, metavar="RUN_OR_CHECKPOINT",
                                          help="A run dir (its latest checkpoint), a checkpoint or a model dir."),
           target: Path = typer.Argument(..., metavar="OUT", help="The directory to write (must not exist, or be empty)."),
           merge: bool = typer.Option(False, "--merge", help="LoRA: merge the adapter into its base model (no peft needed to load)."),
           as_json: bool = JsonOpt) -> None:
    """Write a checkpoint as a model directory: the model, the LoRA adapter, or (--merge) the merged model.

    \b
    aligntrain export runs/dpo-lora merged/ --merge
    """
    from .export import export_model

    summary = export_model(source, target, merge=merge)
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        out.print(f"{summary['kind']} of {summary['source']} written to {summary['out']}", markup=False)


@app.command("config", cls=WithOverrides, context_settings=EXTRA)
@reported
def show_config(ctx: typer.Context, config: Path = ConfigArg) -> None:
    """Validate a config (with overrides) and print it resolved; loads nothing else.

    \b
    aligntrain config cfg.yml --overrides model.policy_dtype=bfloat16
    """
    from .config import to_yaml

    out.print(to_yaml(load_config(config, _overrides(ctx))), markup=False, end="")


def _task_config(ctx: typer.Context, config: Path, command: str):
    """The config of `aligntrain sft|dpo`: loss.name defaults to the command and must belong to its task."""
    cfg = load_config(config, _overrides(ctx), defaults={"loss.name": command})
    if cfg.task != command:
        needs = "loss.name: sft" if command == "sft" else "dpo, ipo or hinge"
        raise ConfigError(f"{config.name}: loss.name is {cfg.loss.name!r}; `aligntrain {command}` needs {needs}")
    _check_launcher(ctx, cfg)
    return cfg


def _check_launcher(ctx: typer.Context, cfg) -> None:
    """FSDPTrainer on several GPUs needs one process per GPU, which `accelerate launch` starts; run without
    it, training would use one GPU, so the command stops before loading anything and names the launch."""
    from .signals import launch_command
    from .trainer import gpus_left_idle

    gpus = gpus_left_idle(cfg)
    if gpus:
        launch = launch_command(gpus, ctx.obj)
        raise InputError(f"trainer: FSDPTrainer with {gpus} visible GPUs needs one process per GPU (started like this "
                         f"it would train on one); run: {launch}   (aligntrain then sets up FSDP itself, no accelerate "
                         "config needed; CUDA_VISIBLE_DEVICES=0 trains on one GPU)")


def _train(cfg, shards: Path, resume: bool, as_json: bool) -> None:
    from .trainer import train as run

    result = run(cfg, shards, resume=resume, console=err)
    if not result.is_main:
        return
    summary = {"run_dir": str(result.run_dir), "steps": result.steps,
               "checkpoint": str(result.checkpoint) if result.checkpoint else None,
               "train": result.train_metrics, "eval": result.eval_metrics}
    if result.first_eval_metrics:
        summary["eval_before_training"] = result.first_eval_metrics
    if as_json:
        out.print_json(json.dumps(summary))
        return
    columns = {"train (last step)": result.train_metrics, "eval (last)": result.eval_metrics}
    if result.first_eval_metrics:  # before and after, side by side
        columns = {"train (last step)": result.train_metrics, "eval (step 0)": result.first_eval_metrics,
                   f"eval (step {result.steps})": result.eval_metrics}
    table = Table(title=f"{cfg.exp_name}: {result.steps} steps", show_header=True)
    table.add_column("metric")
    for title in columns:
        table.add_column(title, justify="right")
    for name in dict.fromkeys(name for metrics in columns.values() for name in metrics):
        table.add_row(name, *(f"{d[name]:.4g}" if name in d else "" for d in columns.values()))
    out.print(table)
    out.print(f"run dir: {result.run_dir}\ncheckpoint: {summary['checkpoint']}")




def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and `python -m aligntrain`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        app(args=argv, prog_name="aligntrain", obj=argv)  # ctx.obj: the arguments, for the launch line
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_INPUT)
    return EXIT_OK
