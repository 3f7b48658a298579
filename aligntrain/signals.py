"""Stopping a run on a scheduler's signal without losing it, and saying how to go on.

SIGTERM (what Slurm, Kubernetes and batch schedulers send before they kill or preempt a job) and SIGUSR1
(Slurm's `--signal=USR1@SECONDS`) only raise a flag. The loop finishes the optimizer step in hand,
saves a checkpoint and raises `Terminated` (exit 143), whose message names the checkpoint and the
command that resumes it. Ctrl-C (SIGINT) stays immediate: `Interrupted` (exit 130) names the last
complete checkpoint instead.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path

import torch

from aligndata.errors import Terminated

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """`with StopRequest() as stop:` ... `if stop.requested(accelerator):` save and stop.

    Handlers are installed for the block only (and only in the main thread, where Python allows them);
    the ones before are put back after it."""

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.signal = self.signal or signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """True when any process got a stop signal: every process must stop after the same step, or
        the next collective would wait forever."""
        flag = float(self.signal is not None)
        if accelerator.num_processes > 1:
            flag = float(accelerator.reduce(torch.tensor(flag, device=accelerator.device), "max"))
        if flag and self.signal is None:
            self.signal = "a signal to another process"
        return bool(flag)


def terminated(signal_name: str, step: int, checkpoint: Path | None) -> Terminated:
    if checkpoint is None:  # debug: true writes no checkpoints
        return Terminated(f"stopped by {signal_name} after step {step}; debug: true saves no checkpoint, "
                          "so there is nothing to resume")
    return Terminated(f"stopped by {signal_name} after step {step}; checkpoint saved: {checkpoint}; "
                      f"resume with: {resume_command()}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, with what survives it (exit 130)."""

    def __init__(self, checkpoint: Path | None):
        if checkpoint is None:
            message = "interrupted before the first checkpoint was saved; nothing to resume"
        else:
            message = f"interrupted; the last complete checkpoint is {checkpoint}; resume with: {resume_command()}"
        super().__init__(message)


def resume_command() -> str:
    """This process's command line with --resume: what continues the run."""
    args = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
    return launch_command(int(os.environ.get("WORLD_SIZE", "1")), args)


def launch_command(processes: int, args: list[str]) -> str:
    """The shell line that runs `aligntrain ARGS` in `processes` processes (accelerate launch for several)."""
    launcher = ["aligntrain"]
    if processes > 1:
        launcher = ["accelerate", "launch", "--num_processes", str(processes), "-m", "aligntrain"]
    return shlex.join([*launcher, *args])
