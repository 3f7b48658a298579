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

import functools
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


# -- SwiGLU --------------------------------------------------------------------------------------------
#
# The MLP of Llama-like models computes silu(gate) * up, gate and up being the two halves of one matrix
# multiply's output once compiling.fuse_sibling_linears has joined their linears ([..., 2I]). Inductor
# compiles the backward of that product into one pointwise kernel over the concatenated gradient
# [..., 2I] that loads grad, gate and up for every output element: about 2.2 TB/s on an H200, where the
# forward's kernel runs at 4.7. `swiglu` (aligntrain::swiglu) is an operator whose backward
# (aligntrain::swiglu_backward) reads each of grad, gate and up once and writes both halves of the
# gradient; compiling.fuse_swiglu puts it into the compiled graph where this kernel serves. Both compute
# in float32 and round once, as inductor's fused kernels do.

SWIGLU_ENABLED = True  # benchmarks turn it off to measure it
SWIGLU_BLOCK = 1024  # columns of one row per program


def swiglu_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the SwiGLU kernels take gate/up outputs of this device and dtype: CUDA, a 16-bit float."""
    return (SWIGLU_ENABLED and triton is not None and device.type == "cuda"
            and dtype in (torch.bfloat16, torch.float16))


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [..., 2I] (gate the first half) -> [..., I], in float32 (float64 stays),
    rounded once."""
    gate, up = gate_up.to(_wide(gate_up.dtype)).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


def swiglu_backward_reference(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The gradient of swiglu with respect to gate_up [..., 2I], given grad [..., I]: d gate (first half)
    = grad * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate); d up = grad * silu(gate)."""
    gate, up = gate_up.to(_wide(gate_up.dtype)).chunk(2, dim=-1)
    grad = grad.to(gate.dtype)
    sig = torch.sigmoid(gate)
    return torch.cat([grad * up * sig * (1.0 + gate * (1.0 - sig)), grad * gate * sig], dim=-1).to(gate_up.dtype)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


if triton is not None:
    @triton.jit
    def _swiglu_kernel(gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        src = gate_up_ptr + row * 2 * width + cols
        gate = tl.load(src, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(src + width, mask=inside, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * width + cols, out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _swiglu_backward_kernel(grad_ptr, gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        grad = tl.load(grad_ptr + row * width + cols, mask=inside, other=0.0).to(tl.float32)
        src = gate_up_ptr + row * 2 * width + cols
        gate = tl.load(src, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(src + width, mask=inside, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        d_gate = grad * up * sig * (1.0 + gate * (1.0 - sig))
        d_up = grad * gate * sig
        dst = out_ptr + row * 2 * width + cols
        tl.store(dst, d_gate.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(dst + width, d_up.to(out_ptr.dtype.element_ty), mask=inside)


def _swiglu_triton(gate_up: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    """The forward (grad None) or the backward of swiglu by the Triton kernels; gate_up is contiguous. Run
    through torch.library.wrap_triton, so that inductor, tracing the operator, launches the kernels from its
    own generated code (no Python operator call a layer and step) and, run eagerly, it launches them."""
    from torch.library import wrap_triton

    width = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * width)
    grid = (rows, triton.cdiv(width, SWIGLU_BLOCK))
    if grad is None:
        out = gate_up.new_empty(*gate_up.shape[:-1], width)
        wrap_triton(_swiglu_kernel)[grid](gate_up, out, width, BLOCK=SWIGLU_BLOCK, num_warps=4)
        return out
    out = torch.empty_like(gate_up)
    wrap_triton(_swiglu_backward_kernel)[grid](grad.contiguous(), gate_up, out, width, BLOCK=SWIGLU_BLOCK, num_warps=4)
    return out


def _swiglu_dispatch(gate_up: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernels where they serve (a failure to build them turns them off for the process, with a
    warning), else the reference."""
    global SWIGLU_ENABLED
    if swiglu_serves(gate_up.device, gate_up.dtype) and gate_up.is_contiguous() and gate_up.shape[-1] % 2 == 0 \
            and gate_up.numel() > 0 and (grad is None or grad.dtype == gate_up.dtype):
        try:
            return _swiglu_triton(gate_up, grad)
        except Exception as e:  # noqa: BLE001 - anything Triton raises while building; nothing has run yet
            SWIGLU_ENABLED = False
            warnings.warn(f"aligntrain: the SwiGLU Triton kernels are off ({type(e).__name__}: {str(e)[:200]}); "
                          "computing it with torch's operators instead", RuntimeWarning, stacklevel=2)
    return swiglu_reference(gate_up) if grad is None else swiglu_backward_reference(grad, gate_up)


# With Triton, triton_op: inductor traces the operator's body, Triton launches included; without, an opaque
# operator (torch derives no fake tensors from it: they are registered).
_define = functools.partial(torch.library.triton_op if triton is not None else torch.library.custom_op,
                            mutates_args=())


@_define("aligntrain::swiglu")
def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [..., 2I] (gate the first half) -> [..., I]."""
    return _swiglu_dispatch(gate_up)


@_define("aligntrain::swiglu_backward")
def swiglu_backward(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The gradient of swiglu with respect to gate_up [..., 2I], given the output's gradient grad [..., I]."""
    return _swiglu_dispatch(gate_up, grad)


if triton is None:
    swiglu.register_fake(lambda gate_up: gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2))
    swiglu_backward.register_fake(lambda grad, gate_up: torch.empty_like(gate_up))


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_grad(ctx, grad):
    (gate_up,) = ctx.saved_tensors
    return swiglu_backward(grad, gate_up)


swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


