"""FlashAttention 4 (the `flash-attn-4` package, `flash_attn.cute`) as the padding-free attention's kernel.

packing.segment_attention runs aten's varlen flash kernels (FlashAttention 2) on CUDA. Where the optional
flash-attn-4 package is installed and the GPU is a Hopper or Blackwell one (compute capability 9 or 10),
`model.flash_attention: fa4` runs FA4's CuTe kernels instead, and so does null (the default) for models at
least FA4_FROM_WIDTH wide: their kernels are faster (on an H200, per layer of the bench's SFT batches,
forward and backward: 0.81 ms against FA2's 1.21 at Llama-1B's 32 heads), but each call costs about twice
FA2's host time, which a narrow model's short layers do not hide (Qwen-0.5B's SFT step ran 14% slower).
FA4 keeps the same varlen interface (cumulative offsets, causal aligned to the end of each key
segment, grouped key/value heads read in place), the same logsumexp layout ([heads, tokens] float32).

The kernels are wrapped as two custom operators (aligntrain::fa4_forward / fa4_backward) with fake
implementations, so a compiled decoder layer calls them as one opaque node each, as it calls aten's flash
kernels, and dynamo never traces into the package's Python. FA4 compiles each kernel variant on its first
call (seconds); later calls with other token counts reuse it.
"""

from __future__ import annotations

import functools

import torch

ENABLED = False  # set by enable() (the trainer, from model.flash_attention); read where the flash path is traced
FA4_FROM_WIDTH = 2048  # model.flash_attention: null picks FA4 for models this wide (query heads x head dim) or wider


@functools.cache
def unavailable(device_index: int = 0) -> str | None:
    """Why FA4 cannot run here (None: it can): the package, CUDA, and the GPU's compute capability."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, _ = torch.cuda.get_device_capability(device_index)
    if major not in (9, 10):
        return f"FA4 runs on compute capability 9.x or 10.x (Hopper, Blackwell); this GPU is {major}.x"
    try:
        from flash_attn.cute import interface
    except Exception as e:  # not installed, or its CUDA libraries fail to load
        return f"flash_attn.cute does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    missing = [name for name in ("_flash_attn_fwd", "_flash_attn_bwd") if not hasattr(interface, name)]
    if missing:  # another version's interface
        return f"flash_attn.cute.interface has no {' or '.join(missing)} (a flash-attn-4 this code does not know)"
    return None


def enable(on: bool, device: torch.device | None = None) -> str | None:
    """Turn FA4 on (where `unavailable` says it can run on `device`) or off; why it stays off, or None."""
    global ENABLED
    reason = unavailable(0 if device is None else device.index or 0) if on else None
    ENABLED = on and reason is None
    return reason


def attention_width(config) -> int:
    """Query heads x head dim of a transformers config (hidden_size where it names no head_dim)."""
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None)
    if heads and head_dim:
        return int(heads) * int(head_dim)
    return int(getattr(config, "hidden_size", 0) or 0)


def configure(choice: str | None, device: torch.device, padding_free: bool, width: int,
              graphs: bool = False) -> str | None:
    """Set FA4 on or off for this process's padding-free attention from model.flash_attention (`choice`:
    "fa2", "fa4" or None) for a model `width` wide (query heads x head dim); the run's note, if any. An
    explicit fa4 that cannot run is a ConfigError (null takes FA2 then, silently: the package is optional).
    `graphs`: the run replays CUDA graphs of the stack, where FA4 has not been run: null takes FA2 (the
    config refuses an explicit fa4 with them)."""
    from .config import ConfigError

    runs_here = device.type == "cuda" and padding_free
    if choice == "fa4" and not runs_here:
        raise ConfigError("model.flash_attention: fa4 runs the padding-free attention on CUDA, and this run has "
                          f"{'no CUDA device' if device.type != 'cuda' else 'padded batches'}; set it to null")
    if choice == "fa2" or not runs_here or (choice is None and graphs):
        enable(False)
        return None
    if choice is None and width < FA4_FROM_WIDTH:
        enable(False)
        if unavailable(device.index or 0) is None:
            return (f"flash_attention: aten's FlashAttention 2, not FA4: this model is {width} wide, under "
                    f"{FA4_FROM_WIDTH}, where FA4's host time per call outweighs its faster kernels "
                    "(model.flash_attention: fa4 takes it anyway)")
        return None
    reason = enable(True, device)
    if reason is not None:
        if choice == "fa4":
            raise ConfigError(f"model.flash_attention: fa4, but {reason}; install flash-attn-4 on a Hopper or "
                              "Blackwell GPU, or set it to null")
        return None
    return ("flash_attention: FlashAttention 4 (flash-attn-4) runs the padding-free attention (model.flash_attention: "
            "fa2 keeps aten's FlashAttention 2)")


def applies(q: torch.Tensor) -> bool:
    """FA4 serves this query tensor: enabled (on a GPU it runs on), CUDA, 16-bit, a head dim it supports.
    Only attributes of q are read, so tracing this in a compiled layer costs no guard on the package."""
    return ENABLED and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and 8 <= q.shape[-1] <= 128 \
        and q.shape[-1] % 8 == 0


@torch.library.custom_op("aligntrain::fa4_forward", mutates_args=())
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
            max_k: int, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal varlen attention, q [Tq, H, D], k/v [Tk, Hkv, D] -> (out [Tq, H, D], logsumexp [H, Tq] float32)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    try:
        out, lse = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                   max_seqlen_k=max_k, softmax_scale=scale, causal=True, return_lse=True)[:2]
    except Exception as e:
        raise _failed("forward", q, k, e) from e
    return out, lse


@forward.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("aligntrain::fa4_backward", mutates_args=())
def backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
             cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
             scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    try:
        dq, dk, dv = _flash_attn_bwd(q, k, v, out, grad, lse, softmax_scale=scale, causal=True, cu_seqlens_q=cu_q,
                                     cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)[:3]
    except Exception as e:
        raise _failed("backward", q, k, e) from e
    return dq, dk, dv


@backward.register_fake
def _(grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _failed(what: str, q: torch.Tensor, k: torch.Tensor, error: Exception) -> RuntimeError:
    """The error of a failed FA4 call: what it was given, and the setting that avoids it."""
    first = str(error).splitlines()[0] if str(error) else ""
    return RuntimeError(f"FlashAttention 4 (flash-attn-4) failed in its {what} on {q.shape[1]} query and {k.shape[1]} "
                        f"key/value heads of dim {q.shape[-1]}, {str(q.dtype).removeprefix('torch.')} "
                        f"({type(error).__name__}: {first}); model.flash_attention: fa2 runs aten's FlashAttention 2")
