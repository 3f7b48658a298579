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
