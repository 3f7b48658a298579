"""Float32 master weights with 16-bit working copies (`working_weights`).

Mixed precision as autocast does it keeps every weight in float32 and casts it on every use. In a step of
a compiled decoder layer that is, for each linear layer: the weight cast to bf16 in the forward (read 4
bytes a parameter, write 2; again in the backward where inductor recomputes the cast rather than keep it),
the bf16 weight gradient cast up to float32 and added to `.grad` (read 2, write 4), the clip's norm reading
those float32 gradients and its rescaling reading and writing them once more, and then Adam(W).

Here the linear layers of the decoder layers (nn.Linear, their weights and biases: nearly all of a model's
parameters) also hold a working copy in the compute dtype, the float32 parameter rounded once, as
autocast's cast would round it. Their forward multiplies by the copy (WorkingLinear), so their gradients
land on it in bf16: the very values autocast's matrix multiply produced before casting them up. One Triton
kernel a bucket of tensors (kernels.master_adam_) then scales each gradient by the clip coefficient,
applies Adam(W) to the float32 master and moments as torch's fused kernel does, and writes the working copy
anew. Weights, gradient values and the update are those of autocast's recipe; the casts, the float32
gradient traffic and the clip's rescaling pass are gone. Several micro-batches a step add their gradients
into float32 sums (fold), as `.grad` accumulated before.

The masters stay the model's parameters (the working copies are non-persistent buffers): state_dict,
checkpoints, export and resume see float32 weights, and the optimizer's state has torch Adam(W)'s layout
(a checkpoint of either resumes in the other). The other parameters (norms, embeddings, the head) keep
their float32 gradients and are updated by the same kernel.

On CPU the same update runs as torch operations (`_reference_update`): the tests compare the two on CUDA,
and the reference with torch.optim.AdamW everywhere.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


class WorkingLinear(nn.Linear):
    """An nn.Linear that multiplies by `working_weight` and `working_bias`: copies of its float32 parameters
    in the compute dtype (non-persistent buffers), written by MasterAdam's update."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.working_weight, self.working_bias)


def attach_working_copies(layers: Iterable[nn.Module], dtype: torch.dtype) -> dict[nn.Parameter, torch.Tensor]:
    """Give every nn.Linear inside `layers` working copies of its weight and bias in `dtype` (the module becomes
    a WorkingLinear); {float32 parameter: its working copy} for the parameters that train."""
    working: dict[nn.Parameter, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}  # one copy a parameter, also where modules share it
    for layer in layers:
        for module in layer.modules():
            if type(module) is not nn.Linear:
                continue
            for name in ("weight", "bias"):
                param = getattr(module, name)
                copy = None
                if param is not None:
                    copy = copies.get(id(param))
                    if copy is None:
                        copy = copies[id(param)] = param.detach().to(dtype).requires_grad_(param.requires_grad)
                    if param.requires_grad:
                        working[param] = copy
                module.register_buffer(f"working_{name}", copy, persistent=False)
            module.__class__ = WorkingLinear
    return working


