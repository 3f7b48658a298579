"""The TRL side of `bench_train.py --lora`: TRL 1.16's DPOTrainer training LoRA adapters.

The anchor (`../shared/bench/trl_anchor.py`) trains full weights and has no peft option. This runs
the anchor's measurement with `peft_config=LoraConfig(...)` and no ref_model, so TRL takes the
reference from the base model with the adapters disabled, as aligntrain does with `model.lora`.
Data, tokenizer, timer and the RESULT fields are the anchor's own (imported from --anchor, so both
stay one definition); the model shape is bench_train's (the anchor's shapes plus llama8b).

  python benchmarks/trl_lora.py --anchor ../shared/bench/trl_anchor.py --shape llama1b --bs 16 \
      --lora r=16,alpha=32,targets=all-linear
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench_train import SHAPES, load_anchor, model_config, parse_lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchor", required=True, help="path of trl_anchor.py")
    ap.add_argument("--mode", default="dpo", choices=["dpo"])
    ap.add_argument("--shape", default="llama1b", choices=sorted(SHAPES))
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--max_length", type=int, default=1024)
    ap.add_argument("--gc", type=int, default=0)
    ap.add_argument("--lora", default="r=16,alpha=32,targets=all-linear")
    a = ap.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    anchor = load_anchor(a.anchor)
    lora = parse_lora(a.lora)
    torch.manual_seed(0)
    config = model_config(a.shape)
    tok = anchor.make_tokenizer(config.vocab_size)
    rows = anchor.make_rows(a.bs * (a.steps + 2), config.vocab_size)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    params = sum(p.numel() for p in model.parameters())
    args = DPOConfig(output_dir="/tmp/trl_lora_out", per_device_train_batch_size=a.bs, max_steps=a.steps,
                     learning_rate=1e-6, logging_steps=10, report_to="none", save_strategy="no", bf16=True,
                     gradient_checkpointing=bool(a.gc), max_length=a.max_length, dataloader_num_workers=0,
                     use_cpu=(dev == "cpu"), beta=0.1)
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                             target_modules=lora["target_modules"])
    timer = anchor.Timer(a.warm)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_config, callbacks=[timer])
    ds = trainer.train_dataset
    tok_per = [min(a.max_length, len(p) + len(c)) + min(a.max_length, len(p) + len(r))
               for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    t_start = time.perf_counter()
    trainer.train()
    secs = timer.t1 - timer.t0
    items = (a.steps - a.warm) * a.bs
    mean_tok = sum(tok_per) / len(tok_per)
    print("RESULT " + json.dumps({
        "mode": "dpo-lora", "shape": a.shape, "params": params, "bs": a.bs, "gc": a.gc, "lora": a.lora,
        "steps_timed": a.steps - a.warm, "secs": round(secs, 3), "items_per_s": round(items / secs, 2),
        "tokens_per_s": round(items * mean_tok / secs, 1), "mean_tokens_per_item": round(mean_tok, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if dev == "cuda" else None,
        "wall_total": round(time.perf_counter() - t_start, 1)}), flush=True)


if __name__ == "__main__":
    main()
