"""torch.compile of the decoder layers and the head's log-softmax (aligntrain/compiling.py): the same
log-probs, gradients and training as eager. On CPU the graphs run through the aot_eager backend (the
traced and partitioned graphs without code generation, seconds instead of minutes); inductor itself is
checked on the GPU (tests/aligntrain/test_train_gpu.py)."""

import operator
from types import SimpleNamespace

import pytest
import torch
from test_train_packing import batches, cfg_for

import aligntrain.compiling as compiling
from aligntrain.compiling import compile_wanted, decoder_layers, logps_from_logits
from aligntrain.modeling import SequenceLogps, load_causal_lm, model_inputs
from aligntrain.packing import PACKED, PADDED, SHARED, use_packed_attention
from aligntrain.trainer import train
from torch._dynamo.utils import counters


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    monkeypatch.setattr(compiling, "_compiled_logps", None)
    monkeypatch.setattr(compiling, "_compiled_logps_and_grad", None)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_is_on_by_default_for_full_weights_on_one_gpu_only():
    def cfg(compile=None, lora=None):
        return SimpleNamespace(compile=compile, model=SimpleNamespace(lora=lora))

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile_wanted(cfg(), cuda) and not compile_wanted(cfg(), cpu)
    assert not compile_wanted(cfg(lora=object()), cuda) and not compile_wanted(cfg(), cuda, fsdp=True)
    assert compile_wanted(cfg(True), cpu) and compile_wanted(cfg(True, lora=object()), cuda)
    assert not compile_wanted(cfg(False), cuda)


def test_the_decoder_layers_are_what_the_model_never_splits(tiny_model):
    lm = load_causal_lm(tiny_model, "float32")
    layers = decoder_layers(lm)
    assert len(layers) == lm.config.num_hidden_layers
    assert all(layer is block for layer, block in zip(layers, lm.model.layers))


def test_the_compiled_log_softmax_is_the_eager_one():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 50, dtype=torch.bfloat16), torch.randint(0, 50, (6,))
    eager = logps_from_logits(logits, targets)
    assert torch.allclose(compiling.compiled_logps_from_logits()(logits, targets), eager, atol=1e-6)
    assert torch.allclose(eager, torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1), atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_the_compiled_log_softmax_gradient_is_the_eager_one(softcap):
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 50, dtype=torch.bfloat16), torch.randint(0, 50, (6,))
    eager = compiling.logps_and_grad(logits, targets, softcap)
    fast = compiling.compiled_logps_and_grad()(logits, targets, softcap)
    assert eager[1].dtype == fast[1].dtype == torch.bfloat16
    assert torch.allclose(fast[0], eager[0], atol=1e-6) and torch.allclose(fast[1].float(), eager[1].float(), atol=1e-6)
    assert torch.allclose(eager[0], logps_from_logits(logits, targets, softcap), atol=1e-6)
    exact = logits.float().requires_grad_()
    capped = softcap * torch.tanh(exact / softcap) if softcap else exact
    torch.log_softmax(capped, -1).gather(-1, targets[:, None]).sum().backward()
    assert torch.allclose(eager[1].float(), exact.grad, atol=2e-2)  # the bf16 logits' cap and the bf16 gradient


@pytest.mark.parametrize("task,layout", [("sft", PACKED), ("dpo", SHARED), ("dpo", PADDED)])
def test_compiled_log_probs_and_gradients_equal_eager(tiny_model, sft_shards, dpo_shards, task, layout):
    shards = sft_shards if task == "sft" else dpo_shards
    # two batches of different lengths: the second runs the same graphs (shapes are dynamic)
    first, second = batches(shards, task, [layout], rows=6)[layout], batches(shards, task, [layout], rows=8)[layout]
    results = {}
    for compiled in (False, True):
        lm = load_causal_lm(tiny_model, "float32")
        if layout != PADDED:
            use_packed_attention(lm)
        model = SequenceLogps(lm, chunk_tokens=7, compiled=compiled)
        runs, graphs = [], []
        for batch in (first, second):
            lm.zero_grad()
            logps, _ = model(**model_inputs(batch))
            (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()
            runs.append((logps.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}))
            graphs.append(counters["stats"]["unique_graphs"])
        results[compiled] = runs
    assert graphs[0] > 0 and graphs[1] == graphs[0]  # compiled once, not again for the second batch's lengths
    # the segment attention traces into the layer (a custom op): no graph break anywhere
    assert not counters["graph_break"], dict(counters["graph_break"])
    for (eager, eager_grads), (fast, fast_grads) in zip(results[False], results[True]):
        assert torch.allclose(fast, eager, atol=1e-5), (fast - eager).abs().max()
        for name, grad in eager_grads.items():
            assert torch.allclose(fast_grads[name], grad, atol=1e-5), name
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None
               for layer in decoder_layers(lm))