# -- Adam(W) over float32 masters with 16-bit working copies --------------------------------------------
#
# masters.MasterAdam's update: every tensor of a bucket (one parameter group, one gradient dtype, with or
# without working copies) in one launch. A table holds each tensor's addresses (master, the two moments,
# working copy: the same every step) and another its gradient's; every program takes ADAM_CHUNK elements of
# one tensor, which the per-program tables name. Per element: the gradient times the clip coefficient, Adam(W) in float32 as torch's fused kernel
# computes it, the master and moments written, and the working copy written rounded once from the new
# master. A nonzero found_inf (scalars[3]) leaves everything as it was.

ADAM_CHUNK = 4096  # elements of one tensor per program
ADAM_BLOCK = 1024  # of which one iteration handles this many

if triton is not None:
    @triton.jit
    def _master_adam_kernel(table_ptr, grads_ptr, sizes_ptr, prog_tensor_ptr, prog_start_ptr, scalars_ptr, lr, beta1,
                            beta2, eps, weight_decay, GRAD_TYPE: tl.constexpr, WORKING_TYPE: tl.constexpr,
                            DECOUPLED: tl.constexpr, WORKING: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        i = tl.load(prog_tensor_ptr + pid).to(tl.int64)
        start = tl.load(prog_start_ptr + pid)
        n = tl.load(sizes_ptr + i)
        row = table_ptr + i * 4
        master_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
        grad_ptr = tl.load(grads_ptr + i).to(tl.pointer_type(GRAD_TYPE))
        exp_avg_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        exp_avg_sq_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        coef = tl.load(scalars_ptr)
        inv_bias1 = tl.load(scalars_ptr + 1)
        bias2_sqrt = tl.load(scalars_ptr + 2)
        limit = tl.where(tl.load(scalars_ptr + 3) == 0.0, n, 0)  # found_inf: no element is written
        for off in range(0, CHUNK, BLOCK):
            offs = start + off + tl.arange(0, BLOCK)
            inside = offs < limit
            p = tl.load(master_ptr + offs, mask=inside, other=0.0)
            g = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(tl.float32) * coef
            m = tl.load(exp_avg_ptr + offs, mask=inside, other=0.0)
            v = tl.load(exp_avg_sq_ptr + offs, mask=inside, other=0.0)
            if DECOUPLED:
                p = p * (1.0 - lr * weight_decay)
            else:
                g = g + weight_decay * p
            m = beta1 * m + (1.0 - beta1) * g
            v = beta2 * v + (1.0 - beta2) * g * g
            p = p - (lr * inv_bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
            tl.store(master_ptr + offs, p, mask=inside)
            tl.store(exp_avg_ptr + offs, m, mask=inside)
            tl.store(exp_avg_sq_ptr + offs, v, mask=inside)
            if WORKING:
                working_ptr = tl.load(row + 3).to(tl.pointer_type(WORKING_TYPE))
                tl.store(working_ptr + offs, p.to(WORKING_TYPE), mask=inside)


def _triton_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def master_adam_(table: torch.Tensor, grads: torch.Tensor, sizes: torch.Tensor, prog_tensor: torch.Tensor,
                 prog_start: torch.Tensor, scalars: torch.Tensor, *, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, grad_dtype: torch.dtype, working_dtype: torch.dtype | None,
                 decoupled: bool) -> None:
    """One launch of the update over a bucket (masters.MasterAdam builds the tables: table [k, 4] int64
    addresses of master, moments and working copy, grads [k] the gradients' addresses, sizes [k],
    prog_tensor / prog_start [programs]; scalars [4] float32: clip coefficient, 1 / (1 - beta1^t),
    sqrt(1 - beta2^t), found_inf)."""
    _master_adam_kernel[(prog_tensor.numel(),)](
        table, grads, sizes, prog_tensor, prog_start, scalars, float(lr), float(beta1), float(beta2), float(eps),
        float(weight_decay), GRAD_TYPE=_triton_dtype(grad_dtype),
        WORKING_TYPE=_triton_dtype(working_dtype or torch.float32), DECOUPLED=decoupled,
        WORKING=working_dtype is not None, CHUNK=ADAM_CHUNK, BLOCK=ADAM_BLOCK, num_warps=4)


if triton is not None:
    @triton.jit
    def _sum_squares_kernel(grads_ptr, sizes_ptr, prog_tensor_ptr, prog_start_ptr, out_ptr, GRAD_TYPE: tl.constexpr,
                            CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        i = tl.load(prog_tensor_ptr + pid).to(tl.int64)
        start = tl.load(prog_start_ptr + pid)
        n = tl.load(sizes_ptr + i)
        grad_ptr = tl.load(grads_ptr + i).to(tl.pointer_type(GRAD_TYPE))
        acc = tl.zeros([BLOCK], tl.float32)
        for off in range(0, CHUNK, BLOCK):
            offs = start + off + tl.arange(0, BLOCK)
            g = tl.load(grad_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
            acc += g * g
        tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def sum_squares(grads: torch.Tensor, sizes: torch.Tensor, prog_tensor: torch.Tensor, prog_start: torch.Tensor,
                grad_dtype: torch.dtype) -> torch.Tensor:
    """The sum of squares, in float32, of a bucket of gradients of one dtype (grads [k] int64 addresses; the
    program tables of master_adam_): one launch, a partial sum a program, added up in a fixed order."""
    partials = torch.empty(prog_tensor.numel(), dtype=torch.float32, device=prog_tensor.device)
    _sum_squares_kernel[(prog_tensor.numel(),)](grads, sizes, prog_tensor, prog_start, partials,
                                                GRAD_TYPE=_triton_dtype(grad_dtype), CHUNK=ADAM_CHUNK,
                                                BLOCK=ADAM_BLOCK, num_warps=4)
    return partials.sum()