class MasterAdam(torch.optim.Optimizer):
    """Adam (`decoupled=False`) or AdamW over float32 parameters, some of which have working copies whose
    gradients stand for theirs (module docstring). The trainer calls fold() after each micro-batch of a
    step with several, clip_grad_norm_() before step(), and sets `found_inf` (a device scalar) to skip an
    update on the GPU, as for torch's fused Adam(W)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, decoupled: bool = True,
                 working: dict[nn.Parameter, torch.Tensor] | None = None):
        # torch Adam(W)'s group keys, so that either optimizer resumes from the other's state
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=False,
                        foreach=None, capturable=False, differentiable=False, fused=None,
                        decoupled_weight_decay=decoupled)
        super().__init__(params, defaults)
        self.working = working or {}
        self.sums: dict[nn.Parameter, torch.Tensor] = {}  # float32 gradient sums of a step's earlier micro-batches
        self.found_inf: torch.Tensor | None = None
        self.clip_coef: torch.Tensor | None = None  # set by clip_grad_norm_, used by the next step()
        self._tables: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._pair_cache: list[list[tuple[nn.Parameter, torch.Tensor | None]]] | None = None
        self._shared_step: torch.Tensor | None = None

    # -- gradients ---------------------------------------------------------------------------------
    def gradient(self, param: nn.Parameter) -> torch.Tensor | None:
        """The gradient standing for `param`'s: the float32 sum of folded micro-batches, else its working
        copy's gradient, else its own."""
        return _standing_gradient(param, self.working.get(param), self.sums)

    @torch.no_grad()
    def fold(self) -> None:
        """Add the working copies' gradients into float32 sums and free them (a step of several micro-batches:
        the sum stays float32, as `.grad` accumulation was)."""
        for param, copy in self.working.items():
            if copy.grad is None:
                continue
            total = self.sums.get(param)
            if total is None:
                self.sums[param] = copy.grad.float()
            else:
                total.add_(copy.grad)
            copy.grad = None

    def _params(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def _gradients(self) -> list[list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor]]]:
        """Per parameter group, (master, working copy or None, gradient) of the parameters that have one:
        gradient() for all, without a dictionary lookup a parameter (the host's time counts in a step)."""
        if self._pair_cache is None or len(self._pair_cache) != len(self.param_groups):
            self._pair_cache = [[(p, self.working.get(p)) for p in g["params"]] for g in self.param_groups]
        out = []
        for pairs in self._pair_cache:
            found = []
            for param, copy in pairs:
                grad = _standing_gradient(param, copy, self.sums)
                if grad is not None:
                    found.append((param, copy, grad))
            out.append(found)
        return out

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The total 2-norm of the gradients, computed in float32 (a device scalar), as
        torch.nn.utils.clip_grad_norm_ computes it; the next step() scales the gradients by
        min(1, max_norm / (norm + 1e-6)) as it reads them, instead of a pass rescaling them now."""
        if self.sums:
            self.fold()
        entries = [entry for group in self._gradients() for entry in group]
        grads = [grad for _, _, grad in entries]
        if not grads:
            self.clip_coef = None
            return torch.zeros(())
        total = self._kernel_norm(entries) if grads[0].is_cuda else None
        if total is None:
            by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
            for g in grads:
                by_device[g.device].append(g)
            first = grads[0].device
            norms = [n.to(first) for gs in by_device.values()
                     for n in torch._foreach_norm(gs, 2.0, dtype=torch.float32)]
            total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        self.clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0) if math.isfinite(max_norm) else None
        return total

    def _kernel_norm(self, entries) -> torch.Tensor | None:
        """The gradients' 2-norm by kernels.sum_squares, a launch per gradient dtype (torch's per-tensor norms
        of bf16 gradients in float32 take a launch per tensor); None where the kernel does not serve."""
        buckets: dict[torch.dtype, list[tuple]] = defaultdict(list)
        for entry in entries:
            buckets[entry[2].dtype].append(entry)

        def launch() -> torch.Tensor:
            squares = []
            for dtype, bucket in buckets.items():
                members, grads, addresses = self._gradient_addresses(bucket)
                squares.append(kernels.sum_squares(addresses, *self._programs(members, addresses.device), dtype))
                del grads  # kept alive (a contiguous copy included) until the launch that reads them is queued
            return torch.sqrt(torch.stack(squares).sum())

        return self._try_kernel(launch)

    _kernel = True  # this optimizer's Triton kernels have not failed to build

    def _try_kernel(self, launch):
        """launch()'s result, or None where the Triton kernels are off or cannot be built here (the first
        failure turns them off for the rest of the run, with a warning; nothing has run then)."""
        if not (self._kernel and kernels.triton is not None):
            return None
        try:
            return launch()
        except Exception as e:  # noqa: BLE001 - anything Triton raises while building: nothing has run yet
            self._disable_kernel(e)
            return None

    def _disable_kernel(self, e: BaseException) -> None:
        self._kernel = False
        warnings.warn(f"aligntrain: the optimizer's Triton kernels are off ({type(e).__name__}: {str(e)[:200]}); "
                      "using torch's operators instead", RuntimeWarning, stacklevel=4)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.sums.clear()
        for copy in self.working.values():
            if copy.grad is None:
                continue
            if set_to_none:
                copy.grad = None
            else:
                copy.grad.zero_()

    def state_dict(self) -> dict:
        """torch's layout, each parameter's step count its own tensor (torch's fused Adam(W), resuming from it,
        adds 1 to every tensor of its list: a shared one would count once per parameter)."""
        packed = super().state_dict()
        packed["state"] = {k: {**v, "step": v["step"].clone()} if "step" in v else dict(v)
                           for k, v in packed["state"].items()}
        return packed

    # -- the update --------------------------------------------------------------------------------
    @torch.no_grad()
    def sync_working_copies(self) -> None:
        """Write every working copy from its master (after the masters were loaded from a checkpoint)."""
        for param, copy in self.working.items():
            copy.copy_(param)

    def _step_tensor(self, device: torch.device) -> torch.Tensor:
        """The step count every parameter's state shares (a float32 device scalar, as torch's fused Adam keeps
        one per parameter): loaded state holds one copy per parameter, all equal; one is kept for all."""
        if self._shared_step is not None and self._shared_step.device == device:
            return self._shared_step
        shared = None
        for param in self._params():
            state = self.state.get(param)
            if state and "step" in state:
                shared = state["step"]
                break
        if shared is None or shared.device != device or shared.dtype != torch.float32:
            shared = (torch.zeros((), dtype=torch.float32, device=device) if shared is None
                      else shared.to(device=device, dtype=torch.float32))
        for param in self._params():
            state = self.state[param]
            if "step" not in state or state["step"] is not shared:
                state["step"] = shared
        self._shared_step = shared
        return shared

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterAdam takes no closure")
        if self.sums:
            self.fold()
        params = self._params()
        if not params:
            return None
        device = params[0].device
        step = self._step_tensor(device)
        found = (self.found_inf.to(device=device, dtype=torch.float32).reshape(())
                 if self.found_inf is not None else torch.zeros((), device=device))
        coef = self.clip_coef.to(device).reshape(()) if self.clip_coef is not None else torch.ones((), device=device)
        counted = step + (1.0 - found)  # a skipped update leaves the count as it is
        t = torch.where(found > 0, torch.ones_like(counted), counted)  # any finite count: nothing is written
        for group, entries in zip(self.param_groups, self._gradients()):
            beta1, beta2 = group["betas"]
            scalars = torch.stack([coef, 1.0 / (1.0 - beta1 ** t), torch.sqrt(1.0 - beta2 ** t), found]).float()
            buckets: dict[tuple, list[tuple]] = defaultdict(list)
            for entry in entries:
                param, copy, grad = entry
                state = self.state[param]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                buckets[(grad.dtype, None if copy is None else copy.dtype)].append(entry)
            for (grad_dtype, working_dtype), bucket in buckets.items():
                if device.type == "cuda" and self._kernel_serves(group, bucket, scalars, grad_dtype, working_dtype):
                    continue
                for param, copy, grad in bucket:
                    _reference_update(param, grad, self.state[param], copy, scalars, group)
        step.copy_(counted)
        self.clip_coef = None
        return None

    def _kernel_serves(self, group, bucket, scalars, grad_dtype, working_dtype) -> bool:
        """Update `bucket` with the Triton kernel (_launch); False (nothing written) where it cannot be built
        here: then the torch operations serve, for the rest of the run."""
        return self._try_kernel(lambda: self._launch(group, bucket, scalars, grad_dtype, working_dtype)) is not None

    def _launch(self, group: dict, bucket: list[tuple], scalars: torch.Tensor, grad_dtype: torch.dtype,
                working_dtype: torch.dtype | None) -> bool:
        """One kernels.master_adam_ launch over `bucket`: (master, working copy or None, gradient) tuples;
        True once launched."""
        members, grads, addresses = self._gradient_addresses(bucket)  # grads: alive until the launch is queued
        kernels.master_adam_(self._addresses(members, addresses.device), addresses,
                             *self._programs(members, addresses.device), scalars, lr=group["lr"],
                             beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                             weight_decay=group["weight_decay"], grad_dtype=grad_dtype, working_dtype=working_dtype,
                             decoupled=group["decoupled_weight_decay"])
        return True

    @staticmethod
    def _gradient_addresses(bucket: list[tuple]) -> tuple[list[nn.Parameter], list[torch.Tensor], torch.Tensor]:
        """(the masters of `bucket`, their gradients made contiguous, those gradients' addresses [k] int64 on the
        device, sent from pinned memory without waiting): what a launch reads each step. The caller keeps the
        gradients until the launch is queued (a contiguous copy freed before could be reused under it)."""
        members = [param for param, _, _ in bucket]
        grads = [grad.contiguous() for _, _, grad in bucket]
        addresses = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64, pin_memory=True)
        return members, grads, addresses.to(grads[0].device, non_blocking=True)

    def _addresses(self, members: list[nn.Parameter], device: torch.device) -> torch.Tensor:
        """[k, 4] int64 on the device: each member's master, moments and working copy (0: none). Built once;
        load_state_dict, which replaces the moments, drops it."""
        key = ("addresses",) + tuple(id(p) for p in members)
        if key not in self._tables:
            rows = []
            for param in members:
                state, copy = self.state[param], self.working.get(param)
                rows.append([param.data_ptr(), state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(),
                             copy.data_ptr() if copy is not None else 0])
            self._tables[key] = (torch.tensor(rows, dtype=torch.int64).to(device),)
        return self._tables[key][0]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._tables.clear()  # the moments are new tensors
        self._shared_step = None

    def _programs(self, members: list[nn.Parameter], device: torch.device) -> tuple[torch.Tensor, ...]:
        """(sizes [k], the tensor of each program, the first element of each program) for a bucket: the same
        every step, built once."""
        key = tuple(id(p) for p in members)
        if key not in self._tables:
            chunk = kernels.ADAM_CHUNK
            sizes = [p.numel() for p in members]
            counts = [-(-n // chunk) for n in sizes]
            prog_tensor = torch.repeat_interleave(torch.arange(len(members), dtype=torch.int32),
                                                  torch.tensor(counts))
            firsts = torch.cat([torch.arange(c, dtype=torch.int64) * chunk for c in counts])
            self._tables[key] = (torch.tensor(sizes, dtype=torch.int64).to(device), prog_tensor.to(device),
                                 firsts.to(device))
        return self._tables[key]


def _standing_gradient(param: nn.Parameter, copy: torch.Tensor | None,
                       sums: dict[nn.Parameter, torch.Tensor]) -> torch.Tensor | None:
    """The gradient that stands for `param`'s: the float32 sum of folded micro-batches, else its working
    copy's gradient, else its own."""
    total = sums.get(param) if sums else None
    if total is not None:
        return total
    return copy.grad if copy is not None else param.grad


def _reference_update(param: torch.Tensor, grad: torch.Tensor, state: dict, copy: torch.Tensor | None,
                      scalars: torch.Tensor, group: dict) -> None:
    """kernels.master_adam_'s update of one tensor in torch operations (CPU runs, and the tests' reference)."""
    coef, inv_bias1, bias2_sqrt, found = scalars.unbind()
    decoupled = group["decoupled_weight_decay"]
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    g = grad.float() * coef
    p = param.detach()
    new_p = p * (1.0 - lr * wd) if decoupled else p
    if not decoupled:
        g = g + wd * p
    m = beta1 * state["exp_avg"] + (1.0 - beta1) * g
    v = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * g * g
    new_p = new_p - (lr * inv_bias1) * m / (torch.sqrt(v) / bias2_sqrt + eps)
    keep = found > 0
    param.copy_(torch.where(keep, p, new_p))
    state["exp_avg"].copy_(torch.where(keep, state["exp_avg"], m))
    state["exp_avg_sq"].copy_(torch.where(keep, state["exp_avg_sq"], v))
    if copy is not None:
        copy.copy_(param)
