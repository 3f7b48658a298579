"""Training throughput on one GPU: `aligntrain dpo|sft` against TRL 1.16's trainers, same card, same call.

The anchor is `../shared/bench/trl_anchor.py` (TRL's DPOTrainer / SFTTrainer on a randomly initialised
model of a real shape, word-level synthetic data with log-normal prompt and reply lengths). This script
builds the same kind of data for us (its own generator, the same length distribution: prompt median 120
tokens, replies 220, max_length 1024), converts it with `aligndata convert` into shards, and times
`aligntrain.trainer.train` step by step. Each side runs in a fresh process; the first `--warm` steps
are not timed; peak GPU memory is read over the timed steps.

  python benchmarks/bench_train.py --suite all --anchor PATH     # every row of issue 12 (DPO, SFT; both shapes)
  python benchmarks/bench_train.py --suite dpo                   # or only the DPO rows, or only sft
  python benchmarks/bench_train.py --mode dpo --shape qwen0.5b --bs 16 --steps 20
  python benchmarks/bench_train.py --shape tiny --steps 4 --warm 1 --skip-trl     # a CPU smoke run

aligntrain trains on packed batches (no padding; a DPO prompt forwarded once); TRL's DPO pads, its SFT
rows here are its packed mode (`trl_anchor.py --mode sft_packed`, bfd packing into max_length rows).
Tokens/s count the same data tokens on both sides (DPO: prompt + chosen + prompt + rejected per pair).
MFU is the model FLOPs of the useful work (aligntrain.modeling.batch_flops: 6 per weight per policy
token, 2 per reference token, attention over the keys each token sees, the LM head on trained tokens;
a shared prompt once) over the card's dense bf16 peak (989 TFLOP/s on H100/H200); TRL's is the same
work per data token at its tokens/s.

What differs by design: TRL trains the bf16 weights directly; aligntrain keeps float32 master weights
and AdamW state and computes in bf16 under autocast (policy_dtype: bfloat16), the numerically safer
recipe. The reference model is bf16 in both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from childrun import child_result

REPO = Path(__file__).resolve().parents[1]
ANCHOR = REPO.parent / "shared" / "bench" / "trl_anchor.py"
PEAK_FLOPS = 989e12  # dense bf16, H100/H200 SXM
# the rows of issue 12: (mode, shape, our rows or pairs per step, TRL's mode, TRL's per-step batch);
# SFT: TRL packs 8 (16) rows of 1024 tokens per step, ours 24 (48) rows of ~370 tokens, about as many tokens
SUITES = {
    "dpo": [("dpo", "qwen0.5b", 16, "dpo", 16), ("dpo", "llama1b", 16, "dpo", 16)],
    "sft": [("sft", "qwen0.5b", 24, "sft_packed", 8), ("sft", "llama1b", 48, "sft_packed", 16)],
}
SUITES["all"] = SUITES["dpo"] + SUITES["sft"]

# Model shapes by their published configurations (Qwen2.5-0.5B, Llama-3.2-1B) and a toy one for CPU.
SHAPES = {
    "qwen0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, vocab_size=151936, rope_theta=1e6)),
    "llama1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256, rope_theta=5e5)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000)),
}
# Content, then the end-of-sequence token after every assistant turn: no chat markup, so both sides
# train on the same tokens (TRL appends EOS to completions of a tokenizer without a chat template).
TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
            "{% else %} {% endif %}{% endfor %}")


def build_model_dir(shape: str, out: Path, tokenizer_out: Path) -> int:
    """A randomly initialised model of `shape` in `out` and a word-level tokenizer (w0, w1, ... one id
    each) in `tokenizer_out`: a directory of its own, for next to a config.json whose model_type is
    qwen2, transformers 5 loads it as Qwen2Tokenizer, which puts its own byte-level pre-tokenizer in
    front of the word vocabulary (every word then maps to nothing)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    kind, dims = SHAPES[shape]
    vocab_size = dims["vocab_size"]
    words = {f"w{i}": i for i in range(vocab_size - 3)}
    words.update({"<pad>": vocab_size - 3, "<eos>": vocab_size - 2, "<unk>": vocab_size - 1})
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = TEMPLATE
    config = AutoConfig.for_model(kind, max_position_embeddings=4096, tie_word_embeddings=True,
                                  eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 3, **dims)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(tokenizer_out)
    return sum(p.numel() for p in model.parameters())


