"""GPU paths: bf16/fp16 mixed precision on CUDA, FSDP over two GPUs, log-prob memory. Skipped without CUDA."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from trainer_fixtures import base_config, make_shards

from aligntrain.config import load_config
from aligntrain.modeling import SequenceLogps
from aligntrain.trainer import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def cfg_for(tmp_path, model_dir, name="cfg", **changes):
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(base_config(model_dir, tmp_path / f"run-{name}", **changes)))
    return load_config(path), path


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_on_cuda_trains(tmp_path, tiny_model, sft_shards, dtype):
    fp32 = train(cfg_for(tmp_path, tiny_model, "fp32", n_epochs=2)[0], sft_shards)
    mixed = train(cfg_for(tmp_path, tiny_model, dtype, n_epochs=2, model={"policy_dtype": dtype})[0], sft_shards)
    low, exact = [h["loss"] for h in mixed.history], [h["loss"] for h in fp32.history]
    assert low == pytest.approx(exact, rel=3e-2)
    assert low[-1] < low[0]


def _launch(tmp_path, shards, cfg_path, out, processes, *overrides):
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--multi_gpu"] if processes > 1 else []
    command += ["-m", "aligntrain", "sft", str(shards), str(cfg_path), "--json",
                "--overrides", f"output_dir={tmp_path / out}", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"], json.loads(done.stdout)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fsdp_over_two_gpus_matches_one_process_and_resumes(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    shards = make_shards("sft", tmp_path / "shards", tiny_model)
    _, cfg_path = cfg_for(tmp_path, tiny_model, n_examples=24, save_every_steps=1)
    one, _ = _launch(tmp_path, shards, cfg_path, "one", 1)
    fsdp, summary = _launch(tmp_path, shards, cfg_path, "fsdp", 2, "trainer=FSDPTrainer")
    assert fsdp == pytest.approx(one, rel=1e-4)
    AutoModelForCausalLM.from_pretrained(summary["checkpoint"])  # the FSDP checkpoint is a plain HF model
    # stop after step 2, resume to step 3 under FSDP: the same step-3 loss as the straight run
    first, _ = _launch(tmp_path, shards, cfg_path, "resumed", 2, "trainer=FSDPTrainer", "n_examples=16")
    assert first == pytest.approx(fsdp[:2], rel=1e-4)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "aligntrain", "sft", str(shards), str(cfg_path), "--resume", "--json", "--overrides",
                           f"output_dir={tmp_path / 'resumed'}", "trainer=FSDPTrainer"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if r["split"] == "train"] == pytest.approx(fsdp, rel=1e-4)


def test_completion_log_probs_need_far_less_memory_than_full_logits():
    """Peak memory of forward + backward: ours (chunked, checkpointed lm-head) against the naive
    float32 log_softmax over [batch, seq, vocab] logits, on a 128k vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128_000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    lm = LlamaForCausalLM(config).cuda()
    ids = torch.randint(0, 128_000, (8, 1024), device="cuda")
    attention = torch.ones_like(ids)
    mask = torch.zeros_like(ids)
    mask[:, 512:] = 1

    def peak(fn):
        lm.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fn().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def naive():
        logits = lm(input_ids=ids, attention_mask=attention).logits.float()
        logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (logps * mask[:, 1:]).sum(-1)

    ours = peak(lambda: SequenceLogps(lm, chunk_tokens=1024)(ids, attention, mask)[0])
    theirs = peak(naive)
    print(f"peak memory: chunked {ours / 2**30:.2f} GiB, full logits {theirs / 2**30:.2f} GiB")
    assert ours < theirs / 3


