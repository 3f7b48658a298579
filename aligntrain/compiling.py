"""torch.compile where it pays: each decoder layer on its own, and the log-softmax of the LM head.

Between the matrix multiplies of a decoder layer sit a dozen elementwise passes (RMSNorm in float32, the
float32 residual stream of mixed precision, rotary embeddings, SiLU times the up projection) and each is a
kernel launch and a round trip through memory, forward and backward. Compiling each layer fuses them.
The layers are compiled one by one (`layer.compile()`, regional compilation): every layer runs the same
code, so one graph serves them all, and it compiles in seconds rather than the minutes of a whole model.

Shapes are dynamic from the first call (the token count of a padding-free stream changes every step).
The packed attention traces into the layer's graph (packing.segment_attention: on CUDA aten's flash kernels,
elsewhere one custom operator), so a layer is one graph with no break; the segment layout reaches it as
runtime tensors and a per-run bound, never as a compile-time constant that changes every batch.

Linear layers that read the same input (attention's q, k and v projections; the MLP's gate and up) become
one matrix multiply over their weights concatenated, its output split (FuseSiblingLinears, a pre-grad pass
of inductor): in a step of a small model the host's cost per launch, not the GPU, sets the pace, and this
takes 3 of 7 projections forward and more backward (one weight gradient, one input gradient instead of a
sum of several). The weights stay the model's own parameters; only the compiled graph changes.
In the same pass, the MLP's silu(gate) * up over the joined gate/up output becomes aligntrain::swiglu
(fuse_swiglu) where its Triton kernels serve (CUDA, 16-bit): inductor's backward of that product reads
its inputs about twice over; the kernel's reads each once.

The head's log-softmax (`logps_from_logits`) compiles into one reduction over the vocabulary that reads
the bf16 logits once, instead of a float32 copy of them and a logsumexp over it.

`compile: null` (the default) compiles on one GPU for full-weight training; `true` also under LoRA and on the
CPU (inductor needs a C++ compiler there); `false` never. A graph that fails to compile runs eagerly, with
torch's warning: compiling is an optimisation, and a model it cannot handle still trains.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import nn

from . import kernels

BACKEND = "inductor"  # the tests swap in "aot_eager" (the same graphs, no code generation)
RECOMPILE_LIMIT = 32  # graphs per code object: grad and no-grad, float32 policy and bf16 reference, ...
FUSE_LINEARS = True  # FuseSiblingLinears in inductor's graphs (benchmarks turn it off to measure it)
FUSE_SWIGLU = True  # and in that pass, fuse_swiglu (the same)


def compile_wanted(cfg, device: torch.device, fsdp: bool = False) -> bool:
    """Whether this run compiles (cfg.compile: null -> CUDA without LoRA or FSDP)."""
    if cfg.compile is None:
        return device.type == "cuda" and cfg.model.lora is None and not fsdp
    return bool(cfg.compile)


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM: modules of the classes it names in _no_split_modules
    (the unit transformers itself never splits across devices)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def compile_layers(lm: nn.Module) -> int:
    """Compile every decoder layer of `lm` in place; the number compiled (0: the model names none)."""
    _configure()
    layers = decoder_layers(lm)
    for layer in layers:
        layer.compile(backend=BACKEND, dynamic=True)
    return len(layers)


def logps_from_logits(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """log p(target) per row of logits [n, V] (model dtype): the target's logit minus the float32 logsumexp."""
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    picked = logits.gather(-1, targets[:, None]).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


_compiled_logps = None


def compiled_logps_from_logits():
    """logps_from_logits compiled once per process, dynamic in the number of rows (one graph for every
    chunk size from 2 up: a 1-row chunk would be a second graph, see modeling.chunk_bounds)."""
    global _compiled_logps
    if _compiled_logps is None:
        _configure()
        _compiled_logps = torch.compile(logps_from_logits, backend=BACKEND, dynamic=True)
    return _compiled_logps


def logps_and_grad(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None = None):
    """(log p(target) [n] float32, its gradient with respect to the logits [n, V] in their dtype) per row of
    logits [n, V]: the log-probs exactly as logps_from_logits, and onehot(target) - softmax, times the
    softcap's derivative 1 - tanh^2 where the head caps its logits."""
    capped = softcap * torch.tanh(logits / softcap) if softcap else logits
    z = capped.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    hit = torch.arange(z.shape[-1], device=z.device) == targets[:, None]
    grad = hit.float() - torch.exp(z - lse)
    if softcap:
        grad = grad * (1.0 - (z / softcap) ** 2)
    picked = capped.gather(-1, targets[:, None]).squeeze(-1).float()
    return picked - lse.squeeze(-1), grad.to(logits.dtype)


_compiled_logps_and_grad = None


def compiled_logps_and_grad():
    """logps_and_grad compiled once per process, dynamic in the number of rows: a reduction and a pointwise
    pass over the bf16 logits, no float32 copy of them in memory. On CUDA without a softcap, the Triton
    kernel of kernels.py instead (two reads of the logits, the gradient written over them: the caller must
    pass logits it no longer needs)."""
    global _compiled_logps_and_grad
    if _compiled_logps_and_grad is None:
        _configure()
        _compiled_logps_and_grad = torch.compile(logps_and_grad, backend=BACKEND, dynamic=True)
    return _fastest_logps_and_grad


