"""FlashAttention 4 as the padding-free attention's kernel (aligntrain/flash4.py), on the CPU: the package's
two entry points are stood in for by the exact per-segment arithmetic, which checks everything of ours
around them (the custom operators, their fake shapes, the arguments passed, the autograd formula). The
kernels themselves run in test_train_gpu.py."""

import sys
import types

import pytest
import torch

from aligntrain import flash4, packing
from aligntrain.packing import Segments


@pytest.fixture
def stand_in(monkeypatch):
    """flash_attn.cute.interface with _flash_attn_fwd/_bwd computed by packing's exact path; the calls made."""
    calls = []

    def fwd(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None,
            causal=False, return_lse=False):
        calls.append(("fwd", max_seqlen_q, max_seqlen_k, softmax_scale, causal, return_lse))
        out, lse = packing._per_segment_forward(q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), softmax_scale)
        return out, lse, None, None, None  # float32 for the 16-bit inputs FA4 takes

    def bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q=None, max_seqlen_k=None):
        calls.append(("bwd", max_seqlen_q, max_seqlen_k, softmax_scale, causal))
        return packing._per_segment_backward(dout, q, k, v, out, lse, cu_seqlens_q.tolist(),
                                             cu_seqlens_k.tolist(), softmax_scale)

    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = fwd, bwd
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface
    package = types.ModuleType("flash_attn")
    package.cute = cute
    for name, module in (("flash_attn", package), ("flash_attn.cute", cute), ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_the_fa4_path_gives_the_exact_attention_and_gradients(monkeypatch, stand_in):
    # a shared-prompt stream's segments (a query segment shorter than its keys, an empty one), grouped heads
    monkeypatch.setattr(flash4, "applies", lambda q: True)
    torch.manual_seed(0)
    bounds_q, bounds_k = [0, 5, 7, 7, 11], [0, 5, 10, 12, 16]
    cu_q, cu_k = torch.tensor(bounds_q, dtype=torch.int32), torch.tensor(bounds_k, dtype=torch.int32)
    q = torch.randn(11, 6, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(16, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weights = torch.randn(11, 6, 8, dtype=torch.float64)
    got = packing._FlashSegments.apply(q, k, v, cu_q, cu_k, 8, 16, 0.3)
    want = torch.ops.aligntrain.segment_attention(q, k, v, cu_q, cu_k, 0.3)[0]
    assert torch.allclose(got, want, atol=1e-12)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for g, w in zip(grads, want_grads):
        assert torch.allclose(g, w, atol=1e-12)
    # causal, the logsumexp asked for, the run's segment bounds and the model's scale passed through
    assert stand_in == [("fwd", 8, 16, 0.3, True, True), ("bwd", 8, 16, 0.3, True)]


def test_the_fa4_operators_pass_torch_library_checks(stand_in):
    # schema and fake shapes (the logsumexp [heads, tokens] in float32), as a compiled layer relies on them
    torch.manual_seed(0)
    q, k, v = torch.randn(9, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 4, 12], dtype=torch.int32)
    torch.library.opcheck(torch.ops.aligntrain.fa4_forward.default, (q, k, v, cu_q, cu_k, 5, 8, 0.3))
    out, lse = torch.ops.aligntrain.fa4_forward(q, k, v, cu_q, cu_k, 5, 8, 0.3)
    assert out.shape == q.shape and lse.shape == (4, 9) and lse.dtype == torch.float32
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.aligntrain.fa4_backward.default, (grad, q, k, v, out, lse, cu_q, cu_k, 5, 8, 0.3))


def test_segment_attention_takes_fa4_only_where_it_applies(monkeypatch):
    # on the CPU (and in float32 anywhere) the flash path is never taken, FA4 on or off
    monkeypatch.setattr(flash4, "ENABLED", True)
    q = torch.randn(4, 2, 8)
    assert not flash4.applies(q) and not flash4.applies(q.bfloat16())
    segments = Segments(torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32), None, 4, 4)
    out = packing.segment_attention(q, q, q, segments, None)
    assert torch.allclose(out, torch.ops.aligntrain.segment_attention(q, q, q, segments.cu_q, segments.cu_k, None)[0])