def test_lora_dpo_in_bfloat16_on_cuda_trains_against_the_base_as_reference(tmp_path, tiny_model, dpo_shards):
    lora = {"policy_dtype": "bfloat16", "reference_dtype": "bfloat16", "lora": {"r": 4}}
    cfg, _ = cfg_for(tmp_path, tiny_model, n_epochs=2, lr=1e-2, activation_checkpointing=True,
                     loss={"name": "dpo"}, model=lora)
    losses = [h["loss"] for h in train(cfg, dpo_shards).history]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # adapters start at zero: policy == reference
    assert losses[-1] < losses[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_lora_under_fsdp_over_two_gpus_matches_one_process(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shards = make_shards("sft", tmp_path / "shards", tiny_model)
    lora = {"policy_dtype": "bfloat16", "reference_dtype": "bfloat16", "lora": {"r": 4, "modules_to_save": ["lm_head"]}}
    _, cfg_path = cfg_for(tmp_path, tiny_model, n_examples=24, save_every_steps=1, model=lora)
    one, _ = _launch(tmp_path, shards, cfg_path, "one", 1)
    fsdp, summary = _launch(tmp_path, shards, cfg_path, "fsdp", 2, "trainer=FSDPTrainer")
    assert fsdp == pytest.approx(one, rel=1e-2)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), summary["checkpoint"])


def test_attention_without_cudnn_gives_the_same_logps_and_gradients(tiny_model):
    """model.cudnn_attention: false keeps SDPA off cuDNN's kernel (flash / memory-efficient instead):
    same log-probs and gradients within bf16 tolerance, on a padded batch (a 4D mask)."""
    from aligntrain.modeling import load_causal_lm

    lm = load_causal_lm(tiny_model, "bfloat16").cuda()
    ids = torch.randint(3, lm.config.vocab_size, (3, 40), device="cuda")
    attention = torch.ones_like(ids)
    attention[1, 30:] = 0
    attention[2, 12:] = 0
    mask = attention.clone()
    mask[:, :5] = 0
    results = []
    for cudnn in (True, False):
        lm.zero_grad(set_to_none=True)
        logps, _ = SequenceLogps(lm, cudnn_attention=cudnn)(ids, attention, mask)
        logps.sum().backward()
        results.append((logps.detach().float(), torch.cat([p.grad.float().flatten() for p in lm.parameters()])))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, rtol=1e-2, atol=1e-1)
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.999


@pytest.mark.parametrize("task,layout", [("sft", "packed"), ("dpo", "packed"), ("dpo", "shared-prompt")])
def test_padding_free_varlen_flash_equals_the_padded_path_on_cuda(tiny_model, sft_shards, dpo_shards, task, layout,
                                                                  monkeypatch):
    """The padding-free stream runs torch's varlen flash attention on CUDA (bf16): same per-sequence log-probs
    and gradients as the padded batch within bf16 tolerance; the shared prompt's bottom-right causal
    alignment is what makes the rejected completions agree."""
    from aligndata.write.shards import read_manifest
    from aligntrain import packing
    from aligntrain.data import ShardSplit, collate, to_device
    from aligntrain.modeling import load_causal_lm, model_inputs

    flash_calls = []
    real = packing._flash_applies
    monkeypatch.setattr(packing, "_flash_applies", lambda q: flash_calls.append(real(q)) or flash_calls[-1])
    shards = sft_shards if task == "sft" else dpo_shards
    rows = ShardSplit(shards, "train", read_manifest(shards)).rows(list(range(8)))
    results = []
    for name in ("padded", layout):
        lm = load_causal_lm(tiny_model, "float32").cuda()  # float32 master weights under bf16 autocast, as trained
        if name != "padded":
            packing.use_packed_attention(lm)
        batch = to_device(collate(rows, task, 0, name), torch.device("cuda"))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logps, _ = SequenceLogps(lm)(**model_inputs(batch))
        logps.sum().backward()
        results.append((logps.detach().float(), torch.cat([p.grad.float().flatten() for p in lm.parameters()])))
    (a, ga), (b, gb) = results
    assert any(flash_calls), "the varlen flash kernel did not run"
    assert torch.allclose(a, b, rtol=1e-2, atol=2e-1), (a - b).abs().max()
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.999


