"""On the GPU: the packed fast path (flex attention, shared DPO prompt) gives the same per-sequence
log-probs and gradients as the simple path (each sequence alone, full-vocabulary log-softmax).

  python benchmarks/gpu_check.py [--shape qwen0.5b] [--pairs 8]

A randomly initialised model of the shape, float32 weights as training keeps them, rows drawn from
bench_train's length distribution. Checked twice: in float32 (TF32 off; the kernels differ, so a
small relative tolerance) and under bf16 autocast (bf16 tolerance). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from bench_train import SHAPES  # noqa: E402
from trainer_fixtures import simple_sequence_logps  # noqa: E402

from aligntrain.data import collate  # noqa: E402
from aligntrain.modeling import MODEL_INPUTS, SequenceLogps  # noqa: E402


def rows(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(median: float, sigma: float, lo: int, hi: int) -> list[int]:
        k = min(hi, max(lo, int(median * math.exp(rng.gauss(0, sigma)))))
        return [rng.randrange(vocab) for _ in range(k)]

    return [{"prompt_ids": ids(120, 0.8, 8, 400), "chosen_ids": ids(220, 0.7, 4, 300),
             "rejected_ids": ids(220, 0.7, 4, 300)} for _ in range(n)]


def as_sft(pairs: list[dict]) -> list[dict]:
    return [{"input_ids": r["prompt_ids"] + r["chosen_ids"], "loss_mask": [0] * len(r["prompt_ids"]) + [1] * len(r["chosen_ids"])}
            for r in pairs]


def sequences(batch_rows: list[dict], task: str) -> list[tuple[list[int], list[int]]]:
    if task == "sft":
        return [(r["input_ids"], r["loss_mask"]) for r in batch_rows]
    return [(r["prompt_ids"] + r[side], [0] * len(r["prompt_ids"]) + [1] * len(r[side]))
            for side in ("chosen_ids", "rejected_ids") for r in batch_rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen0.5b", choices=sorted(SHAPES))
    ap.add_argument("--pairs", type=int, default=8)
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    kind, dims = SHAPES[args.shape]
    config = AutoConfig.for_model(kind, max_position_embeddings=4096, tie_word_embeddings=True, **dims)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32).cuda()
    # the simple path runs on a second copy with the stock SDPA attention; the fast path on `lm`
    simple_lm = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32,
                                                 attn_implementation="sdpa").cuda()
    simple_lm.load_state_dict(lm.state_dict())
    pairs = rows(args.pairs, dims["vocab_size"] - 3)
    failed = False
    # float32: kernels differ in summation order only; bf16: both paths round, differently
    for kernel in ("flex", "rows"):
        model = SequenceLogps(lm, attention=kernel)  # switches lm (and its config object) to the packed attention
        for dtype, tol_logp, tol_cos in ((torch.float32, 1e-4, 0.9999), (torch.bfloat16, 1e-2, 0.99)):
            for task, batch_rows in (("sft", as_sft(pairs)), ("dpo", pairs)):
                relative, cosine = compare_two(simple_lm, lm, model, batch_rows, task, dtype)
                ok = relative <= tol_logp and cosine >= tol_cos
                failed |= not ok
                print(f"{args.shape} {kernel} {task} {str(dtype).split('.')[-1]}: max relative logp difference {relative:.2e} "
                      f"(tolerance {tol_logp:.0e}), gradient cosine {cosine:.6f} (>= {tol_cos}) {'ok' if ok else 'FAILED'}",
                      flush=True)
    return 1 if failed else 0


def compare_two(simple_lm, lm, model, batch_rows, task, dtype) -> tuple[float, float]:
    """(max relative difference of the per-sequence log-probs, cosine of the two weight gradients)."""
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype is not torch.float32)
    simple_lm.zero_grad(set_to_none=True)
    with autocast:
        simple, _ = simple_sequence_logps(simple_lm, sequences(batch_rows, task))
    simple.sum().backward()
    simple_grad = torch.cat([p.grad.flatten() for p in simple_lm.parameters()])
    lm.zero_grad(set_to_none=True)
    batch = {k: v.cuda() for k, v in collate(batch_rows, task).items()}
    with autocast:
        fast, _ = model(**{k: batch[k] for k in MODEL_INPUTS})
    fast.sum().backward()
    fast_grad = torch.cat([p.grad.flatten() for p in lm.parameters()])
    relative = ((fast.detach() - simple.detach()).abs() / simple.detach().abs()).max().item()
    cosine = torch.nn.functional.cosine_similarity(fast_grad, simple_grad, dim=0).item()
    return relative, cosine


if __name__ == "__main__":
    sys.exit(main())
