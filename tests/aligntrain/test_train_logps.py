"""Completion log-probs: equal to the naive full-vocabulary computation, in value and gradient,
without ever building [batch, seq, vocab] logits."""

import pytest
import torch

from aligntrain.modeling import SequenceLogps, load_causal_lm


def batch():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(7, 300, (3, 12), generator=g)
    attention = torch.ones(3, 12, dtype=torch.long)
    attention[1, 9:] = 0  # right padding
    attention[2, 5:] = 0
    loss_mask = torch.zeros(3, 12, dtype=torch.long)
    loss_mask[0, 4:] = 1
    loss_mask[1, 3:9] = 1
    loss_mask[2, 0:5] = 1  # a trained token at position 0 has no context and is skipped
    return input_ids, attention, loss_mask


def naive(lm, input_ids, attention, loss_mask):
    logits = lm(input_ids=input_ids, attention_mask=attention).logits.float()
    logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = (loss_mask[:, 1:] * attention[:, 1:]).bool()
    return (logps * mask).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_equals_full_log_softmax_in_value_and_gradient(tiny_model, chunk):
    lm = load_causal_lm(tiny_model, "float32")
    ids, attention, mask = batch()
    expected, expected_tokens = naive(lm, ids, attention, mask)
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()

    got, tokens = SequenceLogps(lm, chunk_tokens=chunk)(ids, attention, mask)
    got.sum().backward()
    assert tokens.tolist() == expected_tokens.tolist() == [8, 6, 4]
    assert torch.allclose(got, expected, atol=1e-5)
    for name, p in lm.named_parameters():
        assert torch.allclose(p.grad, expected_grads[name], atol=1e-5), name


def test_logits_exist_only_chunk_rows_at_a_time(tiny_model):
    lm = load_causal_lm(tiny_model, "float32")
    rows_seen = []
    lm.get_output_embeddings().register_forward_hook(lambda m, args, out: rows_seen.append(tuple(out.shape)))
    lm.forward = lambda *a, **k: pytest.fail("the full-logits forward must not run")
    ids, attention, mask = batch()
    got, _ = SequenceLogps(lm, chunk_tokens=4)(ids, attention, mask)
    got.sum().backward()  # the backward recomputes each chunk (checkpointed)
    vocab = lm.config.vocab_size
    assert all(len(shape) == 2 and shape[0] <= 4 and shape[1] == vocab for shape in rows_seen)
    assert sum(shape[0] for shape in rows_seen) == 2 * 18  # 18 trained tokens, forward + recompute


def test_bf16_autocast_stays_close_to_float32(tiny_model):
    lm = load_causal_lm(tiny_model, "float32")
    ids, attention, mask = batch()
    with torch.no_grad():
        exact, _ = SequenceLogps(lm)(ids, attention, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = SequenceLogps(lm)(ids, attention, mask)
    assert low.dtype == torch.float32
    assert torch.allclose(low, exact, rtol=2e-2, atol=0.2)


def test_the_cudnn_switch_changes_nothing_on_cpu(tiny_model):
    """model.cudnn_attention only narrows SDPA's kernels on CUDA; elsewhere the forward is the same call."""
    lm = load_causal_lm(tiny_model, "float32")
    ids, attention, mask = batch()
    with torch.no_grad():
        on, _ = SequenceLogps(lm, cudnn_attention=True)(ids, attention, mask)
        off, _ = SequenceLogps(lm)(ids, attention, mask)
    assert torch.equal(on, off)


# -- the head's gradients in the forward (uniform_grad) ------------------------------------------

def _grads(lm, fn, scale=-0.37):
    lm.zero_grad()
    got, tokens = fn()
    (scale * got.sum()).backward()  # one coefficient for every sequence, as SFT's token mean
    return got.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk,tied", [(1, False), (5, False), (1024, False), (5, True)])
def test_head_gradients_in_the_forward_equal_the_recomputed_head(tiny_model, chunk, tied):
    lm = load_causal_lm(tiny_model, "float32")
    if tied:  # one parameter, the embedding's and the head's gradients summed into it
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight
    ids, attention, mask = batch()
    seen = []
    lm.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(out))
    expected, expected_grads = _grads(lm, lambda: SequenceLogps(lm, chunk_tokens=chunk)(ids, attention, mask))
    assert seen, "the plain path runs the head module"
    seen.clear()
    got, grads = _grads(lm, lambda: SequenceLogps(lm, chunk_tokens=chunk, uniform_grad=True)(ids, attention, mask))
    assert not seen, "the head's matrix multiplies run inside head_logps_uniform_grad, not through the module"
    assert torch.allclose(got, expected, atol=1e-5)
    assert expected_grads.keys() == grads.keys() and len(grads) == len(list(lm.parameters()))
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-5), name