@pytest.mark.parametrize("task,layout", [("sft", "packed"), ("dpo", "shared-prompt"), ("dpo", "padded")])
def test_compiled_layers_and_head_equal_eager_on_cuda(tiny_model, sft_shards, dpo_shards, task, layout):
    """Inductor's decoder layers (sibling linears fused) and head log-softmax (compile: null compiles on one GPU):
    the same per-sequence log-probs and gradients as eager within bf16 tolerance, on two batches of different
    lengths."""
    from aligndata.write.shards import read_manifest
    from aligntrain import packing
    from aligntrain.data import ShardSplit, collate, to_device
    from aligntrain.modeling import load_causal_lm, model_inputs

    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    shards = sft_shards if task == "sft" else dpo_shards
    split = ShardSplit(shards, "train", read_manifest(shards))
    results = {}
    for compiled in (False, True):
        lm = load_causal_lm(tiny_model, "float32").cuda()
        if layout != "padded":
            packing.use_packed_attention(lm)
        model = SequenceLogps(lm, chunk_tokens=64, compiled=compiled)
        runs = []
        for rows in (range(6), range(6, 14)):
            lm.zero_grad()
            batch = to_device(collate(split.rows(list(rows)), task, 0, layout), torch.device("cuda"))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logps, _ = model(**model_inputs(batch))
            logps.sum().backward()
            runs.append((logps.detach().float(), torch.cat([p.grad.float().flatten() for p in lm.parameters()])))
        results[compiled] = runs
    assert not counters["graph_break"], dict(counters["graph_break"])  # the flash custom op traced into the layer
    for (a, ga), (b, gb) in zip(results[False], results[True]):
        assert torch.allclose(a, b, rtol=1e-2, atol=2e-1), (a - b).abs().max()
        assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.999


def _sft_batch(shards, device: str = "cuda") -> dict:
    """One padding-free SFT batch of the shards' first 12 rows, on `device`."""
    from aligndata.write.shards import read_manifest
    from aligntrain.data import ShardSplit, collate, to_device

    split = ShardSplit(shards, "train", read_manifest(shards))
    return to_device(collate(split.rows(list(range(12))), "sft", 0, "packed"), torch.device(device))


