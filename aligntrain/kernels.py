"""Triton kernels for the few passes where inductor's own code leaves memory bandwidth unused.

`logps_and_grad_`: SFT's LM head (modeling.head_logps_uniform_grad) needs, per row of bf16 logits [n, V],
log p(target) and its gradient onehot(target) - softmax. Inductor compiles compiling.logps_and_grad into
a reduction that reads a row three times (max, sum of exponentials, the gradient) and writes the gradient
to a new tensor. This kernel reads a row twice: once for a running max and sum of exponentials kept per
lane (online logsumexp), once to write the gradient, and it writes it over the logits themselves, which
the caller no longer needs: no second [n, V] buffer. On llama1b's 128,256-word vocabulary at 9,000
trained tokens a step, that is 7 GB of traffic instead of 12.

CUDA only, no softcap; everything else takes compiling.logps_and_grad (the tests compare the two).
"""

from __future__ import annotations

import warnings

import torch

ENABLED = True  # benchmarks turn it off to measure it

try:  # Triton ships with CUDA builds of torch; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 4096  # vocabulary entries per iteration of a row's program


def serves(device: torch.device, dtype: torch.dtype, softcap: float | None) -> bool:
    """Whether logps_and_grad_ takes logits of this device and dtype: CUDA, a 16-bit float, no softcap."""
    return (ENABLED and triton is not None and softcap is None and device.type == "cuda"
            and dtype in (torch.bfloat16, torch.float16))


def applies(logits: torch.Tensor, softcap: float | None) -> bool:
    """Whether logps_and_grad_ takes these logits: serves() them, and they are a contiguous non-empty 2D tensor."""
    return (serves(logits.device, logits.dtype, softcap) and logits.dim() == 2 and logits.is_contiguous()
            and logits.shape[0] > 0)


if triton is not None:
    @triton.jit
    def _logps_grad_kernel(logits_ptr, targets_ptr, logps_ptr, vocab, row_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        cols = tl.arange(0, BLOCK)
        neg_inf = float("-inf")
        running_max = tl.full([BLOCK], neg_inf, tl.float32)
        running_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):  # pass 1: per lane, the max so far and the sum of exp(x - max)
            idx = start + cols
            x = tl.load(base + idx, mask=idx < vocab, other=neg_inf).to(tl.float32)
            new_max = tl.maximum(running_max, x)
            unset = new_max == neg_inf  # a lane that has seen only masked entries
            running_sum = tl.where(unset, 0.0, running_sum * tl.exp(running_max - new_max) + tl.exp(x - new_max))
            running_max = new_max
        row_max = tl.max(running_max, axis=0)
        total = tl.sum(tl.where(running_max == neg_inf, 0.0, running_sum * tl.exp(running_max - row_max)), axis=0)
        lse = row_max + tl.log(total)
        target = tl.load(targets_ptr + row)
        picked = tl.load(base + target).to(tl.float32)
        tl.store(logps_ptr + row, picked - lse)  # read before pass 2 overwrites the row
        for start in range(0, vocab, BLOCK):  # pass 2: the gradient, over the logits
            idx = start + cols
            inside = idx < vocab
            x = tl.load(base + idx, mask=inside, other=0.0).to(tl.float32)
            grad = tl.where(idx == target, 1.0, 0.0) - tl.exp(x - lse)
            tl.store(base + idx, grad.to(logits_ptr.dtype.element_ty), mask=inside)


_built = False  # the kernel has run once in this process


def try_logps_and_grad_(logits: torch.Tensor, targets: torch.Tensor):
    """logps_and_grad_, or None where the kernel cannot be built here (its first call failed, e.g. Triton
    finds no C compiler for its launcher): the kernel is then off for the process, with a warning, as
    inductor's own failures leave a graph eager."""
    global ENABLED, _built
    if _built:
        return logps_and_grad_(logits, targets)
    try:
        out = logps_and_grad_(logits, targets)
    except Exception as e:  # noqa: BLE001 - anything Triton raises while building; nothing has run yet
        ENABLED = False
        warnings.warn(f"aligntrain: the head's Triton kernel is off ({type(e).__name__}: {str(e)[:200]}); "
                      "using the compiled log-softmax instead", RuntimeWarning, stacklevel=2)
        return None
    _built = True
    return out


def logps_and_grad_(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [n] float32, onehot(target) - softmax [n, V]) of logits [n, V] (applies() holds);
    the gradient is written over `logits`, which is returned as it."""
    n, vocab = logits.shape
    logps = torch.empty(n, dtype=torch.float32, device=logits.device)
    _logps_grad_kernel[(n,)](logits, targets.contiguous(), logps, vocab, logits.stride(0), BLOCK=BLOCK, num_warps=8)
    return logps, logits
