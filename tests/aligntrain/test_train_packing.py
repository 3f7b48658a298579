"""Padding-free batches: the stream layout by hand, and the same log-probs, gradients and training as
the padded path (float32 on CPU: 1e-5)."""

import numpy as np
import pytest
import torch
from trainer_fixtures import base_config

from aligndata.write.shards import read_manifest

from aligntrain.config import ConfigError, load_config
from aligntrain.data import ShardSplit, collate, micro_batches
from aligntrain.modeling import SequenceLogps, disable_dropout, load_causal_lm, model_inputs
from aligntrain.packing import (PACKED, PACKED_ATTENTION, PADDED, SHARED, Segments, choose_layout, pack, segment_attention,
                               segment_bound, use_packed_attention)
from aligntrain.trainer import train


def cfg_for(tmp_path, model_dir, name="cfg", **changes):
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base_config(model_dir, tmp_path / name, **changes)))
    return load_config(path)


def test_shared_prompt_stream_by_hand():
    # one pair: prompt [1, 2], chosen [3, 4, 5], rejected [6]; every completion token trained
    chosen, rejected = np.array([1, 2, 3, 4, 5]), np.array([1, 2, 6])
    b = pack([chosen, rejected], [np.array([0, 0, 1, 1, 1], bool), np.array([0, 0, 1], bool)], prompts=[2])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2]]  # the rejected token sits right after the prompt
    # chosen: 3 predicted at stream 1 (the prompt's last token), 4 at 2, 5 at 3; rejected: 6 predicted at 1 too
    assert b["predict"].tolist() == [1, 2, 3, 1]
    assert b["targets"].tolist() == [3, 4, 5, 6]
    assert b["slots"].tolist() == [[True, True, True], [True, False, False]]
    assert b["lengths"].tolist() == [5, 3]
    s = b["segments"]
    assert s.cu_q.tolist() == [0, 5, 6] and s.cu_k.tolist() == [0, 5, 8]  # rejected: 1 query over 3 keys
    assert s.key_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 5]  # its keys: the prompt, then itself
    assert (s.max_q, s.max_k) == (8, 8)  # no run's max_length given: the longest (5) rounded up to a power of two


def test_plain_stream_restarts_positions_and_never_trains_a_first_token():
    b = pack([np.array([5, 6, 7]), np.array([8, 9])], [np.array([1, 1, 1], bool), np.array([0, 1], bool)])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["predict"].tolist() == [0, 1, 3] and b["targets"].tolist() == [6, 7, 9]
    assert b["segments"].key_index is None and b["segments"].cu_q.tolist() == [0, 3, 5]


def test_the_segment_bound_is_the_runs_max_length_unless_a_segment_is_longer():
    assert segment_bound(700, 1024) == 1024 and segment_bound(1024, 1024) == 1024
    assert segment_bound(1025, 1024) == 2048 and segment_bound(5, None) == 8 and segment_bound(1, None) == 1
    b = pack([np.array([5, 6, 7])], [np.array([1, 1, 1], bool)], bound=16)
    assert (b["segments"].max_q, b["segments"].max_k) == (16, 16)
    # collate hands the run's max_length down (the trainer, its evaluation and precompute-ref pass cfg.max_length)
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}]
    assert collate(rows, "dpo", 0, SHARED, max_length=64)["segments"].max_k == 64