def _sft_head_run(model_dir, batch: dict, device: str = "cuda", **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, every parameter's gradient flattened) of `batch` through a fresh SequenceLogps(**options)
    of the model, in bf16 autocast, for the loss -sum(logps) / 100."""
    from aligntrain import packing
    from aligntrain.modeling import load_causal_lm, model_inputs

    lm = load_causal_lm(model_dir, "float32").to(device)
    packing.use_packed_attention(lm)
    model = SequenceLogps(lm, **options)
    with torch.autocast(device, dtype=torch.bfloat16):
        logps, _ = model(**model_inputs(batch))
    (-logps.sum() / 100).backward()
    return logps.detach(), torch.cat([p.grad.flatten() for p in lm.parameters()])


@pytest.mark.parametrize("compiled", [False, True])
def test_head_gradients_in_the_forward_on_cuda_follow_the_recomputed_head(tiny_model, sft_shards, compiled):
    """SFT's head (uniform_grad: gradients in the forward, accumulated into float32 by cuBLAS) against the
    checkpointed head, in bf16 autocast on a padding-free stream: the same log-probs and, within bf16
    tolerance, the same gradients."""
    from aligntrain import modeling

    import torch._dynamo

    torch._dynamo.reset()
    batch = _sft_batch(sft_shards)
    (a, ga), (b, gb) = (_sft_head_run(tiny_model, batch, chunk_tokens=16, compiled=compiled, uniform_grad=uniform)
                        for uniform in (False, True))
    assert modeling._ADDMM_TO_FLOAT32.get("cuda:0"), "this torch has no float32-accumulating addmm on CUDA"
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-2), (a - b).abs().max()
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.999


@pytest.mark.parametrize("vocab,rows", [(50_000, 37), (128_256, 300), (7, 5)])
def test_the_triton_head_kernel_equals_the_log_softmax_and_its_gradient(vocab, rows):
    """kernels.logps_and_grad_ against compiling.logps_and_grad in float32: log-probs to 1e-4, the bf16
    gradient to one bf16 step, written over the logits (the returned gradient is the logits tensor); a
    vocabulary that is no multiple of the kernel's block and one smaller than it."""
    from aligntrain import compiling, kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(rows, vocab, device="cuda", generator=gen) * 4).to(torch.bfloat16)
    logits[0, :vocab // 2] = -60.0  # a row whose mass sits in its second half
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    expected_logps, expected_grad = compiling.logps_and_grad(logits.float(), targets)
    assert kernels.applies(logits, None) and not kernels.applies(logits, 30.0) and not kernels.applies(logits.float(), None)
    buffer = logits.clone()
    logps, grad = kernels.logps_and_grad_(buffer, targets)
    assert grad.data_ptr() == buffer.data_ptr() and grad.dtype == torch.bfloat16
    assert torch.allclose(logps, expected_logps, atol=1e-4, rtol=1e-5), (logps - expected_logps).abs().max()
    assert torch.allclose(grad.float(), expected_grad, atol=4e-3, rtol=1e-2), (grad.float() - expected_grad).abs().max()
    assert torch.allclose(grad.float().sum(-1), torch.zeros(rows, device="cuda"), atol=0.05)


def test_sfts_head_in_chunks_of_two_gib_equals_chunks_of_16_rows_on_cuda(tiny_model, sft_shards):
    """logprob_chunk_tokens unset: SFT's head on CUDA runs its rows in one chunk (2 GiB of logits holds
    them all), through the Triton kernel; the same log-probs and gradients as 16-row chunks."""
    from transformers import AutoConfig

    from aligntrain.modeling import head_chunk_rows

    batch = _sft_batch(sft_shards)
    (a, ga), (b, gb) = (_sft_head_run(tiny_model, batch, chunk_tokens=chunk, compiled=True, uniform_grad=True)
                        for chunk in (16, None))
    assert head_chunk_rows(None, AutoConfig.from_pretrained(tiny_model).vocab_size, 2, True) > len(batch["targets"])
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-2), (a - b).abs().max()
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,width", [(300, 8192), (37, 4864), (1, 100)])
def test_the_swiglu_kernels_equal_torchs_silu_times_up(dtype, rows, width):
    """kernels.swiglu / swiglu_backward on CUDA (the Triton kernels) against the float32 reference rounded
    once: the same values up to the last bit of the 16-bit result; widths that are no multiple of the block."""
    from aligntrain import kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = (torch.randn(rows, 2 * width, device="cuda", generator=gen) * 3).to(dtype)
    grad = torch.randn(rows, width, device="cuda", generator=gen).to(dtype)
    assert kernels.swiglu_serves(gate_up.device, dtype) and not kernels.swiglu_serves(gate_up.device, torch.float32)
    out, back = kernels.swiglu(gate_up), kernels.swiglu_backward(grad, gate_up)
    assert kernels.SWIGLU_ENABLED and out.shape == (rows, width) and back.shape == gate_up.shape
    torch.testing.assert_close(out, kernels.swiglu_reference(gate_up))
    torch.testing.assert_close(back, kernels.swiglu_backward_reference(grad, gate_up))


def test_swiglu_in_the_compiled_layers_on_cuda_follows_inductors_own_product(monkeypatch, tiny_model, sft_shards):
    """Inductor's layers with the MLP's silu(gate) * up as aligntrain::swiglu (fuse_swiglu, the default on
    CUDA) against the same layers without it: the same log-probs and gradients within bf16 tolerance."""
    from aligntrain import compiling

    import torch._dynamo

    replaced = []
    fuse = compiling.fuse_swiglu
    monkeypatch.setattr(compiling, "fuse_swiglu", lambda graph: replaced.append(fuse(graph)) or replaced[-1])
    batch = _sft_batch(sft_shards)
    runs = []
    for on in (False, True):
        torch._dynamo.reset()
        monkeypatch.setattr(compiling, "FUSE_SWIGLU", on)
        runs.append(_sft_head_run(tiny_model, batch, chunk_tokens=16, compiled=True, uniform_grad=True))
    assert replaced and 1 in replaced, replaced
    (a, ga), (b, gb) = runs
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-2), (a - b).abs().max()
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.999


