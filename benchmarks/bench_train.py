"""Training throughput on one GPU: `aligntrain dpo|sft` against TRL 1.16's trainers, same card, same call.

The anchor is `../shared/bench/trl_anchor.py` (TRL's DPOTrainer / SFTTrainer on a randomly initialised
model of a real shape, word-level synthetic data with log-normal prompt and reply lengths). This script
builds the same kind of data for us (its own generator, the same length distribution: prompt median 120
tokens, replies 220, max_length 1024), converts it with `aligndata convert` into shards, and times
`aligntrain.trainer.train` step by step. Each side runs in a fresh process; the first `--warm` steps
are not timed; peak GPU memory is read over the timed steps.

  python benchmarks/bench_train.py --mode dpo --shape qwen0.5b --bs 16 --steps 20
  python benchmarks/bench_train.py --mode sft --shape qwen0.5b --bs 8 --steps 30
  python benchmarks/bench_train.py --shape tiny --steps 4 --warm 1 --skip-trl     # a CPU smoke run
  python benchmarks/bench_train.py --mode dpo --shape llama1b --bs 16 --lora r=16,alpha=32,targets=all-linear

With `--lora`, both sides train LoRA adapters of the same peft config on a frozen bf16 base and take
the reference from the base with adapters disabled; the TRL side is `trl_lora.py` (TRL's DPOTrainer
with `peft_config`, the anchor's data and timing), as the anchor has no peft option.

What differs by design: TRL trains the bf16 weights directly; aligntrain keeps float32 master weights
and AdamW state and computes in bf16 under autocast (policy_dtype: bfloat16), which costs memory and
some speed and is the numerically safer recipe. The reference model is bf16 in both.
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
TRL_LORA = Path(__file__).resolve().parent / "trl_lora.py"

# Model shapes by their published configurations (Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.1-8B) and a toy
# one for CPU; the embeddings are tied unless the shape says otherwise (Llama-3.1-8B's are not).
SHAPES = {
    "qwen0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, vocab_size=151936, rope_theta=1e6)),
    "llama1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256, rope_theta=5e5)),
    "llama8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256, rope_theta=5e5, tie_word_embeddings=False)),
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
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab_size = SHAPES[shape][1]["vocab_size"]
    words = {f"w{i}": i for i in range(vocab_size - 3)}
    words.update({"<pad>": vocab_size - 3, "<eos>": vocab_size - 2, "<unk>": vocab_size - 1})
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = TEMPLATE
    config = model_config(shape, eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 3)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # an 8B init takes minutes on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tok.save_pretrained(tokenizer_out)
    return params


def model_config(shape: str, **extra):
    """The transformers config of `shape` (also what trl_lora.py builds for TRL)."""
    from transformers import AutoConfig

    kind, dims = SHAPES[shape]
    return AutoConfig.for_model(kind, **{"max_position_embeddings": 4096, "tie_word_embeddings": True, **extra, **dims})


def parse_lora(spec: str) -> dict:
    """`r=16,alpha=32,targets=all-linear` (targets: all-linear or names joined by '+') -> our model.lora."""
    fields = dict(part.split("=", 1) for part in spec.split(","))
    unknown = set(fields) - {"r", "alpha", "targets"}
    if unknown:
        raise SystemExit(f"--lora: unknown field(s) {sorted(unknown)}; use r=16,alpha=32,targets=all-linear")
    targets = fields.get("targets", "all-linear")
    return {"r": int(fields.get("r", 16)), "alpha": float(fields.get("alpha", 32)),
            "target_modules": targets if targets == "all-linear" else targets.split("+")}


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
                  "policy_dtype": dtype, "reference_dtype": dtype,
                  **({"lora": parse_lora(args.lora)} if args.lora else {})},
        "loss": {"name": args.mode, "beta": 0.1}, "output_dir": str(work / "run"), "log_every_steps": 10 ** 6,
    }))
    cfg = load_config(cfg_path, overrides=args.overrides or None)

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    times: list[float] = []
    step_fn = T.train_step

    def timed_step(step, *a, **k):
        out = step_fn(step, *a, **k)  # its float() of the loss and grad norm already waits for the GPU
        sync()
        times.append(time.perf_counter())
        if step == args.warm and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return out

    T.train_step = timed_step
    t_start = time.perf_counter()
    T.train(cfg, work / "shards")
    secs = times[-1] - times[args.warm - 1]
    items = (len(times) - args.warm) * args.bs
    return {"secs": round(secs, 3), "items_per_s": round(items / secs, 2),
            "tokens_per_s": round(items * per_item / secs, 1), "mean_tokens_per_item": round(per_item, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else None,
            "params": params, "steps_timed": len(times) - args.warm, "wall_total": round(time.perf_counter() - t_start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="dpo", choices=["dpo", "sft"])
    ap.add_argument("--shape", default="qwen0.5b", choices=sorted(SHAPES))
    ap.add_argument("--bs", type=int, default=16, help="pairs (dpo) or rows (sft) per optimizer step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warm", type=int, default=5, help="first steps not timed")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--gc", type=int, default=0, help="activation checkpointing, both sides")
    ap.add_argument("--lora", default=None, metavar="SPEC",
                    help="LoRA on both sides, e.g. r=16,alpha=32,targets=all-linear (targets: q_proj+v_proj, ...)")
    ap.add_argument("--also", action="append", default=[], metavar="K=V[,K=V]",
                    help="one more aligntrain run with these config overrides (repeatable), e.g. model.cudnn_attention=false")
    ap.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--anchor", default=str(ANCHOR), help="path of trl_anchor.py")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warm < 1 or args.warm >= args.steps:
        ap.error("--warm must be at least 1 and below --steps")
    if args.lora:
        parse_lora(args.lora)  # refuse a bad spec before anything runs
        if args.mode != "dpo" and not args.skip_trl:
            ap.error("--lora compares DPO only (trl_lora.py runs TRL's DPOTrainer); add --skip-trl for SFT")
    if args.child:
        print("RESULT " + json.dumps(run_ours(args)), flush=True)
        return

    shared = ["--mode", args.mode, "--shape", args.shape, "--bs", str(args.bs), "--steps", str(args.steps),
              "--warm", str(args.warm), "--gc", str(args.gc)]
    results = {}
    lora = ["--lora", args.lora] if args.lora else []
    what = args.mode + (" LoRA" if args.lora else "")
    ours = child_result([sys.executable, __file__, "--child", "--max-length", str(args.max_length)] + shared + lora,
                        "aligntrain run")
    if ours:
        results["aligntrain " + what] = ours
    for spec in args.also:
        extra = child_result([sys.executable, __file__, "--child", "--max-length", str(args.max_length)] + shared + lora
                             + ["--overrides", *spec.split(",")], f"aligntrain run ({spec})")
        if extra:
            results[f"aligntrain {what} ({spec})"] = extra
    if not args.skip_trl:
        if not Path(args.anchor).is_file():
            print(f"no anchor at {args.anchor}: pass --anchor PATH or --skip-trl", file=sys.stderr)
        else:
            if args.lora:
                command = [sys.executable, str(TRL_LORA), "--anchor", args.anchor] + lora
            else:
                command = [sys.executable, args.anchor]
            trl = child_result(command + ["--max_length", str(args.max_length)] + shared, "TRL anchor")
            if trl:
                results[f"TRL 1.16 {what}"] = trl
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{what}, shape {args.shape}, {args.bs} per step, {args.steps} steps ({args.warm} not timed), "
          f"max_length {args.max_length}, activation checkpointing {'on' if args.gc else 'off'}, {device}\n")
    print("| run | items/s | tokens/s | mean tokens/item | peak GiB | timed s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['items_per_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['mean_tokens_per_item']:.0f} | "
              f"{r.get('peak_gib') if r.get('peak_gib') is not None else '-'} | {r['secs']:.2f} |")
    trl = next((r for name, r in results.items() if name.startswith("TRL")), None)
    for name, r in results.items():
        if trl is not None and r is not trl:
            print(f"{name} / TRL: {r['tokens_per_s'] / trl['tokens_per_s']:.2f}x tokens/s, "
                  f"{r['items_per_s'] / trl['items_per_s']:.2f}x items/s")


if __name__ == "__main__":
    main()