def _fastest_logps_and_grad(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None = None):
    if kernels.applies(logits, softcap):
        out = kernels.try_logps_and_grad_(logits, targets)
        if out is not None:
            return out
    return _compiled_logps_and_grad(logits, targets, softcap)


_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


def fuse_sibling_linears(graph: torch.fx.Graph) -> int:
    """In a dynamo graph, every set of linear(x, w_i, b_i) calls on one input x (all with a bias or all
    without) becomes linear(x, cat(w_i), cat(b_i)) split back into the outputs; the number of calls removed.
    A call whose weight is not yet defined where the group's first call stands is left alone."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups: dict[tuple, list[torch.fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _LINEAR or node.kwargs or not 2 <= len(node.args) <= 3:
            continue
        weight = node.args[1]
        bias = node.args[2] if len(node.args) == 3 else None
        value = weight.meta.get("example_value") if isinstance(weight, torch.fx.Node) else None
        if value is None or value.dim() != 2 or not isinstance(value.shape[0], int):
            continue
        groups[(node.args[0], bias is None)].append(node)
    removed = 0
    for (x, no_bias), nodes in groups.items():
        first = nodes[0]
        operands = [a for n in nodes for a in n.args[1:] if isinstance(a, torch.fx.Node)]
        if len(nodes) < 2 or any(order[a] > order[first] for a in operands):
            continue
        widths = [n.args[1].meta["example_value"].shape[0] for n in nodes]
        with graph.inserting_before(first):
            weight = graph.call_function(torch.cat, ([n.args[1] for n in nodes],), {"dim": 0})
            bias = None if no_bias else graph.call_function(torch.cat, ([n.args[2] for n in nodes],), {"dim": 0})
            fused = graph.call_function(torch._C._nn.linear, (x, weight, bias))
            parts = graph.call_function(torch.split, (fused, widths), {"dim": -1})
            outputs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
        for node, output in zip(nodes, outputs):
            node.replace_all_uses_with(output)
            graph.erase_node(node)
        removed += len(nodes) - 1
    return removed


_SILU = (torch.nn.functional.silu, torch.ops.aten.silu.default)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


def fuse_swiglu(graph: torch.fx.Graph, serves=None) -> int:
    """In a dynamo graph where fuse_sibling_linears has joined an MLP's gate and up projections, every
    silu(gate) * up whose gate and up are the first and second halves of one split becomes
    aligntrain::swiglu of the unsplit output (kernels.py: its backward reads each input once), where
    `serves(device, dtype)` of that output holds (default kernels.swiglu_serves); the number of products
    replaced."""
    serves = serves or kernels.swiglu_serves
    replaced = 0
    for mul in list(graph.nodes):
        if mul.op != "call_function" or mul.target not in _MUL or mul.kwargs or len(mul.args) != 2:
            continue
        silu, up = mul.args
        if not _is_silu(silu):
            silu, up = up, silu
        if not _is_silu(silu) or len(silu.users) != 1:
            continue
        gate = silu.args[0]
        if not (_is_half(gate, 0) and _is_half(up, 1) and gate.args[0] is up.args[0]):
            continue
        split = gate.args[0]
        value = silu.meta.get("example_value")
        if value is None or not serves(value.device, value.dtype):
            continue
        with graph.inserting_before(mul):
            fused = graph.call_function(torch.ops.aligntrain.swiglu.default, (split.args[0],))
        fused.meta.update(mul.meta)
        mul.replace_all_uses_with(fused)
        for node in (mul, silu, gate, up, split):
            if not node.users:
                graph.erase_node(node)
        replaced += 1
    return replaced


def _is_silu(node) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _SILU
            and len(node.args) == 1 and not node.kwargs.get("inplace", False))


def _is_half(node, index: int) -> bool:
    """`node` is getitem(torch.split(x, [w, w], dim=-1), index): half `index` of x's last dimension."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and node.args[1] == index):
        return False
    split = node.args[0]
    if not (isinstance(split, torch.fx.Node) and split.op == "call_function" and split.target is torch.split):
        return False
    widths = split.args[1] if len(split.args) > 1 else split.kwargs.get("split_size_or_sections")
    return (isinstance(widths, (list, tuple)) and len(widths) == 2 and widths[0] == widths[1]
            and split.kwargs.get("dim") == -1 and len(split.args) == 2)


def _fuse_pass():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class FuseSiblingLinears(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            fuse_sibling_linears(graph)
            if FUSE_SWIGLU:
                fuse_swiglu(graph)

        def uuid(self):  # inductor's graph cache keys on it
            return f"aligntrain.FuseSiblingLinears.2.swiglu={FUSE_SWIGLU and kernels.SWIGLU_ENABLED}"

    return FuseSiblingLinears()


def _configure() -> None:
    import torch._dynamo
    import torch._inductor.config

    if FUSE_LINEARS and torch._inductor.config.pre_grad_custom_pass is None:
        torch._inductor.config.pre_grad_custom_pass = _fuse_pass()
    config = torch._dynamo.config
    config.suppress_errors = True  # a graph that fails to compile runs eagerly (torch logs a warning), never stops the run
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name first
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            break