def test_head_gradients_in_the_forward_on_a_padding_free_stream(tiny_model):
    from aligntrain.data import collate
    from aligntrain.modeling import model_inputs
    from aligntrain.packing import PACKED, use_packed_attention

    lm = load_causal_lm(tiny_model, "float32")
    use_packed_attention(lm)
    g = torch.Generator().manual_seed(3)
    rows = []
    for n, p in ((9, 3), (14, 5), (6, 2)):
        ids = torch.randint(7, 300, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * p + [1] * (n - p), "length": n})
    batch = collate(rows, "sft", 0, PACKED, 64)
    expected, expected_grads = _grads(lm, lambda: SequenceLogps(lm, chunk_tokens=4)(**model_inputs(batch)))
    got, grads = _grads(lm, lambda: SequenceLogps(lm, chunk_tokens=4, uniform_grad=True)(**model_inputs(batch)))
    assert torch.allclose(got, expected, atol=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-5), name


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_head_logps_uniform_grad_against_autograd(softcap):
    from aligntrain.modeling import head_logps_uniform_grad

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(11, 8, generator=g, requires_grad=True)
    weight = torch.randn(29, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 29, (11,), generator=g)

    def naive():
        logits = hidden @ weight.t()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

    expected = naive()
    expected_h, expected_w = torch.autograd.grad(2.5 * expected.sum(), (hidden, weight))
    got = head_logps_uniform_grad(hidden, weight, targets, 4, softcap)
    got_h, got_w = torch.autograd.grad(2.5 * got.sum(), (hidden, weight))
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got_h, expected_h, atol=1e-5) and torch.allclose(got_w, expected_w, atol=1e-5)
    # the input's gradient is exact per row for any coefficients, only the weight's needs them equal
    coeff = torch.linspace(-1, 1, 11)
    got_h, = torch.autograd.grad((coeff * head_logps_uniform_grad(hidden, weight, targets, 4, softcap)).sum(), hidden)
    expected_h, = torch.autograd.grad((coeff * naive()).sum(), hidden)
    assert torch.allclose(got_h, expected_h, atol=1e-5)


def test_head_gradients_in_the_forward_not_taken_where_they_do_not_apply(tiny_model):
    from aligntrain import modeling

    lm = load_causal_lm(tiny_model, "float32")
    ids, attention, mask = batch()
    calls = []
    real = modeling.head_logps_uniform_grad

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    modeling.head_logps_uniform_grad = spy
    try:
        model = SequenceLogps(lm, uniform_grad=True)
        with torch.no_grad():  # evaluation: no gradients to compute
            model(ids, attention, mask)
        SequenceLogps(lm)(ids, attention, mask)[0].sum().backward()  # a loss that did not declare itself uniform
        assert not calls
        model(ids, attention, mask)[0].sum().backward()
        assert calls == [1]
        modeling.HEAD_GRAD_IN_FORWARD = False  # the switch the benchmarks measure it with
        model(ids, attention, mask)[0].sum().backward()
        assert calls == [1]
    finally:
        modeling.head_logps_uniform_grad = real
        modeling.HEAD_GRAD_IN_FORWARD = True


def test_head_gradients_in_the_forward_under_bf16_autocast(tiny_model):
    lm = load_causal_lm(tiny_model, "float32")
    ids, attention, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = _grads(lm, lambda: SequenceLogps(lm, chunk_tokens=5)(ids, attention, mask))
        got, grads = _grads(lm, lambda: SequenceLogps(lm, chunk_tokens=5, uniform_grad=True)(ids, attention, mask))
    assert torch.allclose(got, expected, atol=1e-3)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        scale = expected_grads[name].abs().max().item() + 1e-6
        assert (grad - expected_grads[name]).abs().max().item() <= 0.03 * scale, name


def test_the_head_chunk_left_unset_is_1024_rows_or_two_gib_of_logits_for_the_triton_kernel():
    from aligntrain.modeling import CHUNK_TOKENS, HEAD_GRAD_CHUNK_BYTES, head_chunk_rows

    assert CHUNK_TOKENS == 1024 and HEAD_GRAD_CHUNK_BYTES == 2 << 30
    assert head_chunk_rows(None, 128_256, 2, True) == (2 << 30) // (128_256 * 2) == 8371  # llama's vocabulary, bf16
    assert head_chunk_rows(None, 128_256, 2, False) == 1024  # no Triton kernel: DPO's recomputed chunks, eager, CPU
    assert head_chunk_rows(None, 4_000_000, 2, True) == 1024  # never fewer rows than the fixed chunk
    assert head_chunk_rows(7, 128_256, 2, True) == 7 and head_chunk_rows(7, 128_256, 2, False) == 7


def test_an_unset_chunk_on_the_cpu_keeps_logits_to_1024_rows_at_a_time(tiny_model, monkeypatch):
    """Where the head's gradients are taken in the forward too: the unset chunk is 1024 rows off CUDA
    (the chunk a head call sees is at most that)."""
    from aligntrain import modeling

    lm = load_causal_lm(tiny_model, "float32")
    seen = []
    real = modeling.logps_and_grad

    def spy(logits, targets, softcap=None):
        seen.append(logits.shape[0])
        return real(logits, targets, softcap)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(7, 300, (3, 900), generator=g)
    attention, mask = torch.ones_like(ids), torch.ones_like(ids)
    model = SequenceLogps(lm, uniform_grad=True)
    model.logps_and_grad = spy
    logps, tokens = model(ids, attention, mask)
    logps.sum().backward()
    assert int(tokens.sum()) == 3 * 899 and max(seen) <= 1024 and sum(seen) == 3 * 899 and len(seen) == 3