@pytest.mark.slow
@pytest.mark.parametrize("task,recompute", [("sft", False), ("dpo", False), ("dpo", True)])
def test_training_compiled_equals_eager(tmp_path, tiny_model, sft_shards, dpo_shards, task, recompute):
    """Also with activation checkpointing: the compiled layers run again in backward."""
    shards = sft_shards if task == "sft" else dpo_shards
    loss = {"loss": {"name": task}, "tokens_per_batch": 200, "n_examples": 16, "activation_checkpointing": recompute}
    eager = train(cfg_for(tmp_path, tiny_model, "eager", compile=False, **loss), shards)
    compiled = train(cfg_for(tmp_path, tiny_model, "compiled", compile=True, **loss), shards)
    assert len(compiled.history) == len(eager.history) > 1
    for a, b in zip(eager.history, compiled.history):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def test_a_graph_that_fails_to_compile_runs_eagerly(monkeypatch, tiny_model, sft_shards):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("this backend compiles nothing")

    monkeypatch.setattr(compiling, "BACKEND", broken_backend)
    batch = batches(sft_shards, "sft", [PACKED])[PACKED]
    results = []
    for compiled in (False, True):
        lm = load_causal_lm(tiny_model, "float32")
        use_packed_attention(lm)
        results.append(SequenceLogps(lm, chunk_tokens=7, compiled=compiled)(**model_inputs(batch))[0].detach())
    assert torch.equal(results[0], results[1])


def fuse_linears_then_aot_eager(monkeypatch) -> list[int]:
    """Compile with FuseSiblingLinears applied to each dynamo graph, then aot_eager; the list it returns
    gets the number of linear calls each graph lost."""
    from torch._dynamo.backends.registry import lookup_backend

    removed = []

    def fusing_backend(gm, example_inputs):
        removed.append(compiling.fuse_sibling_linears(gm.graph))
        gm.recompile()
        return lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setattr(compiling, "BACKEND", fusing_backend)
    return removed


@pytest.mark.parametrize("bias", [False, True])
def test_sibling_linears_fused_in_the_graph_give_the_same_log_probs_and_gradients(monkeypatch, tiny_model,
                                                                                     sft_shards, bias):
    """FuseSiblingLinears (inductor's pre-grad pass) applied to the dynamo graph of each layer, run by
    aot_eager: q/k/v become one linear and gate/up another, with biases (Qwen2's q/k/v) or without."""
    from transformers import LlamaConfig, LlamaForCausalLM

    removed = fuse_linears_then_aot_eager(monkeypatch)
    batch = batches(sft_shards, "sft", [PACKED], rows=6)[PACKED]
    config = LlamaConfig.from_pretrained(tiny_model, attention_bias=bias)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        lm = LlamaForCausalLM(config)
        use_packed_attention(lm)
        logps, _ = SequenceLogps(lm, chunk_tokens=7, compiled=compiled)(**model_inputs(batch))
        (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}))
    # a layer's graph: q/k/v 2 calls fewer, gate/up 1; the head's log-softmax graph has no linear
    assert 3 in removed and set(removed) <= {0, 3}, removed
    (eager, eager_grads), (fused, fused_grads) = results
    assert torch.allclose(fused, eager, atol=1e-5), (fused - eager).abs().max()
    for name, grad in eager_grads.items():
        assert torch.allclose(fused_grads[name], grad, atol=1e-5), name


