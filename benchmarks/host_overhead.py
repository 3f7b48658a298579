"""What one GPU operation costs the host: the time to issue it, not to run it.

A training step of a small model (qwen0.5b at a few thousand tokens) makes about 1,400 launches, and when
each costs the host tens of microseconds the GPU waits for them. This issues N operations of the model's
real shapes back to back without waiting for the GPU (N well under the launch queue's depth, so the host
is never blocked by it) and prints the host's microseconds per operation, for each kind of operation and
for shapes that repeat or change from call to call (a padding-free stream's token count changes every step).

  python benchmarks/host_overhead.py                      # qwen0.5b's projection shapes, 6,000-9,000 tokens
  TORCH_BLAS_PREFER_CUBLASLT=1 python benchmarks/host_overhead.py
"""

from __future__ import annotations

import argparse
import time

import torch


def host_us(fn, calls: list, repeats: int = 3) -> float:
    """Best of `repeats`: microseconds of host time per call of fn over `calls` (argument tuples)."""
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for args in calls:
            fn(*args)
        best = min(best, (time.perf_counter() - started) / len(calls))
        torch.cuda.synchronize()
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--intermediate", type=int, default=4864)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=7680)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_overhead.py measures CUDA launches; no GPU here")
    dev, dt = "cuda", torch.bfloat16
    h, i, n = a.hidden, a.intermediate, a.calls
    w_up = torch.randn(i, h, device=dev, dtype=dt)
    bias = torch.randn(i, device=dev, dtype=dt)
    same = [torch.randn(a.tokens, h, device=dev, dtype=dt)] * n
    changing = [torch.randn(a.tokens - 1500 + 7 * k, h, device=dev, dtype=dt) for k in range(n)]
    bucketed = [x[: (x.shape[0] // 256) * 256] for x in changing]
    small = torch.randn(a.tokens, h, device=dev, dtype=dt)
    compiled_add = torch.compile(lambda x: (x * 2 + 1).to(torch.float32), dynamic=True)
    compiled_add(small)
    compiled_add(changing[0])
    rows = [
        ("mm, the same shape every call", lambda x: torch.mm(x, w_up.t()), [(x,) for x in same]),
        ("mm, a new token count every call", lambda x: torch.mm(x, w_up.t()), [(x,) for x in changing]),
        ("mm, token counts rounded down to 256", lambda x: torch.mm(x, w_up.t()), [(x,) for x in bucketed]),
        ("addmm (bias), the same shape", lambda x: torch.addmm(bias, x, w_up.t()), [(x,) for x in same]),
        ("addmm (bias), a new token count", lambda x: torch.addmm(bias, x, w_up.t()), [(x,) for x in changing]),
        ("mm backward shape (dW = g^T x), same", lambda x: torch.mm(x.t(), x), [(x,) for x in same[: n // 4]]),
        ("elementwise add (aten)", lambda x: x.add(1), [(small,)] * n),
        ("compiled elementwise (Triton, dynamic shape)", compiled_add, [(x,) for x in changing]),
        ("empty tensor allocation", lambda x: torch.empty_like(x), [(small,)] * n),
    ]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, blas "
          f"{torch.backends.cuda.preferred_blas_library()}, {n} calls each, shapes [T, {h}] x [{h}, {i}]\n")
    print("| operation | host us per call |")
    print("|---|---:|")
    for name, fn, calls in rows:
        print(f"| {name} | {host_us(fn, calls):.1f} |")


if __name__ == "__main__":
    main()
