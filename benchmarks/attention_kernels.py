"""Attention for one DPO batch, forward + backward, by layout: padded against the trainer's padding-free ones.

The padded path runs SDPA over every padded position with a 4D mask; the padding-free paths
(aligntrain/packing.py) run each sequence at its own length, and can forward a pair's prompt once with
both completions attending to it. This times one attention layer of
a real model shape on one batch of the training benchmark's length distribution (prompt median 120
tokens, replies 220, log-normal, max_length 1024), and checks that the packed variants compute the
same outputs and gradients as the padded one on the positions they share.

  python benchmarks/attention_kernels.py --shape qwen0.5b --pairs 16

Variants:
  padded     SDPA on [2 x pairs, H, longest, D] with a causal + padding mask (padding_free: false)
  varlen     the trainer's segment attention, chosen and rejected rows packed, each prompt forwarded twice
  shared     the trainer's segment attention, prompt once: queries [prompt, chosen, rejected] per pair; the keys of
             the rejected segment are [prompt, rejected] gathered from the stream (bottom-right causal)
  flex       (--flex) flex attention (compiled) on the stream [prompt, chosen, rejected] with a block mask

A whole model by layout, through the trainer's own code: benchmarks/profile_logps.py.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aligntrain.packing import Segments, segment_attention  # noqa: E402
from bench_train import draw_length  # noqa: E402  (this folder: the benchmarks' length distribution)

SHAPES = {  # query heads, key/value heads, head dim (Qwen2.5-0.5B, Llama-3.2-1B)
    "qwen0.5b": (14, 2, 64),
    "llama1b": (32, 8, 64),
}


def pair_lengths(n: int, max_length: int, seed: int) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, c, r = draw_length(rng, 120, 0.8, 8, 600), draw_length(rng, 220, 0.7, 4, 800), draw_length(rng, 220, 0.7, 4, 800)
        p = min(p, max_length // 2)  # as a prompt budget would
        c, r = min(c, max_length - p), min(r, max_length - p)
        out.append((p, c, r))
    return out


class Layouts:
    """Index tensors of every variant for one batch, built once on the host (as a collate would)."""

    def __init__(self, lengths, device):
        rows = [(p, c) for p, c, _ in lengths] + [(p, r) for p, _, r in lengths]
        self.longest = max(p + x for p, x in rows)
        # padded: row i holds prompt + completion at positions 0..len-1
        self.row_len = torch.tensor([p + x for p, x in rows], device=device)
        # varlen: rows back to back
        self.cu_rows = torch.tensor([0] + list(_cumsum([p + x for p, x in rows])), dtype=torch.int32, device=device)
        # stream: per pair [prompt, chosen, rejected]; shared keys: [prompt, chosen] and [prompt, rejected]
        q_seg, k_seg, gather, doc, branch = [], [], [], [], []
        start = 0
        for i, (p, c, r) in enumerate(lengths):
            prompt = list(range(start, start + p))
            chosen = list(range(start + p, start + p + c))
            rejected = list(range(start + p + c, start + p + c + r))
            q_seg += [p + c, r]
            k_seg += [p + c, p + r]
            gather += prompt + chosen + prompt + rejected
            doc += [i] * (p + c + r)
            branch += [0] * p + [1] * c + [2] * r
            start += p + c + r
        self.stream_len = start
        self.cu_q = torch.tensor([0] + list(_cumsum(q_seg)), dtype=torch.int32, device=device)
        self.cu_k = torch.tensor([0] + list(_cumsum(k_seg)), dtype=torch.int32, device=device)
        self.max_q, self.max_k = max(q_seg), max(k_seg)
        self.gather = torch.tensor(gather, device=device)
        self.doc = torch.tensor(doc, device=device)
        self.branch = torch.tensor(branch, device=device)
        # where each stream token sits in the padded layout (chosen rows first, then rejected rows)
        n = len(lengths)
        in_padded = []
        for i, (p, c, r) in enumerate(lengths):
            in_padded += [i * self.longest + t for t in range(p + c)] + [(n + i) * self.longest + p + t for t in range(r)]
        self.stream_in_padded = torch.tensor(in_padded, device=device)
        # where each stream token sits in the varlen rows layout (the chosen row's prompt stands for the prompt)
        row_start = self.cu_rows.tolist()
        in_rows = []
        for i, (p, c, r) in enumerate(lengths):
            in_rows += [row_start[i] + t for t in range(p + c)] + [row_start[n + i] + p + t for t in range(r)]
        self.stream_in_rows = torch.tensor(in_rows, device=device)
        # the rejected rows' prompt copies in the rows layout, and the prompt positions of the stream
        self.rows_prompt_copy = torch.tensor([row_start[n + i] + t for i, (p, _, _) in enumerate(lengths)
                                              for t in range(p)], device=device)


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


def varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """The trainer's attention over segments (aligntrain.packing.segment_attention): flash on CUDA, exact
    attention per segment elsewhere (the CPU check of the layouts)."""
    segments = Segments(cu_q, cu_k, None, max_q, max_k)
    return segment_attention(q, k, v, segments)


def run_padded(lay: Layouts, q, k, v):
    """q/k/v [rows, longest, H, D] -> out [rows, longest, H, D]; the mask as transformers builds it."""
    t = torch.arange(lay.longest, device=q.device)
    valid = t[None, :] < lay.row_len[:, None]
    mask = (t[None, :, None] >= t[None, None, :]) & valid[:, None, :]
    mask = mask | ~valid[:, :, None]  # padded queries see everything (no all-masked rows)
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None])
    return out.transpose(1, 2)


def run_rows(lay, q, k, v):
    return varlen(q, k, v, lay.cu_rows, lay.cu_rows, lay.longest, lay.longest)


def run_shared(lay, q, k, v):
    return varlen(q, k.index_select(0, lay.gather), v.index_select(0, lay.gather), lay.cu_q, lay.cu_k, lay.max_q, lay.max_k)


_FLEX = None


def run_flex(lay, q, k, v, block_mask):
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    out = _FLEX(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask,
                enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def flex_mask(lay):
    from torch.nn.attention.flex_attention import create_block_mask

    doc, branch = lay.doc, lay.branch

    def visible(b, h, qi, ki):
        same = doc[qi] == doc[ki]
        return same & (qi >= ki) & ((branch[ki] == 0) | (branch[ki] == branch[qi]))

    n = lay.stream_len
    return create_block_mask(visible, None, None, n, n, device=doc.device, _compile=True)


def timed(fn, inputs, grad, iters):
    """Mean forward and forward + backward milliseconds after three warm-up calls."""
    def sync():
        if grad.is_cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        fn(*inputs).backward(grad)
    sync()
    fwd, total = 0.0, 0.0
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn(*inputs)
        sync()
        t1 = time.perf_counter()
        out.backward(grad)
        sync()
        fwd += t1 - t0
        total += time.perf_counter() - t0
    return fwd * 1e3 / iters, total * 1e3 / iters


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen0.5b", choices=sorted(SHAPES))
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flex", action="store_true", help="also time flex attention (compiles first: slow to start)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu checks the layouts in float32 with a reference varlen (timings mean little there)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hq, hkv, d = SHAPES[a.shape]
    lengths = pair_lengths(a.pairs, a.max_length, a.seed)
    lay = Layouts(lengths, dev)
    g = torch.Generator(device=dev).manual_seed(a.seed)
    tol = 2e-2 if dt == torch.bfloat16 else 1e-5
    # one q/k/v per stream token; the other layouts are copies of it, so all variants see the same numbers
    qs, ks, vs = (torch.randn(lay.stream_len, h, d, device=dev, dtype=dt, generator=g) for h in (hq, hkv, hkv))
    gs = torch.randn(lay.stream_len, hq, d, device=dev, dtype=dt, generator=g)

    rows = lay.cu_rows[-1].item()
    n_rows = 2 * a.pairs
    print(f"{a.shape} on {dev.type}: layouts built", flush=True)

    def to_rows(x):  # stream -> rows layout (prompt copied into the rejected rows)
        out = x.new_zeros(rows, *x.shape[1:])
        out[lay.stream_in_rows] = x
        out[lay.rows_prompt_copy] = x[_prompt_positions(lay, lengths)]
        return out

    def to_padded(x):
        r = to_rows(x)
        out = x.new_zeros(n_rows * lay.longest, *x.shape[1:])
        starts = lay.cu_rows.tolist()
        for i in range(n_rows):
            out[i * lay.longest:i * lay.longest + starts[i + 1] - starts[i]] = r[starts[i]:starts[i + 1]]
        return out.view(n_rows, lay.longest, *x.shape[1:])

    def leaf(x):
        return x.detach().clone().requires_grad_(True)

    # the gradient each layout receives: the stream's, copied where a layout holds a token twice, zero on padding
    variants = {
        "padded": (partial(run_padded, lay), [leaf(to_padded(t)) for t in (qs, ks, vs)], to_padded(gs)),
        "varlen": (partial(run_rows, lay), [leaf(to_rows(t)) for t in (qs, ks, vs)], _rows_grad(to_rows(gs), lay)),
        "shared": (partial(run_shared, lay), [leaf(t) for t in (qs, ks, vs)], gs),
    }
    results, outs = {}, {}
    for name, (fn, inputs, grad) in variants.items():
        outs[name] = fn(*inputs)
        outs[name].backward(grad)
        results[name] = timed(fn, inputs, grad, a.iters)
    print(f"timed: {', '.join(f'{k} {v[1]:.2f} ms' for k, v in results.items())}", flush=True)
    try:
        if not a.flex:
            raise RuntimeError("not asked for (--flex)")
        if not dev.type == "cuda":
            raise RuntimeError("flex attention is timed on CUDA only")
        t0 = time.perf_counter()
        block_mask = flex_mask(lay)
        torch.cuda.synchronize()
        mask_ms = (time.perf_counter() - t0) * 1e3
        inputs = [leaf(t) for t in (qs, ks, vs)]
        results["flex"] = timed(lambda *x: run_flex(lay, *x, block_mask), inputs, gs, a.iters)
        outs["flex"] = run_flex(lay, *inputs, block_mask)
        print(f"flex block mask built in {mask_ms:.1f} ms (first call includes compilation)")
    except Exception as e:  # flex attention is optional: report and go on
        print(f"flex: not run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")

    # same outputs on every stream token, read from each layout
    ref = outs["padded"].reshape(-1, hq, d)[lay.stream_in_padded].float()
    checks = {"varlen": outs["varlen"][lay.stream_in_rows].float(), "shared": outs["shared"].float()}
    if "flex" in outs:
        checks["flex"] = outs["flex"].float()
    print(f"shape {a.shape}: {a.pairs} pairs, stream {lay.stream_len} tokens, rows {rows} tokens, "
          f"padded {n_rows} x {lay.longest} = {n_rows * lay.longest} positions")
    print(f"{'variant':8} {'fwd ms':>8} {'fwd+bwd ms':>11} {'vs padded':>10} {'max |out - padded|':>19}")
    base = results["padded"][1]
    for name, (fwd, total) in results.items():
        diff = (checks[name] - ref).abs().max().item() if name in checks else 0.0
        print(f"{name:8} {fwd:8.2f} {total:11.2f} {base / total:9.2f}x {diff:19.2e}")
    # gradients: the shared variant's prompt key gradient is the sum of the two rows' prompt key gradients
    _, rows_inputs, _ = variants["varlen"]
    _, shared_inputs, _ = variants["shared"]
    prompt = _prompt_positions(lay, lengths)
    rows_k = rows_inputs[1].grad.float()
    summed = rows_k[lay.stream_in_rows].clone()
    summed[prompt] += rows_k[lay.rows_prompt_copy]
    gdiff = (shared_inputs[1].grad.float() - summed).abs().max().item()
    scale = summed.abs().max().item()
    print(f"key gradient, shared vs rows (prompt summed over both rows): max diff {gdiff:.2e} of max {scale:.2e}")
    ok = all((checks[n] - ref).abs().max().item() < tol for n in checks) and gdiff < tol * max(scale, 1.0)
    print("RESULT " + ("same outputs and gradients" if ok else "MISMATCH"))
    return 0 if ok else 1


def _prompt_positions(lay, lengths):
    idx, start = [], 0
    for p, c, r in lengths:
        idx += list(range(start, start + p))
        start += p + c + r
    return torch.tensor(idx, device=lay.doc.device)


def _rows_grad(g_rows, lay):
    """The rows layout's output gradient: the rejected rows' prompt copies get none (the stream's loss
    reads the prompt's output once, from the chosen row)."""
    g = g_rows.clone()
    g[lay.rows_prompt_copy] = 0
    return g


if __name__ == "__main__":
    sys.exit(main())