def test_enabling_fa4_without_a_gpu_says_why_and_stays_off(monkeypatch):
    monkeypatch.setattr(flash4, "ENABLED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    flash4.unavailable.cache_clear()
    try:
        assert flash4.enable(True) == "no CUDA device"
        assert flash4.ENABLED is False
        assert flash4.enable(False) is None and flash4.ENABLED is False
    finally:
        flash4.unavailable.cache_clear()


def test_the_config_choice_on_a_machine_without_fa4(monkeypatch):
    # null falls back to FA2 silently; an explicit fa4 that cannot run is refused with the reason; fa2 is FA2
    from aligntrain.config import ConfigError

    monkeypatch.setattr(flash4, "ENABLED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    flash4.unavailable.cache_clear()
    try:
        assert flash4.configure(None, torch.device("cpu"), True, 4096) is None and not flash4.ENABLED
        assert flash4.configure("fa2", torch.device("cpu"), True, 4096) is None and not flash4.ENABLED
        with pytest.raises(ConfigError, match="model.flash_attention: fa4 .*no CUDA device"):
            flash4.configure("fa4", torch.device("cpu"), True, 4096)
        with pytest.raises(ConfigError, match="padded batches"):
            flash4.configure("fa4", torch.device("cuda"), False, 4096)
        with pytest.raises(ConfigError, match="no CUDA device; install flash-attn-4"):
            flash4.configure("fa4", torch.device("cuda"), True, 4096)
        assert not flash4.ENABLED
    finally:
        flash4.unavailable.cache_clear()


def test_a_training_run_with_flash_attention_set_trains_on_the_cpu(tmp_path, tiny_model, sft_shards):
    # the key is accepted and, on the CPU, fa2 and null change nothing (the exact path runs either way)
    import yaml
    from trainer_fixtures import base_config

    from aligntrain.config import load_config
    from aligntrain.trainer import train

    runs = []
    for name, choice in (("null", None), ("fa2", "fa2")):
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(base_config(tiny_model, tmp_path / name, n_examples=8, total_batch_size=4,
                                                   model={"flash_attention": choice})))
        runs.append(train(load_config(path), sft_shards))
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]


def test_null_takes_fa4_only_for_models_at_least_fa4_from_width_wide(monkeypatch):
    # where FA4 can run: null picks it from FA4_FROM_WIDTH up and says why not below; fa4 takes it at any width
    monkeypatch.setattr(flash4, "ENABLED", False)
    monkeypatch.setattr(flash4, "unavailable", lambda index=0: None)
    cuda = torch.device("cuda")
    try:
        note = flash4.configure(None, cuda, True, flash4.FA4_FROM_WIDTH - 1)
        assert not flash4.ENABLED and "not FA4" in note and "fa4 takes it anyway" in note
        assert "FlashAttention 4" in flash4.configure(None, cuda, True, flash4.FA4_FROM_WIDTH) and flash4.ENABLED
        assert flash4.configure("fa2", cuda, True, 4096) is None and not flash4.ENABLED
        assert "FlashAttention 4" in flash4.configure("fa4", cuda, True, 64) and flash4.ENABLED
        assert flash4.configure(None, cuda, False, 4096) is None and not flash4.ENABLED  # padded batches: FA2 (SDPA)
        assert flash4.configure(None, cuda, True, 4096, graphs=True) is None and not flash4.ENABLED  # CUDA graphs
    finally:
        flash4.enable(False)


def test_attention_width_is_query_heads_times_head_dim():
    from types import SimpleNamespace

    assert flash4.attention_width(SimpleNamespace(num_attention_heads=32, head_dim=64, hidden_size=2048)) == 2048
    assert flash4.attention_width(SimpleNamespace(num_attention_heads=8, head_dim=256, hidden_size=1536)) == 2048
    assert flash4.attention_width(SimpleNamespace(num_attention_heads=14, hidden_size=896)) == 896


def test_a_failing_fa4_call_says_what_it_was_given_and_how_to_avoid_it(monkeypatch, stand_in):
    def broken(*args, **kwargs):
        raise ValueError("no kernel for this\nsecond line")

    monkeypatch.setattr(sys.modules["flash_attn.cute.interface"], "_flash_attn_fwd", broken)
    q, k = torch.randn(9, 4, 8), torch.randn(9, 2, 8)
    cu = torch.tensor([0, 9], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"FlashAttention 4 \(flash-attn-4\) failed in its forward on 4 query and 2 "
                                           r"key/value heads of dim 8, float32 \(ValueError: no kernel for this\); "
                                           r"model.flash_attention: fa2"):
        torch.ops.aligntrain.fa4_forward(q, k, k, cu, cu, 9, 9, None)


def test_an_fa4_package_without_the_entry_points_used_here_is_unavailable(monkeypatch, stand_in):
    monkeypatch.delattr(sys.modules["flash_attn.cute.interface"], "_flash_attn_bwd")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))
    flash4.unavailable.cache_clear()
    try:
        assert "has no _flash_attn_bwd" in flash4.unavailable(0)
    finally:
        flash4.unavailable.cache_clear()


def test_fa4_with_cuda_graphs_is_refused_at_load(tmp_path, tiny_model):
    import yaml
    from trainer_fixtures import base_config

    from aligntrain.config import ConfigError, load_config

    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(base_config(tiny_model, tmp_path / "run", cuda_graphs=True,
                                               model={"flash_attention": "fa4"})))
    with pytest.raises(ConfigError, match="model.flash_attention.*fa4.*cuda_graphs: false"):
        load_config(path)