def test_the_fusion_leaves_linears_of_different_inputs_or_bias_alone():
    graph = torch.fx.Graph()
    x, y, w1, w2, w3, b = (graph.placeholder(n) for n in ("x", "y", "w1", "w2", "w3", "b"))
    for w, shape in ((w1, (4, 8)), (w2, (6, 8)), (w3, (4, 8))):
        w.meta["example_value"] = torch.empty(shape)
    outs = [graph.call_function(torch._C._nn.linear, (x, w1)), graph.call_function(torch._C._nn.linear, (x, w2, b)),
            graph.call_function(torch._C._nn.linear, (y, w3))]
    graph.output(tuple(outs))
    assert compiling.fuse_sibling_linears(graph) == 0  # one with a bias, one without; another input
    graph2 = torch.fx.Graph()
    x, w1, w2 = (graph2.placeholder(n) for n in ("x", "w1", "w2"))
    w1.meta["example_value"], w2.meta["example_value"] = torch.empty(4, 8), torch.empty(6, 8)
    graph2.output((graph2.call_function(torch._C._nn.linear, (x, w1)), graph2.call_function(torch._C._nn.linear, (x, w2))))
    assert compiling.fuse_sibling_linears(graph2) == 1
    module = torch.fx.GraphModule(torch.nn.Module(), graph2)
    inputs = torch.randn(3, 8), torch.randn(4, 8), torch.randn(6, 8)
    a, c = module(*inputs)
    assert torch.allclose(a, inputs[0] @ inputs[1].T) and torch.allclose(c, inputs[0] @ inputs[2].T)


def test_a_head_kernel_that_cannot_be_built_falls_back_to_the_compiled_function(monkeypatch):
    """Where Triton cannot build the kernel (its first call raises), the head warns once, turns the kernel
    off and takes the compiled log-softmax; nothing else changes."""
    from aligntrain import kernels

    calls = []

    def fails(logits, targets):
        calls.append(1)
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(kernels, "ENABLED", True)
    monkeypatch.setattr(kernels, "_built", False)
    monkeypatch.setattr(kernels, "applies", lambda logits, softcap: kernels.ENABLED)
    monkeypatch.setattr(kernels, "logps_and_grad_", fails)
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 50, dtype=torch.bfloat16), torch.randint(0, 50, (6,))
    fast = compiling.compiled_logps_and_grad()
    with pytest.warns(RuntimeWarning, match="Triton kernel is off .*C compiler"):
        first = fast(logits, targets)
    second = fast(logits, targets)
    eager = compiling.logps_and_grad(logits, targets)
    assert calls == [1] and not kernels.ENABLED
    for got in (first, second):
        assert torch.allclose(got[0], eager[0], atol=1e-6) and torch.equal(got[1], eager[1])


def test_the_swiglu_operator_and_its_backward_are_silu_times_up():
    """aligntrain::swiglu off the Triton path (the CPU): silu(gate) * up of the two halves, its gradient by
    gradcheck in float64, 16-bit inputs computed in float32 and rounded once, and torch.library's checks of
    both operators (fake tensors, autograd registration)."""
    from aligntrain import kernels

    x = torch.randn(3, 5, 14, dtype=torch.float64, requires_grad=True)
    gate, up = x.detach().chunk(2, dim=-1)
    assert torch.allclose(kernels.swiglu(x), torch.nn.functional.silu(gate) * up)
    assert torch.autograd.gradcheck(kernels.swiglu, (x,))
    half = torch.randn(4, 6, 16).to(torch.bfloat16)
    expected = (torch.nn.functional.silu(half[..., :8].float()) * half[..., 8:].float()).to(torch.bfloat16)
    assert kernels.swiglu(half).dtype == torch.bfloat16 and torch.equal(kernels.swiglu(half), expected)
    torch.library.opcheck(kernels.swiglu, (torch.randn(4, 8, requires_grad=True),))
    torch.library.opcheck(kernels.swiglu_backward, (torch.randn(4, 4), torch.randn(4, 8)))


def _mlp_graph(order=("gate", "up"), widths=(4, 4), silu_users=1):
    """A pre-grad graph of an MLP whose gate/up linears fuse_sibling_linears has joined: split halves of
    `widths`, silu of the half named first in `order` times the other (plus `silu_users` - 1 more uses)."""
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    fused = graph.call_function(torch._C._nn.linear, (x, w, None))
    parts = graph.call_function(torch.split, (fused, list(widths)), {"dim": -1})
    halves = {"gate": graph.call_function(operator.getitem, (parts, 0)),
              "up": graph.call_function(operator.getitem, (parts, 1))}
    silu = graph.call_function(torch.nn.functional.silu, (halves[order[0]],))
    silu.meta["example_value"] = torch.empty(3, widths[0])
    out = graph.call_function(operator.mul, (silu, halves[order[1]]))
    extra = [graph.call_function(operator.add, (silu, 1.0)) for _ in range(silu_users - 1)]
    graph.output((out, *extra))
    return graph


