"""The variable-length attention kernels this torch offers, on SFT streams of the training bench's lengths.

The trainer's padding-free attention (aligntrain/packing.py) calls aten's varlen flash kernels (FA2). This
times them against cuDNN's ragged attention (aten._cudnn_attention_forward with cumulative offsets) and,
where the flash-attn-4 package is installed, FlashAttention 4's CuTe kernels (flash_attn.cute, Hopper and
Blackwell; compiled on their first call, which is timed apart), forward and backward, on a fresh batch of rows every iteration, as training sees them: each batch has its own
token count, so a kernel that plans per shape on the host pays for it here. cuDNN is tried with the
model's grouped key/value heads as they are and with them repeated to the query heads. Each variant is
checked against flash (outputs and gradients).

  python benchmarks/varlen_kernels.py --shape llama1b --rows 36
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train import SHAPES, draw_length  # noqa: E402  (this folder: the bench's model shapes and lengths)


def attention_shape(shape: str) -> tuple[int, int, int, int]:
    """(query heads, key/value heads, head dim, layers) of a bench_train shape."""
    config = SHAPES[shape][1]
    heads = config["num_attention_heads"]
    return heads, config["num_key_value_heads"], config["hidden_size"] // heads, config["num_hidden_layers"]


def row_lengths(n: int, max_length: int, rng: random.Random) -> list[int]:
    """Prompt + reply lengths of bench_train's SFT data (log-normal, medians 120 and 220)."""
    return [min(max_length, draw_length(rng, 120, 0.8, 8, 600) + draw_length(rng, 220, 0.7, 4, 800)) for _ in range(n)]


def batch(lengths: list[int], hq: int, hk: int, d: int, device) -> dict:
    t = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)
    make = lambda h: torch.randn(t, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    return {"q": make(hq), "k": make(hk), "v": make(hk), "cu": cu, "grad": torch.randn(t, hq, d, device=device,
                                                                                       dtype=torch.bfloat16)}


def flash(b, max_len):
    out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
        b["q"], b["k"], b["v"], b["cu"], b["cu"], max_len, max_len, 0.0, True, False)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        b["grad"], b["q"], b["k"], b["v"], out, lse, b["cu"], b["cu"], max_len, max_len, 0.0, True, seed, offset)
    return out, (dq, dk, dv)


def cudnn(b, max_len, repeat: bool):
    """cuDNN's ragged attention through its autograd formula (the backward takes an undefined bias, which
    only autograd can pass)."""
    q, k, v = b["q"], b["k"], b["v"]
    groups = q.shape[1] // k.shape[1]
    kk, vv = (k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)) if repeat and groups > 1 else (k, v)
    out = torch.ops.aten._cudnn_attention_forward(q, kk, vv, None, b["cu"], b["cu"], max_len, max_len, True, 0.0, True,
                                                  False)[0]
    return out, torch.autograd.grad(out, (q, k, v), b["grad"])


def fa4(b, max_len):
    """FlashAttention 4 (flash_attn.cute) on the same cumulative offsets, grouped heads as they are."""
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    q, k, v, cu = b["q"], b["k"], b["v"], b["cu"]
    out, lse = _flash_attn_fwd(q.detach(), k.detach(), v.detach(), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                               max_seqlen_k=max_len, causal=True, return_lse=True)[:2]
    grads = _flash_attn_bwd(q.detach(), k.detach(), v.detach(), out, b["grad"], lse, causal=True, cu_seqlens_q=cu,
                            cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len)
    return out, tuple(grads[:3])


def timed(fn, batches, max_len) -> tuple[float, float]:
    """(GPU ms per call, host ms per call) over `batches`, each a new token count."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for b in batches:
        fn(b, max_len)
    host = (time.perf_counter() - t0) / len(batches)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / len(batches), host * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["qwen0.5b", "llama1b"], default="llama1b")
    ap.add_argument("--rows", type=int, default=36)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=20, help="distinct batches timed (each its own token count)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for name in ("rows", "max_length", "batches"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if not torch.cuda.is_available():
        print("varlen_kernels.py times CUDA kernels: no GPU here")
        return 2
    hq, hk, d, layers = attention_shape(a.shape)
    rng = random.Random(a.seed)
    dev = torch.device("cuda")
    batches = [batch(row_lengths(a.rows, a.max_length, rng), hq, hk, d, dev) for _ in range(a.batches)]
    tokens = sum(b["q"].shape[0] for b in batches) / len(batches)
    print(f"cuDNN {torch.backends.cudnn.version()}")
    print(f"{a.shape}: {hq} query heads, {hk} key/value heads, head dim {d}; {a.rows} rows a batch, "
          f"{tokens:,.0f} tokens on average, {a.batches} batches; per layer, forward + backward")
    variants = {"flash (FA2, aten varlen)": flash,
                "cuDNN ragged, grouped heads": lambda b, m: cudnn(b, m, False),
                "cuDNN ragged, heads repeated": lambda b, m: cudnn(b, m, True),
                "FA4 (flash_attn.cute)": fa4}
    reference = [flash(b, a.max_length) for b in batches[:2]]
    print(f"{'variant':32} {'GPU ms':>8} {'x layers':>9} {'host ms':>8} {'2nd pass':>9} {'max |out-flash|':>16} "
          f"{'max |grad-flash|':>17}")
    for name, fn in variants.items():
        try:
            t0 = time.perf_counter()
            outs = [fn(b, a.max_length) for b in batches[:2]]
            torch.cuda.synchronize()
            print(f"  {name}: first two calls (compiling, if it does) {time.perf_counter() - t0:.1f} s")
            err_out = max((o[0].float() - r[0].float()).abs().max().item() for o, r in zip(outs, reference))
            err_grad = max((g.float() - h.float()).abs().max().item()
                           for o, r in zip(outs, reference) for g, h in zip(o[1], r[1]))
            first = timed(fn, batches, a.max_length)  # new token counts: any per-shape planning happens here
            second = timed(fn, batches, a.max_length)  # the same counts again: plans cached
            print(f"{name:32} {first[0]:8.3f} {first[0] * layers:9.2f} {first[1]:8.3f} {second[0]:9.3f} "
                  f"{err_out:16.4f} {err_grad:17.4f}")
        except Exception as e:  # a kernel this build lacks: report and go on
            print(f"{name:32} not run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