def reference_attention(q, k, v, bounds_q, bounds_k, scale):
    """Per segment SDPA with an explicit mask (causal, aligned to the end of the keys), in float64."""
    groups = q.shape[1] // k.shape[1]
    out = []
    for i in range(len(bounds_q) - 1):
        qq = q[bounds_q[i]:bounds_q[i + 1]].transpose(0, 1).double()
        kk, vv = (x[bounds_k[i]:bounds_k[i + 1]].transpose(0, 1).double().repeat_interleave(groups, 0) for x in (k, v))
        lq, lk = qq.shape[1], kk.shape[1]
        mask = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        out.append(torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("groups", [1, 3])
def test_the_segment_attention_operator_and_its_gradients_equal_sdpa_per_segment(groups):
    # segments as a shared-prompt stream has them: a query segment shorter than its keys, and an empty one
    torch.manual_seed(0)
    bounds_q, bounds_k = [0, 5, 7, 7, 11], [0, 5, 10, 12, 16]
    q = torch.randn(11, 2 * groups, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(16, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    segments = Segments(torch.tensor(bounds_q, dtype=torch.int32), torch.tensor(bounds_k, dtype=torch.int32), None,
                        8, 8)
    weights = torch.randn(11, 2 * groups, 8, dtype=torch.float64)
    got = segment_attention(q, k, v, segments, 0.3)
    want = reference_attention(q, k, v, bounds_q, bounds_k, 0.3)
    assert torch.allclose(got, want, atol=1e-10)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for g, w in zip(grads, want_grads):
        assert torch.allclose(g, w, atol=1e-10)


@pytest.mark.parametrize("lq,lk", [(6, 6), (3, 7)])
def test_the_written_out_segment_arithmetic_equals_the_cpu_kernel(lq, lk):
    # what the exact path runs off the CPU (float32 on CUDA), against aten's CPU kernel that it runs here
    from aligntrain import packing

    torch.manual_seed(0)
    q, k, v = torch.randn(4, lq, 8, dtype=torch.float64), torch.randn(4, lk, 8, dtype=torch.float64), \
        torch.randn(4, lk, 8, dtype=torch.float64)
    grad = torch.randn(4, lq, 8, dtype=torch.float64)
    out, lse = packing._segment_forward(q, k, v, 0.3)
    written_out, written_lse = packing._written_out_forward(q, k, v, 0.3)
    assert torch.allclose(written_out, out, atol=1e-12) and torch.allclose(written_lse, lse, atol=1e-12)
    for a, b in zip(packing._written_out_backward(grad, q, k, v, out, lse, 0.3),
                    packing._segment_backward(grad, q, k, v, out, lse, 0.3)):
        assert torch.allclose(a, b, atol=1e-10)


def test_the_segment_attention_operator_passes_torch_library_checks():
    # schema, fake (meta) shapes, autograd registration and tracing, as torch.compile relies on them
    torch.manual_seed(0)
    q = torch.randn(9, 4, 8, requires_grad=True)
    k, v = (torch.randn(12, 2, 8, requires_grad=True) for _ in range(2))
    cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 4, 12], dtype=torch.int32)
    torch.library.opcheck(torch.ops.aligntrain.segment_attention.default, (q, k, v, cu_q, cu_k, None))


def batches(shards, task, layouts, rows=8):
    split = ShardSplit(shards, "train", read_manifest(shards))
    picked = split.rows(list(range(rows)))
    return {layout: collate(picked, task, 0, layout) for layout in layouts}


@pytest.mark.parametrize("task,layout", [("sft", PACKED), ("dpo", PACKED), ("dpo", SHARED)])
def test_log_probs_and_gradients_equal_the_padded_path(tiny_model, sft_shards, dpo_shards, task, layout):
    shards = sft_shards if task == "sft" else dpo_shards
    got = batches(shards, task, [PADDED, layout])
    results = {}
    for name, batch in got.items():
        lm = load_causal_lm(tiny_model, "float32")
        if name != PADDED:
            use_packed_attention(lm)
        logps, tokens = SequenceLogps(lm, chunk_tokens=7)(**model_inputs(batch))
        (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()  # a different weight per sequence
        results[name] = logps.detach(), tokens, {n: p.grad for n, p in lm.named_parameters()}
    (padded, padded_tokens, padded_grads), (packed, packed_tokens, packed_grads) = results[PADDED], results[layout]
    assert packed_tokens.tolist() == padded_tokens.tolist()
    assert torch.allclose(packed, padded, atol=1e-5), (packed - padded).abs().max()
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5), name
    assert got[layout]["lengths"].tolist() == got[PADDED]["lengths"].tolist()
    if layout == SHARED:  # each prompt forwarded once
        assert got[layout]["input_ids"].numel() < got[PADDED]["attention_mask"].sum()


def test_a_packed_batch_on_a_model_without_packed_attention_is_refused(tiny_model, sft_shards):
    batch = batches(sft_shards, "sft", [PACKED])[PACKED]
    with pytest.raises(RuntimeError, match="without packed attention"):
        SequenceLogps(load_causal_lm(tiny_model, "float32"))(**model_inputs(batch))


def test_layout_follows_padding_free_and_the_model(tmp_path, tiny_model):
    lm = load_causal_lm(tiny_model, "float32")
    dpo = {"loss": {"name": "dpo"}}
    assert choose_layout(cfg_for(tmp_path, tiny_model, "a", **dpo), lm) == (SHARED, None)
    assert choose_layout(cfg_for(tmp_path, tiny_model, "b", share_prompt=False, **dpo), lm) == (PACKED, None)
    assert choose_layout(cfg_for(tmp_path, tiny_model, "c"), lm) == (PACKED, None)
    assert choose_layout(cfg_for(tmp_path, tiny_model, "d", padding_free=False), lm) == (PADDED, None)
    eager = {"model": {"attn_implementation": "eager"}}
    assert choose_layout(cfg_for(tmp_path, tiny_model, "e", **eager), lm) == (
        PADDED, "padded batches: model.attn_implementation is eager")
    with pytest.raises(ConfigError, match="padding_free: true, but model.attn_implementation is eager"):
        choose_layout(cfg_for(tmp_path, tiny_model, "f", padding_free=True, **eager), lm)


def test_token_budget_counts_real_tokens_when_padding_free():
    widths = np.array([10, 10, 10, 10])
    sizes = np.array([6, 6, 6, 6])  # what each row adds to a stream
    assert [p.tolist() for p in micro_batches(np.arange(4), widths, 1, 20, 1)] == [[0, 1], [2, 3]]
    assert [p.tolist() for p in micro_batches(np.arange(4), widths, 1, 20, 1, sizes=sizes)] == [[0, 1, 2], [3]]


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_training_padding_free_equals_padded(tmp_path, tiny_model, sft_shards, dpo_shards, task):
    shards = sft_shards if task == "sft" else dpo_shards
    loss = {"loss": {"name": task}, "tokens_per_batch": 200, "n_examples": 24}
    padded = train(cfg_for(tmp_path, tiny_model, "padded", padding_free=False, **loss), shards)
    packed = train(cfg_for(tmp_path, tiny_model, "packed", padding_free=True, **loss), shards)
    recomputed = train(cfg_for(tmp_path, tiny_model, "ckpt", padding_free=True, activation_checkpointing=True, **loss),
                       shards)  # the layout reaches the attention of layers run again in backward
    for a, b, c in zip(padded.history, packed.history, recomputed.history):
        for key in ("loss", "grad_norm", "input_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
            assert c[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    saved = (packed.checkpoint / "config.json").read_text()
    assert PACKED_ATTENTION not in saved  # checkpoints load anywhere, without aligntrain's attention


def test_sft_training_with_the_heads_gradients_in_the_forward_equals_the_recomputed_head(monkeypatch, tmp_path,
                                                                                          tiny_model, sft_shards):
    """SFT's default (modeling.HEAD_GRAD_IN_FORWARD) over several micro-batches a step, both layouts."""
    from aligntrain import modeling

    calls = []
    real = modeling.head_logps_uniform_grad
    monkeypatch.setattr(modeling, "head_logps_uniform_grad", lambda *a: calls.append(1) or real(*a))
    for padding_free in (False, True):
        cfg = {"loss": {"name": "sft"}, "tokens_per_batch": 120, "n_examples": 24, "padding_free": padding_free}
        fused = train(cfg_for(tmp_path, tiny_model, f"fused{padding_free}", **cfg), sft_shards)
        assert len(calls) >= 2 * len(fused.history)  # every micro-batch of every step (two or more per step)
        calls.clear()
        monkeypatch.setattr(modeling, "HEAD_GRAD_IN_FORWARD", False)
        plain = train(cfg_for(tmp_path, tiny_model, f"plain{padding_free}", **cfg), sft_shards)
        monkeypatch.setattr(modeling, "HEAD_GRAD_IN_FORWARD", True)
        assert not calls
        assert len(plain.history) == len(fused.history) > 1
        for a, b in zip(plain.history, fused.history):
            for key in ("loss", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def test_mfu_of_a_step_is_its_useful_flops_over_the_cards_peak(tmp_path, tiny_model):
    from types import SimpleNamespace

    from aligntrain.flops import training_flops
    from aligntrain.trainer import Objective

    cfg = cfg_for(tmp_path, tiny_model, loss={"name": "dpo"})
    config = load_causal_lm(tiny_model, "float32").config
    cpu = SimpleNamespace(device=torch.device("cpu"))
    assert Objective(cfg, None, cpu, SHARED, config).mfu(1000, 500, 2.0) is None  # no GPU, no MFU
    objective = Objective(cfg, None, cpu, SHARED, config)
    objective.device_name = "NVIDIA H200"
    expected = training_flops(config, 1000, 500) / (2.0 * 989e12)  # reference precomputed: no forward of it
    assert objective.mfu(1000, 500, 2.0) == pytest.approx(expected)
    objective.reference = object()  # a live reference adds its forward
    assert objective.mfu(1000, 500, 2.0) == pytest.approx(training_flops(config, 1000, 500, 1000, 500) / (2.0 * 989e12))



ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3_text", "gpt_neox", "olmo2", "granite",
                 "cohere", "starcoder2", "phi", "gpt2"]


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_every_architecture_that_packs_gives_the_padded_log_probs(kind):
    """Tiny random models of each family (rotary or absolute positions, partial rotary, q/k norms, sliding
    windows wider than the sequences): the shared-prompt stream's log-probs and gradients equal the padded
    batch's in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aligntrain.packing import packing_unavailable

    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=300, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = AutoConfig.for_model(kind, **dims)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    rows = [{"prompt_ids": rng.integers(3, 300, p).tolist(), "chosen_ids": rng.integers(3, 300, c).tolist(),
             "rejected_ids": rng.integers(3, 300, r).tolist()} for p, c, r in [(5, 7, 3), (1, 4, 9), (12, 2, 2)]]
    results = {}
    for layout in (PADDED, SHARED):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        disable_dropout(lm)  # as load_causal_lm does (GPT-2's config has 10% dropout)
        assert packing_unavailable(lm, "sdpa", max_length=64) is None
        if layout != PADDED:
            use_packed_attention(lm)
        logps, _ = SequenceLogps(lm)(**model_inputs(collate(rows, "dpo", 0, layout)))
        logps.sum().backward()
        results[layout] = logps.detach(), {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}
    (padded, padded_grads), (shared, shared_grads) = results[PADDED], results[SHARED]
    assert torch.allclose(shared, padded, atol=1e-5), (shared - padded).abs().max()
    for name, grad in padded_grads.items():
        assert torch.allclose(shared_grads[name], grad, atol=1e-5), name


def test_a_sliding_window_shorter_than_max_length_keeps_batches_padded():
    from transformers import AutoConfig, AutoModelForCausalLM

    from aligntrain.packing import packing_unavailable

    config = AutoConfig.for_model("mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300, sliding_window=16)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert packing_unavailable(lm, "sdpa", 16) is None
    assert packing_unavailable(lm, "sdpa", 64) == ("the model uses sliding-window attention (16 tokens) and "
                                                   "max_length is 64")
