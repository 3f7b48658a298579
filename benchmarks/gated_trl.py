"""Run a TRL benchmark script unchanged (trl_anchor.py, trl_lora.py) under pipeline.py's gate.

  python benchmarks/gated_trl.py SCRIPT [its arguments]

transformers' Trainer.train first waits for the job's turn on the GPU (gate.ready); its timed part is
from the end of step --warm (the anchor's Timer starts its clock there) to the end of training. Everything
else is the script's own: its data, model, timer and RESULT line. Without pipeline.py it runs as the
script alone would.

With `precompute_ref_log_probs=True`, TRL's DPOTrainer computes the reference log-probs in its __init__
(`_precompute_ref_logps`), before Trainer.train, and the anchor does not time it. That pass over the train
dataset waits for the turn (later ready() calls return at once), is a timed part of its own, and prints
`PRECOMPUTE {json}` on stdout: pairs, secs, items_per_s, tokens_per_s and mean_tokens_per_item (tokens
counted as the anchor counts a pair's) and peak_gib over the pass. Passes over other datasets (eval, which
TRL may also run from inside train's timed steps) are left as they are.
"""

from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gate  # noqa: E402

PASS_LINE = "PRECOMPUTE"  # the line the timed precompute pass prints (bench_train.py reads it)


def warm_steps(argv: list[str], default: int = 5) -> int:
    """The script's --warm (both scripts' default: 5)."""
    for i, arg in enumerate(argv):
        if arg == "--warm" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--warm="):
            return int(arg.split("=", 1)[1])
    return default


def install(warm: int) -> None:
    """Gate transformers' Trainer.train: wait for the turn, then mark the timed steps; and time DPOTrainer's
    precompute pass (install_precompute)."""
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
    install_precompute()


def install_precompute() -> None:
    """Time TRL DPOTrainer's precompute pass over the train dataset (module docstring); nothing where trl or
    the method is not there (SFT-only environments, another TRL)."""
    try:
        from trl.trainer.dpo_trainer import DPOTrainer
    except ImportError:
        return
    precompute = getattr(DPOTrainer, "_precompute_ref_logps", None)
    if precompute is None:
        return

    def timed_precompute(self, dataset, name, batch_size):
        if name != "train":
            return precompute(self, dataset, name, batch_size)
        out, result = timed_pass(lambda: precompute(self, dataset, name, batch_size), dataset, self.args.max_length)
        print(f"{PASS_LINE} " + json.dumps(result), flush=True)
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute


def pass_counts(dataset, max_length: int | None) -> tuple[int, int]:
    """(pairs, tokens) of `dataset` (columns prompt_ids, chosen_ids, rejected_ids), its tokens as the anchor
    counts a pair's: prompt+chosen and prompt+rejected, each at most max_length (None: no limit)."""
    def cut(n: int) -> int:
        return n if max_length is None else min(max_length, n)

    pairs = tokens = 0
    for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]):
        pairs, tokens = pairs + 1, tokens + cut(len(p) + len(c)) + cut(len(p) + len(r))
    return pairs, tokens


def timed_pass(run, dataset, max_length: int | None):
    """(run()'s value, its measurement): `run`, a pass over the pairs of `dataset`, once this process has
    its turn on the GPU, as a timed part; the clock and the peak memory from its start to its end on the
    device; its pairs and tokens by pass_counts."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    with gate.timed_turn():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        out = run()
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - started
        peak = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None
    pairs, tokens = pass_counts(dataset, max_length)
    return out, {"pairs": pairs, "secs": round(secs, 3), "items_per_s": round(pairs / secs, 2),
                 "tokens_per_s": round(tokens / secs, 1), "mean_tokens_per_item": round(tokens / pairs, 1),
                 "peak_gib": peak}


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: gated_trl.py SCRIPT [ARGS...]")
    script, sys.argv = sys.argv[1], sys.argv[1:]
    install(warm_steps(sys.argv[1:]))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
