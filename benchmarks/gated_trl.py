"""Run a TRL benchmark script unchanged (trl_anchor.py, trl_lora.py) under pipeline.py's gate.

  python benchmarks/gated_trl.py SCRIPT [its arguments]

transformers' Trainer.train first waits for the job's turn on the GPU (gate.ready); its timed part is
from the end of step --warm (the anchor's Timer starts its clock there) to the end of training. Everything
else is the script's own: its data, model, timer and RESULT line. Without pipeline.py it runs as the
script alone would.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gate  # noqa: E402


def warm_steps(argv: list[str], default: int = 5) -> int:
    """The script's --warm (both scripts' default: 5)."""
    for i, arg in enumerate(argv):
        if arg == "--warm" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--warm="):
            return int(arg.split("=", 1)[1])
    return default


def install(warm: int) -> None:
    """Gate transformers' Trainer.train: wait for the turn, then mark the timed steps."""
    from transformers import Trainer, TrainerCallback

    class Begin(TrainerCallback):  # first in the list: before the script's timer reads the clock
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warm:
                gate.timed()

    class End(TrainerCallback):  # last: after the script's timer has read it
        def on_train_end(self, args, state, control, **kwargs):
            gate.untimed()

    train = Trainer.train

    def gated_train(self, *args, **kwargs):
        gate.ready()
        self.callback_handler.callbacks.insert(0, Begin())
        self.callback_handler.callbacks.append(End())
        return train(self, *args, **kwargs)

    Trainer.train = gated_train


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: gated_trl.py SCRIPT [ARGS...]")
    script, sys.argv = sys.argv[1], sys.argv[1:]
    install(warm_steps(sys.argv[1:]))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