def test_fuse_swiglu_takes_only_silu_of_the_first_half_times_the_second_where_the_kernel_serves():
    serves = lambda device, dtype: True  # noqa: E731 - the CPU has no kernel; the rewrite is what is tested
    graph = _mlp_graph()
    assert compiling.fuse_swiglu(graph, serves) == 1
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [torch._C._nn.linear,
                                                                          torch.ops.aligntrain.swiglu.default]
    x, w = torch.randn(3, 5), torch.randn(8, 5)
    gate_up = x @ w.T
    assert torch.allclose(module(x, w)[0], torch.nn.functional.silu(gate_up[:, :4]) * gate_up[:, 4:], atol=1e-6)
    assert compiling.fuse_swiglu(_mlp_graph(), lambda device, dtype: False) == 0  # no kernel for it here
    assert compiling.fuse_swiglu(_mlp_graph(order=("up", "gate")), serves) == 0  # silu of the second half
    assert compiling.fuse_swiglu(_mlp_graph(widths=(4, 6)), serves) == 0  # not two halves
    assert compiling.fuse_swiglu(_mlp_graph(silu_users=2), serves) == 0  # silu(gate) used elsewhere too


def test_swiglu_fused_into_the_compiled_layers_gives_the_same_log_probs_and_gradients(monkeypatch, tiny_model,
                                                                                        sft_shards):
    """The whole pre-grad pass (linears joined, then silu(gate) * up as aligntrain::swiglu, forced here where
    no kernel serves) in each layer's graph, run by aot_eager: the eager model's log-probs and gradients."""
    from torch._dynamo.backends.registry import lookup_backend
    from transformers import LlamaForCausalLM

    replaced = []

    def fusing_backend(gm, example_inputs):
        compiling.fuse_sibling_linears(gm.graph)
        replaced.append(compiling.fuse_swiglu(gm.graph, lambda device, dtype: True))
        gm.recompile()
        return lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setattr(compiling, "BACKEND", fusing_backend)
    batch = batches(sft_shards, "sft", [PACKED], rows=6)[PACKED]
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        lm = LlamaForCausalLM.from_pretrained(tiny_model)
        use_packed_attention(lm)
        logps, _ = SequenceLogps(lm, chunk_tokens=7, compiled=compiled)(**model_inputs(batch))
        (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}))
    assert 1 in replaced and set(replaced) <= {0, 1}, replaced  # one product a layer graph; none in the head's
    (eager, eager_grads), (fused, fused_grads) = results
    assert torch.allclose(fused, eager, atol=1e-5), (fused - eager).abs().max()
    for name, grad in eager_grads.items():
        assert torch.allclose(fused_grads[name], grad, atol=1e-5), name


def test_swiglu_kernels_that_cannot_be_built_fall_back_to_torch(monkeypatch):
    """Where Triton cannot build the SwiGLU kernels (the first call raises), the operator warns once, turns
    them off and computes with torch's operators: the same values."""
    from aligntrain import kernels

    def fails(gate_up, grad=None):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(kernels, "SWIGLU_ENABLED", True)
    monkeypatch.setattr(kernels, "swiglu_serves", lambda device, dtype: kernels.SWIGLU_ENABLED)
    monkeypatch.setattr(kernels, "_swiglu_triton", fails)
    x = torch.randn(5, 12)
    with pytest.warns(RuntimeWarning, match="SwiGLU Triton kernels are off"):
        out = kernels.swiglu(x)
    assert not kernels.SWIGLU_ENABLED and torch.equal(out, kernels.swiglu_reference(x))
    assert torch.equal(kernels.swiglu_backward(torch.ones(5, 6), x), kernels.swiglu_backward_reference(torch.ones(5, 6), x))


def test_working_copies_in_compiled_layers_train_as_in_eager_layers(monkeypatch, tmp_path, tiny_model, sft_shards):
    """bf16 working copies (masters.py) are buffers of the compiled layers: the sibling-linear fusion still
    joins q/k/v and gate/up over them, their gradients arrive, and training follows the eager run."""
    removed = fuse_linears_then_aot_eager(monkeypatch)
    changes = {"tokens_per_batch": 200, "n_examples": 24, "working_weights": True, "model": {"policy_dtype": "bfloat16"}}
    eager = train(cfg_for(tmp_path, tiny_model, "eager", compile=False, **changes), sft_shards)
    compiled = train(cfg_for(tmp_path, tiny_model, "compiled", compile=True, **changes), sft_shards)
    assert 3 in removed, removed
    assert len(compiled.history) == len(eager.history) == 3
    for a, b in zip(eager.history, compiled.history):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-2), key