@pytest.mark.parametrize("groups", [1, 7])
def test_the_segment_attention_operator_on_cuda_equals_the_exact_one(groups):
    """The flash path of aligntrain::segment_attention (bf16, a bound of 1024 far above the segments, as a run's
    max_length gives it) against float64 SDPA per segment, forward and gradients; a shared prompt's shorter
    query segment and an empty one included."""
    from test_train_packing import reference_attention

    from aligntrain.packing import Segments, segment_attention

    torch.manual_seed(0)
    bounds_q, bounds_k = [0, 50, 70, 70, 181], [0, 50, 150, 160, 271]
    q = torch.randn(181, 2 * groups, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(271, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    cu = [torch.tensor(b, dtype=torch.int32, device="cuda") for b in (bounds_q, bounds_k)]
    got = segment_attention(q, k, v, Segments(cu[0], cu[1], None, 1024, 1024), 0.125)
    want = reference_attention(q, k, v, bounds_q, bounds_k, 0.125)
    assert torch.allclose(got.double(), want, atol=2e-2), (got.double() - want).abs().max()
    weights = torch.randn(got.shape, device="cuda", dtype=torch.float64)
    grads = torch.autograd.grad((got.double() * weights).sum(), (q, k, v))
    exact = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for g, w in zip(grads, exact):  # bf16 inputs, outputs and gradients: about 3 significant digits each
        assert torch.nn.functional.cosine_similarity(g.double().flatten(), w.flatten(), dim=0) > 0.995


def test_training_compiled_on_cuda_follows_eager(tmp_path, tiny_model, dpo_shards):
    common = dict(loss={"name": "dpo"}, n_examples=32, total_batch_size=8,
                  model={"policy_dtype": "bfloat16", "reference_dtype": "bfloat16"})
    eager = train(cfg_for(tmp_path, tiny_model, "eager", compile=False, **common)[0], dpo_shards)
    compiled = train(cfg_for(tmp_path, tiny_model, "compiled", **common)[0], dpo_shards)  # compile: null -> on
    assert len(compiled.history) == len(eager.history) > 1
    for a, b in zip(eager.history, compiled.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2, abs=2e-2)



def test_the_next_steps_batches_prefetched_on_cuda_change_nothing(monkeypatch, tmp_path, tiny_model, sft_shards):
    """The next step's batches go to the GPU from pinned memory without the host waiting, during the backward:
    the same losses and gradient norms as batches collated and copied at the start of their step."""
    import aligntrain.trainer as trainer_module

    common = dict(n_examples=32, total_batch_size=8, max_grad_norm=0.5, compile=False)
    prefetched = train(cfg_for(tmp_path, tiny_model, "prefetched", **common)[0], sft_shards)
    monkeypatch.setattr(trainer_module, "PREFETCH", False)
    in_turn = train(cfg_for(tmp_path, tiny_model, "in-turn", **common)[0], sft_shards)
    assert len(prefetched.history) == len(in_turn.history) == 4
    for a, b in zip(in_turn.history, prefetched.history):
        for key in ("loss", "grad_norm", "input_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


@pytest.mark.parametrize("mp", [None, torch.bfloat16])
def test_fsdp2_on_one_gpu_follows_the_unsharded_fast_path(tiny_model, sft_shards, mp):
    """FSDP2 as trainer: FSDPTrainer applies it (sharding.py), over a one-rank NCCL group: compiled layers,
    the head's gradients in the forward, a padding-free stream, bf16 autocast (and bf16 gathered weights and
    reduced gradients, fsdp_policy_mp), two micro-batches accumulated: the unsharded model's log-probs and,
    within bf16 tolerance, its gradients."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import torch._dynamo
    from aligndata.write.shards import read_manifest
    from aligntrain import packing, sharding
    from aligntrain.data import ShardSplit, collate, to_device
    from aligntrain.modeling import load_causal_lm, model_inputs

    torch._dynamo.reset()
    split = ShardSplit(sft_shards, "train", read_manifest(sft_shards))
    batches = [to_device(collate(split.rows(list(rows)), "sft", 0, "packed"), torch.device("cuda"))
               for rows in (range(0, 6), range(6, 12))]
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        results = []
        for shard in (False, True):
            lm = load_causal_lm(tiny_model, "float32").cuda()
            packing.use_packed_attention(lm)
            model = SequenceLogps(lm, chunk_tokens=16, compiled=True, uniform_grad=True)
            if shard:
                sharding.shard(model, torch.device("cuda"), mp)
            logps = []
            for i, batch in enumerate(batches):
                sync = sharding.gradient_sync(model, i == 1) if shard else contextlib.nullcontext()
                with sync, torch.autocast("cuda", dtype=torch.bfloat16):
                    got, _ = model(**model_inputs(batch))
                    (-got.sum() / 100).backward()
                logps.append(got.detach())
            grads = [(p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).float().flatten()
                     for p in model.parameters()]
            results.append((torch.cat(logps), torch.cat(grads)))
    finally:
        dist.destroy_process_group()
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, rtol=1e-2, atol=5e-2), (a - b).abs().max()
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.999


def test_cuda_graphs_of_the_stack_give_the_eager_logps_and_gradients(tiny_model, sft_shards):
    """graphs.GraphedStack recording and replaying the compiled stack in bf16 autocast: three batches of two
    lengths in one bucket (recorded once, replayed twice, the padding different each time), each against the
    same model run eagerly; gradients accumulated into kept .grad buffers across the three."""
    import torch._dynamo
    from aligndata.write.shards import read_manifest
    from aligntrain import packing
    from aligntrain.data import ShardSplit, collate, to_device
    from aligntrain.graphs import GraphedStack, keep_gradients
    from aligntrain.modeling import load_causal_lm, model_inputs

    torch._dynamo.reset()
    split = ShardSplit(sft_shards, "train", read_manifest(sft_shards))
    batches = [to_device(collate(split.rows(list(rows)), "sft", 0, "packed", 128), torch.device("cuda"))
               for rows in (range(0, 6), range(6, 12), range(0, 6))]
    longest = max(b["input_ids"].shape[1] for b in batches)
    results = []
    for graphed in (False, True):
        lm = load_causal_lm(tiny_model, "float32").cuda().train()
        packing.use_packed_attention(lm)
        model = SequenceLogps(lm, chunk_tokens=16, compiled=True, uniform_grad=True)
        if graphed:
            model.graphed = GraphedStack(lm.base_model, [longest + 40])
        keep_gradients(model.parameters())
        logps = []
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                got, _ = model(**model_inputs(batch))
            (-got.sum() / 100).backward()
            logps.append(got.detach())
        results.append((torch.cat(logps), torch.cat([p.grad.flatten() for p in model.parameters()])))
        if graphed:
            assert len(model.graphed.graphs) == 1  # one bucket, one number of segments: recorded once
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, rtol=1e-2, atol=5e-2), (a - b).abs().max()
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.999


def test_training_with_cuda_graphs_follows_training_without(tmp_path, tiny_model, sft_shards):
    """cuda_graphs: true against false, bf16, compiled, two micro-batches a step: the same losses within bf16
    noise, and the model learns."""
    changes = dict(n_epochs=2, lr=1e-2, model={"policy_dtype": "bfloat16"})
    plain = train(cfg_for(tmp_path, tiny_model, "plain", **changes)[0], sft_shards)
    graphed = train(cfg_for(tmp_path, tiny_model, "graphed", cuda_graphs=True, **changes)[0], sft_shards)
    want, got = [h["loss"] for h in plain.history], [h["loss"] for h in graphed.history]
    assert got == pytest.approx(want, rel=3e-2)
    assert got[-1] < got[0]


@pytest.mark.parametrize("decoupled", [True, False])
def test_the_master_adam_kernel_equals_its_reference(decoupled):
    """masters.MasterAdam on CUDA (one Triton launch a bucket) against the same optimizer on the CPU (torch
    operations): bf16 gradients with working copies, float32 gradients without, sizes across the kernel's
    chunks, weight decay, clipping, then a step with found_inf that writes nothing."""
    from torch import nn

    from aligntrain import kernels
    from aligntrain.masters import MasterAdam

    assert kernels.triton is not None
    shapes = [(4096 + 5, 3), (1000,), (2, 8192), (7,)]
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g) for s in shapes]

    def build(device):
        params = [nn.Parameter(b.clone().to(device)) for b in base]
        working = {params[0]: params[0].detach().bfloat16(), params[1]: params[1].detach().bfloat16()}
        for copy in working.values():
            copy.requires_grad_(True)
        groups = [{"params": [params[0], params[2]], "weight_decay": 0.1}, {"params": params[1::2], "weight_decay": 0.0}]
        return params, working, MasterAdam(groups, lr=3e-3, decoupled=decoupled, working=working)

    runs = {d: build(d) for d in ("cuda", "cpu")}
    norms = {}
    for step in range(4):
        grads = [torch.randn(s, generator=g) * (20.0 if step == 0 else 1.0) for s in shapes]
        for device, (params, working, opt) in runs.items():
            for p, grad in zip(params, grads):
                target = working.get(p)
                if target is not None:
                    target.grad = grad.bfloat16().to(device)
                else:
                    p.grad = grad.to(device)
            norms[device] = opt.clip_grad_norm_(5.0).item()  # kernels.sum_squares on CUDA
            if step == 3:
                opt.found_inf = torch.ones((), device=device)
            opt.step()
            opt.zero_grad()
        (cuda_params, cuda_working, cuda_opt), (cpu_params, _, cpu_opt) = runs["cuda"], runs["cpu"]
        assert norms["cuda"] == pytest.approx(norms["cpu"], rel=1e-5)
        for a, b in zip(cuda_params, cpu_params):
            torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cuda_opt.state[a]["exp_avg_sq"].cpu(), cpu_opt.state[b]["exp_avg_sq"],
                                       rtol=1e-4, atol=1e-8)  # Adam's L2 term: float32 rounding of g + wd * p
        for master, copy in cuda_working.items():
            assert torch.equal(copy, master.detach().bfloat16())
    assert cuda_opt.state[cuda_params[0]]["step"].item() == 3


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_training_with_working_copies_on_cuda_follows_autocast(tmp_path, tiny_model, sft_shards, dpo_shards, task):
    """Compiled bf16 training on CUDA: working copies (the default there) against autocast's float32
    weights cast on use (working_weights: false)."""
    shards = sft_shards if task == "sft" else dpo_shards
    common = dict(loss={"name": task}, n_examples=32, total_batch_size=8, tokens_per_batch=400,
                  model={"policy_dtype": "bfloat16", "reference_dtype": "bfloat16"})
    autocast = train(cfg_for(tmp_path, tiny_model, "autocast", working_weights=False, **common)[0], shards)
    working = train(cfg_for(tmp_path, tiny_model, "working", **common)[0], shards)
    assert len(working.history) == len(autocast.history) == 4
    for a, b in zip(autocast.history, working.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2, abs=1e-2)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=3e-2)


def _fa4_or_skip():
    from aligntrain import flash4

    reason = flash4.unavailable(torch.cuda.current_device())
    if reason is not None:
        pytest.skip(f"FA4: {reason}")
    return flash4


@pytest.mark.parametrize("groups", [1, 7])
def test_fa4_segment_attention_equals_the_exact_one_and_fa2(monkeypatch, groups):
    """FlashAttention 4 (flash-attn-4) on the segments of test_the_segment_attention_operator_on_cuda_..., forward
    and gradients, against float64 SDPA per segment and against aten's FA2 on the same inputs."""
    from test_train_packing import reference_attention

    from aligntrain.packing import Segments, segment_attention

    flash4 = _fa4_or_skip()
    torch.manual_seed(0)
    bounds_q, bounds_k = [0, 50, 70, 70, 181], [0, 50, 150, 160, 271]
    q = torch.randn(181, 2 * groups, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(271, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    cu = [torch.tensor(b, dtype=torch.int32, device="cuda") for b in (bounds_q, bounds_k)]
    segments = Segments(cu[0], cu[1], None, 1024, 1024)
    weights = torch.randn(181, 2 * groups, 64, device="cuda", dtype=torch.float64)
    want = reference_attention(q, k, v, bounds_q, bounds_k, 0.125)
    exact = torch.autograd.grad((want * weights).sum(), (q, k, v))
    results = {}
    for on in (True, False):
        monkeypatch.setattr(flash4, "ENABLED", on)
        got = segment_attention(q, k, v, segments, 0.125)
        results[on] = got, torch.autograd.grad((got.double() * weights).sum(), (q, k, v))
    fa4, fa2 = results[True], results[False]
    assert torch.allclose(fa4[0].double(), want, atol=2e-2), (fa4[0].double() - want).abs().max()
    assert (fa4[0].double() - fa2[0].double()).abs().max() <= 2 * (fa2[0].double() - want).abs().max() + 1e-2
    for g4, g2, w in zip(fa4[1], fa2[1], exact):
        assert torch.nn.functional.cosine_similarity(g4.double().flatten(), w.flatten(), dim=0) > 0.995
        assert torch.nn.functional.cosine_similarity(g4.double().flatten(), g2.double().flatten(), dim=0) > 0.995


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_training_with_fa4_on_cuda_follows_fa2(tmp_path, tiny_model, sft_shards, dpo_shards, task):
    """Compiled bf16 padding-free training with model.flash_attention: fa4 against fa2."""
    from aligntrain import flash4

    _fa4_or_skip()
    shards = sft_shards if task == "sft" else dpo_shards
    common = dict(loss={"name": task}, n_examples=32, total_batch_size=8, tokens_per_batch=400)
    try:
        runs = {choice: train(cfg_for(tmp_path, tiny_model, choice, **common, model={
            "policy_dtype": "bfloat16", "reference_dtype": "bfloat16", "flash_attention": choice})[0], shards)
                for choice in ("fa2", "fa4")}
    finally:
        flash4.enable(False)
    assert len(runs["fa4"].history) == len(runs["fa2"].history) == 4
    pairs = [(a["loss"], b["loss"], a["grad_norm"], b["grad_norm"]) for a, b in zip(runs["fa2"].history, runs["fa4"].history)]
    for loss2, loss4, norm2, norm4 in pairs:  # bf16 attention gradients differ in their last bits between kernels,
        assert loss4 == pytest.approx(loss2, rel=1e-2, abs=1e-2), pairs  # and a tiny model's steps amplify it
        assert norm4 == pytest.approx(norm2, rel=5e-2), pairs


def test_the_steps_sums_reach_the_gpu_without_a_wait():
    """_reduce_stacked queues the host's token counts (pinned memory): no stream synchronisation, which would
    leave the GPU idle while the host then queues the clip and the update."""
    from types import SimpleNamespace

    from aligntrain.trainer import _reduce_stacked

    accelerator = SimpleNamespace(device=torch.device("cuda"), reduce=lambda t, op: t)
    sums = {"loss_sum": torch.tensor(2.5, device="cuda"), "useful_tokens": 1234.0, "attention_pairs": 56789.0}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stacked = _reduce_stacked(sums, sorted(sums), accelerator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stacked.tolist() == [56789.0, 2.5, 1234.0]
