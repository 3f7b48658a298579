"""How `trainer: FSDPTrainer` scales: the same per-GPU work on 1, 2, 4... GPUs, one table (issue 13).

    python benchmarks/bench_fsdp.py --shape llama1b --mode sft --per-gpu 36 --gpus 1,2,4
    python benchmarks/bench_fsdp.py --shape llama8b --mode sft --per-gpu 8 --gpus 4 --gc 1   # the 8B model on 4
    python benchmarks/bench_fsdp.py --shape tiny --mode sft --per-gpu 4 --gpus 1,2 --steps 4 --warm 1   # on CPU (gloo)

Each row is `aligntrain` in N processes started by torchrun (one per GPU; on a machine without GPUs, N CPU
processes over gloo), on bench_train.py's model shapes and data, `total_batch_size` = N x --per-gpu (weak
scaling: each GPU does the same work in every row). One process is the anchor: FSDPTrainer on one device
trains unsharded, on the one-GPU fast path. The table: tokens/s over all GPUs, per GPU, the scaling
efficiency (per-GPU tokens/s against the one-process row of the same call, when it ran), MFU (flops.py's
useful FLOPs over N cards' peak) and each GPU's peak memory (the largest over the processes).

The clock: every process waits for its GPU after the last warm step and after the last step (a barrier
between the processes at both ends); the timed span is between. The model and shards are built once, before
any row, in --cache (bench_train.build_inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import SHAPES, bench_config, build_inputs, data_counts, item_lengths, model_config  # noqa: E402
from childrun import result_line  # noqa: E402


def child(args: argparse.Namespace) -> None:
    """One process of a row (torchrun sets RANK / WORLD_SIZE): train, time, print RESULT on rank 0."""
    import torch
    import torch.distributed as dist

    import aligntrain.trainer as T
    from aligndata.write.shards import open_split
    from aligntrain.config import load_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    work = Path(tempfile.mkdtemp(prefix=f"bench-fsdp-{rank}-"))
    cfg_path = work / "config.yml"
    cfg_path.write_text(json.dumps(bench_config(args.mode, args.per_gpu * world, args.steps, args.max_length, args.gc,
                                                args.model, args.tokenizer, dtype, work / "run", trainer="FSDPTrainer")))
    cfg = load_config(cfg_path, overrides=args.overrides or None)
    marks: list[float] = []
    step_fn = T.train_step

    def timed_step(step, *a, **k):
        out = step_fn(step, *a, **k)
        if step in (args.warm, args.steps):
            if cuda:
                torch.cuda.synchronize()
            if dist.is_initialized():
                dist.barrier()
            if step == args.warm and cuda:
                torch.cuda.reset_peak_memory_stats()
            marks.append(time.perf_counter())
        return out

    T.train_step = timed_step
    started = time.perf_counter()
    T.train(cfg, args.shards)
    secs = marks[-1] - marks[0]
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0
    if dist.is_available() and dist.is_initialized():  # the largest peak over the processes
        value = torch.tensor([peak], device="cuda" if cuda else "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        peak = float(value.item())
    if rank == 0:
        config = model_config(args.shape)
        lengths = item_lengths(open_split(Path(args.shards), "train"), args.mode)
        counted, flops = data_counts(config, args.mode, lengths, policy=True, reference=args.mode == "dpo")
        items = args.per_gpu * world * (args.steps - args.warm)
        per_item = counted / len(lengths)
        print("RESULT " + json.dumps({
            "processes": world, "secs": round(secs, 3), "items_per_s": round(items / secs, 2),
            "tokens_per_s": round(items * per_item / secs, 1), "flops_per_token": flops / counted,
            "peak_gib": round(peak, 2) if cuda else None, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "first_steps_s": round(marks[0] - started, 1)}), flush=True)


def run_row(args: argparse.Namespace, processes: int, model: Path, tokenizer: Path, shards: Path) -> dict | None:
    import torch

    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TOKENIZERS_PARALLELISM": "false"}
    if not torch.cuda.is_available():
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = launcher + [__file__, "--child", "--shape", args.shape, "--mode", args.mode, "--per-gpu",
                          str(args.per_gpu), "--steps", str(args.steps), "--warm", str(args.warm), "--gc", str(args.gc),
                          "--max-length", str(args.max_length), "--model", str(model), "--tokenizer", str(tokenizer),
                          "--shards", str(shards)] + (["--overrides", *args.overrides] if args.overrides else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"{processes} processes: over {args.timeout} s, stopped", file=sys.stderr)
        return None
    result = result_line(done.stdout)
    if result is None:
        print(f"{processes} processes failed:\n{done.stderr[-3000:]}", file=sys.stderr)
    return result


def table(rows: list[dict], args: argparse.Namespace) -> str:
    """The markdown table; efficiency against the one-process row when there is one."""
    from aligntrain.flops import mfu

    one = next((r for r in rows if r["processes"] == 1), None)
    lines = [f"FSDPTrainer, {args.mode}, shape {args.shape}, {args.per_gpu} items per GPU a step, {args.steps} steps "
             f"({args.warm} not timed), max_length {args.max_length}, activation checkpointing "
             f"{'on' if args.gc else 'off'}, {rows[0]['device'] if rows else '-'}", "",
             "| processes | items/s | tokens/s | tokens/s per GPU | scaling efficiency | MFU | peak GiB per GPU |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        per_gpu = r["tokens_per_s"] / r["processes"]
        efficiency = f"{per_gpu / one['tokens_per_s']:.0%}" if one else "-"
        share = mfu(r["tokens_per_s"] * r["flops_per_token"], float(r["processes"]), r["device"])
        lines.append(f"| {r['processes']} | {r['items_per_s']:,.2f} | {r['tokens_per_s']:,.0f} | {per_gpu:,.0f} | "
                     f"{efficiency} | {f'{share:.1%}' if share is not None else '-'} | "
                     f"{r['peak_gib'] if r['peak_gib'] is not None else '-'} |")
    return "\n".join(lines)


def process_counts(text: str) -> list[int]:
    """--gpus: comma-separated positive integers, ascending and without repeats."""
    try:
        counts = sorted({int(n) for n in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected process counts like 1,2,4") from None
    if counts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: process counts must be at least 1")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama1b")
    ap.add_argument("--mode", choices=("sft", "dpo"), default="sft")
    ap.add_argument("--per-gpu", type=int, default=36, help="items (rows or pairs) per GPU per step")
    ap.add_argument("--gpus", type=process_counts, default="1,2,4",
                    help="process counts, one row each (those over the visible GPUs are skipped)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warm", type=int, default=4, help="steps before the clock starts")
    ap.add_argument("--gc", type=int, default=0, help="activation checkpointing (1: on)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bench-fsdp-cache"))
    ap.add_argument("--timeout", type=int, default=600, help="seconds per row")
    ap.add_argument("--overrides", nargs="*", default=[], help="config overrides for every row, e.g. model.fsdp_policy_mp=bfloat16")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--model", "--tokenizer", "--shards"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 1 <= args.warm < args.steps:
        ap.error("--warm must be at least 1 and below --steps")
    if args.child:
        child(args)
        return
    import torch

    counts = args.gpus
    visible = torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)
    skipped = [n for n in counts if n > visible]
    if skipped:
        print(f"skipped: {', '.join(map(str, skipped))} processes (only {visible} "
              f"{'GPUs' if torch.cuda.is_available() else 'cores'} here)", file=sys.stderr)
    counts = [n for n in counts if n <= visible]
    started = time.perf_counter()
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    model, tokenizer, shards, _ = build_inputs(Path(args.cache), args.shape, args.mode,
                                               args.per_gpu * max(counts or [1]) * (args.steps + 2), args.max_length,
                                               Path(tempfile.mkdtemp(prefix="bench-fsdp-rows-")))
    rows = []
    for n in counts:
        result = run_row(args, n, model, tokenizer, shards)
        if result is not None:
            rows.append(result)
            print(f"{n} processes: {result['tokens_per_s']:,.0f} tokens/s, peak {result['peak_gib']} GiB per GPU, "
                  f"{result['first_steps_s']} s before the clock", flush=True)
    print()
    print(table(rows, args))
    print(f"\n{time.perf_counter() - started:.0f} s for the whole command")


if __name__ == "__main__":
    main()