def write_rows(path: Path, n: int, vocab_size: int, mode: str, seed: int = 1) -> None:
    rng = random.Random(seed)

    def length(median: float, sigma: float, lo: int, hi: int) -> int:
        return min(hi, max(lo, int(median * math.exp(rng.gauss(0, sigma)))))

    def text(k: int) -> str:
        return " ".join(f"w{rng.randrange(vocab_size - 3)}" for _ in range(k))

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            prompt, chosen, rejected = text(length(120, 0.8, 8, 600)), text(length(220, 0.7, 4, 800)), \
                text(length(220, 0.7, 4, 800))
            if mode == "dpo":
                row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            else:
                row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}]}
            f.write(json.dumps(row) + "\n")


def run_ours(args: argparse.Namespace) -> dict:
    import torch
    import pyarrow.compute as pc

    import aligntrain.trainer as T
    from aligndata.write.convert import convert
    from aligndata.write.shards import open_split
    from aligntrain.config import load_config

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    params = build_model_dir(args.shape, work / "model", work / "tokenizer")
    n = args.bs * (args.steps + 2)
    write_rows(work / "rows.jsonl", n, SHAPES[args.shape][1]["vocab_size"], args.mode)
    convert([str(work / "rows.jsonl")], work / "shards", args.mode, str(work / "tokenizer"), max_length=args.max_length,
            max_prompt_length=args.max_length // 2 if args.mode == "dpo" else None, length_policy="truncate")
    table = open_split(work / "shards", "train")
    if args.mode == "dpo":
        p, c, r = (pc.list_value_length(table.column(k)).to_numpy() for k in ("prompt_ids", "chosen_ids",
                                                                                         "rejected_ids"))
        per_item = float((2 * p + c + r).mean())
    else:
        per_item = float(pc.list_value_length(table.column("input_ids")).to_numpy().mean())
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    cfg_path = work / "config.yml"
    cfg_path.write_text(json.dumps({  # JSON is YAML
        "exp_name": "bench", "seed": 0, "debug": True, "lr": 1e-6, "total_batch_size": args.bs,
        "gradient_accumulation_steps": 1, "max_length": args.max_length,
        "max_prompt_length": args.max_length // 2 if args.mode == "dpo" else None,
        "n_examples": args.bs * args.steps, "activation_checkpointing": bool(args.gc),
        "model": {"name_or_path": str(work / "model"), "tokenizer_name_or_path": str(work / "tokenizer"),
                  "policy_dtype": dtype, "reference_dtype": dtype, "packed_attention": args.packed_attention},
        "loss": {"name": args.mode, "beta": 0.1}, "output_dir": str(work / "run"), "log_every_steps": 10 ** 6,
    }))
    cfg = load_config(cfg_path)

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    times: list[float] = []
    flops: list[float] = []
    step_fn = T.train_step

    def timed_step(step, model, objective, optimizer, scheduler, batches, cfg, accelerator, counter):
        if args.profile and step == args.warm + 1:  # one step under the profiler, kernels by GPU time
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                out = step_fn(step, model, objective, optimizer, scheduler, batches, cfg, accelerator, counter)
                sync()
            Path(args.profile).write_text(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30))
        else:
            out = step_fn(step, model, objective, optimizer, scheduler, batches, cfg, accelerator, counter)
        sync()  # its float() of the loss and grad norm already waits for the GPU
        times.append(time.perf_counter())
        if step > args.warm:
            flops.append(sum(counter(b) for b in batches))
        if step == args.warm and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return out

    T.train_step = timed_step
    t_start = time.perf_counter()
    T.train(cfg, work / "shards")
    secs = times[-1] - times[args.warm - 1]
    items = (len(times) - args.warm) * args.bs
    on_peak_card = torch.cuda.is_available() and any(k in torch.cuda.get_device_name() for k in ("H100", "H200"))
    return {"secs": round(secs, 3), "items_per_s": round(items / secs, 2),
            "flops_per_token": sum(flops) / (items * per_item),
            "step_s": [round(b - a, 3) for a, b in zip(times[args.warm - 1:], times[args.warm:])],
            "mfu": round(sum(flops) / secs / PEAK_FLOPS, 4) if on_peak_card else None,
            "tokens_per_s": round(items * per_item / secs, 1), "mean_tokens_per_item": round(per_item, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else None,
            "params": params, "steps_timed": len(times) - args.warm, "wall_total": round(time.perf_counter() - t_start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), help="run these rows of issue 12 instead of one --mode/--shape")
    ap.add_argument("--mode", default="dpo", choices=["dpo", "sft"])
    ap.add_argument("--shape", default="qwen0.5b", choices=sorted(SHAPES))
    ap.add_argument("--bs", type=int, default=16, help="pairs (dpo) or rows (sft) per optimizer step")
    ap.add_argument("--trl-mode", choices=["dpo", "sft", "sft_packed"], help="TRL's mode (default: --mode)")
    ap.add_argument("--trl-bs", type=int, help="TRL's per-step batch (default: --bs)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warm", type=int, default=5, help="first steps not timed (they compile flex attention)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--gc", type=int, default=0, help="activation checkpointing, both sides")
    ap.add_argument("--anchor", default=str(ANCHOR), help="path of trl_anchor.py")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--packed-attention", default="flex", choices=["flex", "rows"], help="model.packed_attention of ours")
    ap.add_argument("--profile", help="write a torch.profiler table of our first timed step to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warm < 1 or args.warm >= args.steps:
        ap.error("--warm must be at least 1 and below --steps")
    if args.child:
        print("RESULT " + json.dumps(run_ours(args)), flush=True)
        return
    rows = SUITES[args.suite] if args.suite else [(args.mode, args.shape, args.bs, args.trl_mode or args.mode,
                                                   args.trl_bs or args.bs)]
    if not args.skip_trl and not Path(args.anchor).is_file():
        ap.error(f"no anchor at {args.anchor}: pass --anchor PATH or --skip-trl")
    table = []
    for mode, shape, bs, trl_mode, trl_bs in rows:
        common = ["--shape", shape, "--steps", str(args.steps), "--warm", str(args.warm), "--gc", str(args.gc)]
        profile = ["--profile", f"{args.profile}.{mode}.{shape}"] if args.profile else []
        profile += ["--packed-attention", args.packed_attention]
        ours = child_result([sys.executable, __file__, "--child", "--mode", mode, "--bs", str(bs), "--max-length",
                             str(args.max_length)] + common + profile, f"aligntrain {mode} {shape}")
        trl = None
        if not args.skip_trl:
            trl = child_result([sys.executable, args.anchor, "--mode", trl_mode, "--bs", str(trl_bs), "--max_length",
                                str(args.max_length)] + common, f"TRL {trl_mode} {shape}")
        print(f"{mode} {shape}: aligntrain {json.dumps(ours)}\n{trl_mode} {shape}: TRL {json.dumps(trl)}", flush=True)
        table.append((f"{mode.upper()} {shape}, {bs} {'pairs' if mode == 'dpo' else 'rows'}/step vs TRL {trl_mode} "
                      f"{trl_bs}/step", mode, ours, trl))
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{args.steps} steps ({args.warm} not timed), max_length {args.max_length}, activation checkpointing "
          f"{'on' if args.gc else 'off'}, {device}\n")
    print("| run | aligntrain items/s | TRL items/s | aligntrain tok/s | TRL tok/s | ratio tok/s | MFU ours / TRL | "
          "peak GiB ours / TRL |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, mode, ours, trl in table:
        if ours is None:
            print(f"| {name} | failed | | | | | | |")
            continue
        trl = trl or {}
        ratio = f"{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if trl else "-"
        trl_items = f"{trl['items_per_s']:.1f}" if trl and mode == "dpo" else "-"
        mfu = f"{ours['mfu']:.1%}" if ours.get("mfu") is not None else "-"
        if ours.get("mfu") is not None and trl:
            mfu += f" / {trl['tokens_per_s'] * ours['flops_per_token'] / PEAK_FLOPS:.1%}"
        print(f"| {name} | {ours['items_per_s']:.1f} | {trl_items} | {ours['tokens_per_s']:,.0f} | "
              f"{trl.get('tokens_per_s', 0):,.0f} | {ratio} | {mfu} | {ours.get('peak_gib')} / {trl.get('peak_gib', '-')} |")


if __name__ == "__main__":
    main()
