"""Completion log-probs of packed batches: equal to the simple path (each sequence alone through the
model, full-vocabulary log-softmax) in value and gradient, for SFT rows and for DPO pairs whose prompt
is forwarded once, without ever building [tokens, vocab] logits."""

import pytest
import torch
from trainer_fixtures import simple_sequence_logps, tiny_model  # noqa: F401  (pytest fixture)

from aligntrain.data import collate
from aligntrain.modeling import MODEL_INPUTS, SequenceLogps, load_causal_lm, visible


def sft_rows():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(7, 300, (n,), generator=g).tolist() for n in (12, 9, 5)]
    masks = [[0] * 4 + [1] * 8, [0] * 3 + [1] * 6, [1] * 5]  # a trained token at position 0 has no context
    return [{"input_ids": i, "loss_mask": m} for i, m in zip(ids, masks)]


def dpo_rows():
    g = torch.Generator().manual_seed(1)
    r = lambda n: torch.randint(7, 300, (n,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": r(5), "chosen_ids": r(4), "rejected_ids": r(7)},
            {"prompt_ids": r(1), "chosen_ids": r(3), "rejected_ids": r(1)},
            {"prompt_ids": r(9), "chosen_ids": r(6), "rejected_ids": r(6)}]


def simple_inputs(rows, task):
    """The sequences of a batch, in SequenceLogps' order, as (ids, loss_mask) lists."""
    if task == "sft":
        return [(r["input_ids"], r["loss_mask"]) for r in rows]
    return [(r["prompt_ids"] + r[side], [0] * len(r["prompt_ids"]) + [1] * len(r[side]))
            for side in ("chosen_ids", "rejected_ids") for r in rows]


def packed(model, rows, task):
    batch = collate(rows, task)
    return model(**{k: batch[k] for k in MODEL_INPUTS})


@pytest.mark.parametrize("task", ["sft", "dpo"])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_packed_equals_the_simple_path_in_value_and_gradient(tiny_model, task, chunk):
    rows = sft_rows() if task == "sft" else dpo_rows()
    lm = load_causal_lm(tiny_model, "float32")
    expected, expected_tokens = simple_sequence_logps(lm, simple_inputs(rows, task))
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()

    got, tokens = packed(SequenceLogps(lm, chunk_tokens=chunk), rows, task)
    got.sum().backward()
    assert tokens.tolist() == expected_tokens.tolist()
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    for name, p in lm.named_parameters():
        assert torch.allclose(p.grad, expected_grads[name], atol=1e-5), name


def test_sft_counts_skip_position_zero_and_the_prompt(tiny_model):
    _, tokens = packed(SequenceLogps(load_causal_lm(tiny_model, "float32")), sft_rows(), "sft")
    assert tokens.tolist() == [8, 6, 4]


def test_dpo_prompt_is_forwarded_once_and_completions_do_not_see_each_other():
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]},
            {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9, 9]}]
    b = collate(rows, "dpo")
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 0, 1, 1, 2]]
    assert b["example_tokens"].tolist() == [6, 4]
    # chosen 0 (3 4 5 from 2), chosen 1 (8 from 7), rejected 0 (6 from 2), rejected 1 (9 from 7, 9 from 9)
    assert b["counts"].tolist() == [3, 1, 1, 2]
    assert b["sources"].tolist() == [1, 2, 3, 6, 1, 6, 8]
    assert b["targets"].tolist() == [3, 4, 5, 8, 6, 9, 9]
    i = torch.arange(10)
    mask = visible(b["doc"], b["branch"], i[:, None], i[None, :])
    assert mask[5].nonzero().flatten().tolist() == [0, 1, 5]  # rejected sees the prompt, not chosen
    assert mask[4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert mask[9].nonzero().flatten().tolist() == [6, 8, 9]  # next row: its own prompt only


def test_logits_exist_only_chunk_rows_at_a_time(tiny_model):
    lm = load_causal_lm(tiny_model, "float32")
    rows_seen = []
    lm.get_output_embeddings().register_forward_hook(lambda m, args, out: rows_seen.append(tuple(out.shape)))
    lm.forward = lambda *a, **k: pytest.fail("the full-logits forward must not run")
    got, _ = packed(SequenceLogps(lm, chunk_tokens=4), sft_rows(), "sft")
    got.sum().backward()  # the backward recomputes each chunk (checkpointed)
    vocab = lm.config.vocab_size
    assert all(len(shape) == 2 and shape[0] <= 4 and shape[1] == vocab for shape in rows_seen)
    assert sum(shape[0] for shape in rows_seen) == 2 * 18  # 18 trained tokens, forward + recompute


def test_bf16_autocast_stays_close_to_float32(tiny_model):
    model = SequenceLogps(load_causal_lm(tiny_model, "float32"))
    with torch.no_grad():
        exact, _ = packed(model, dpo_rows(), "dpo")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = packed(model, dpo_rows(), "dpo")
    assert low.dtype == torch.float32
    assert torch.allclose(low, exact, rtol=2e-2, atol=0.2)


def test_packed_attention_refuses_to_run_without_its_mask(tiny_model):
    lm = load_causal_lm(tiny_model, "float32")
    SequenceLogps(lm)
    with pytest.raises(RuntimeError, match="without its mask"):
        lm(input_ids=torch.tensor([[5, 6, 7]]))


def test_flops_count_a_shared_prompt_once():
    from types import SimpleNamespace

    from aligntrain.modeling import batch_flops

    config = SimpleNamespace(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=16, vocab_size=100, head_dim=4)
    b = collate([{"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]}], "dpo")
    weights = 3 * 8 * 16 + 8 * 4 * (2 * 2 + 2 * 1)  # MLP + attention projections per layer
    keys = sum(p + 1 for p in [0, 1, 2, 3, 4, 2])  # each token sees its position + 1 keys
    expected = 2 * 2 * weights * 6 + 2 * 8 * 100 * 4 + 4 * 2 * 2 * 4 * keys
    assert batch_flops(config, b, passes=1) == expected
