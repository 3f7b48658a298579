"""Where one training forward + backward spends its time, per batch layout: the policy's completion
log-probs (SequenceLogps) on one micro-batch of bench_train's length distribution, float32 master
weights under bf16 autocast as the trainer runs them. Prints the mean time of each layout and, with
--profile, the top kernels and the host time of one profiled iteration. --compile then runs each layout
again with the decoder layers and head compiled (aligntrain/compiling.py; the first, compiling, calls are
timed apart) and prints how far its log-probs are from eager's.

  python benchmarks/profile_logps.py --shape qwen0.5b --pairs 16 [--profile] [--compile] [--layouts shared-prompt]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from attention_kernels import pair_lengths  # noqa: E402
from bench_train import model_config  # noqa: E402

from aligntrain.data import collate, to_device  # noqa: E402
from aligntrain.modeling import SequenceLogps, model_inputs  # noqa: E402
from aligntrain.packing import PACKED, PADDED, SHARED, use_packed_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen0.5b")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--compile", action="store_true", help="each layout also compiled (after all eager runs)")
    ap.add_argument("--layouts", default=f"{PADDED},{PACKED},{SHARED}")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = model_config(args.shape)
    rng = random.Random(0)
    rows = [{"prompt_ids": [rng.randrange(config.vocab_size) for _ in range(p)],
             "chosen_ids": [rng.randrange(config.vocab_size) for _ in range(c)],
             "rejected_ids": [rng.randrange(config.vocab_size) for _ in range(r)]}
            for p, c, r in pair_lengths(args.pairs, 1024, seed=1)]
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").to(device)
    use_packed_attention(lm)  # padded batches still reach SDPA through it
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layouts = args.layouts.split(",")
    eager_logps = {}
    for compiled in (False, True) if args.compile else (False,):
        model = SequenceLogps(lm, compiled=compiled)  # compiling changes lm's layers in place: eager runs first
        for layout in layouts:
            batch = to_device(collate(rows, "dpo", 0, layout), device)
            tokens = batch["input_ids"].numel()

            def step():
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                    logps, _ = model(**model_inputs(batch))
                logps.sum().backward()
                lm.zero_grad(set_to_none=True)
                return logps.detach().float()

            start = time.perf_counter()
            for _ in range(2):
                logps = step()
            sync(device)
            first = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.iters):
                step()
            sync(device)
            ms = (time.perf_counter() - start) / args.iters * 1000
            name = layout + (" compiled" if compiled else "")
            if compiled:
                diff = f"  max |logp - eager| {(logps - eager_logps[layout]).abs().max().item():.4f}"
            else:
                eager_logps[layout], diff = logps, ""
            print(f"{name:24s} {tokens:6d} tokens forwarded  {ms:8.1f} ms per forward+backward  "
                  f"(first 2 calls {first:.1f} s){diff}", flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with profile(activities=activities) as prof:
                    step()
                    sync(device)
                key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60), flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
