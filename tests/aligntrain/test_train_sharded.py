"""trainer: FSDPTrainer over several processes shards the model with FSDP2 (aligntrain/sharding.py). Two CPU
processes (torchrun, gloo) stand in for two GPUs: the same code runs on CUDA with NCCL."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from trainer_fixtures import make_shards, write_config

from aligntrain.cli import main
from aligntrain.config import ConfigError
from aligntrain.modeling import load_causal_lm
from aligntrain.sharding import fsdp2_available

pytestmark = pytest.mark.skipif(not fsdp2_available(), reason="needs torch's FSDP2 (2.6+)")


# Once in about seventy two-process CPU runs seen here, a gloo process died with this at the very end of a
# run that had completed (its metrics and checkpoints written): a teardown race in the C++ runtime. Such a
# run is repeated once from the same starting state; any other failure, or the same one twice, fails.
TEARDOWN_ABORT = "terminate called without an active exception"


def launch(tmp_path, task, shards, cfg, out, processes, *overrides, resume=False):
    """`aligntrain TASK` in `processes` CPU processes; (train losses, the JSON summary)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "ACCELERATE_USE_CPU": "true"}
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                                   if processes > 1 else [])
    command = ([*launcher, "-m", "aligntrain", task, str(shards), str(cfg), "--json"]
               + (["--resume"] if resume else []) + ["--overrides", f"output_dir={tmp_path / out}", *overrides]
               + (["trainer=FSDPTrainer"] if processes > 1 else []))
    run_dir, before = tmp_path / out, tmp_path / f"{out}.before"
    if run_dir.exists():
        shutil.copytree(run_dir, before)
    for attempt in (1, 2):
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode == 0 or attempt == 2 or TEARDOWN_ABORT not in done.stderr:
            break
        shutil.rmtree(run_dir)
        if before.exists():
            shutil.copytree(before, run_dir)
    shutil.rmtree(before, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"], json.loads(done.stdout)


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.slow
def test_two_sharded_processes_train_as_one_and_resume_from_their_shards(tmp_path, tiny_model, capsys):
    """SFT, 3 steps of 8 rows in 2 micro-batches: two FSDP2 processes give one process's losses and weights;
    the checkpoints before the last hold shards only (no whole-model file); a run stopped after step 2
    resumes from them to the same step 3; `aligntrain export` makes a model directory of a sharded one."""
    from transformers import AutoModelForCausalLM

    shards = make_shards("sft", tmp_path / "shards", tiny_model)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "unused", n_examples=24, save_every_steps=1)
    one, _ = launch(tmp_path, "sft", shards, cfg, "one", 1)
    two, summary = launch(tmp_path, "sft", shards, cfg, "two", 2)
    assert len(two) == 3 and two == pytest.approx(one, abs=1e-5)

    step2 = tmp_path / "two" / "checkpoints" / "step-0000002"
    assert (step2 / "sharded" / ".metadata").exists() and not (step2 / "model.safetensors").exists()
    assert not (step2 / "optimizer.pt").exists()  # the optimizer state is in the shards too
    final = weights(tmp_path / "two" / "checkpoints" / "step-0000003")
    assert summary["checkpoint"].endswith("step-0000003")
    reference = weights(tmp_path / "one" / "checkpoints" / "step-0000003")
    assert final.keys() == reference.keys()
    assert all(torch.allclose(final[k], reference[k], atol=1e-6) for k in final)

    # a model directory of the step-2 shards, on one process: the one-process run's step-2 weights
    assert main(["export", str(step2), str(tmp_path / "exported")]) == 0
    exported = tmp_path / "exported"
    assert not (exported / "sharded").exists() and (exported / "tokenizer.json").exists()
    AutoModelForCausalLM.from_pretrained(exported)
    got, want = weights(exported), weights(tmp_path / "one" / "checkpoints" / "step-0000002")
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)
    # a damaged shard: export and resume say which checkpoint and what to do, no traceback (exit 2)
    broken = tmp_path / "broken" / "checkpoints" / "step-0000002"
    shutil.copytree(step2, broken)
    next(broken.glob("sharded/*.distcp")).write_bytes(b"truncated")
    assert main(["export", str(broken), str(tmp_path / "nothing")]) == 2
    assert f"{broken / 'sharded'}: cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
    code = main(["sft", str(shards), str(cfg), "--resume", "--overrides", f"output_dir={tmp_path / 'broken'}",
                 "trainer=FSDPTrainer"])
    err = capsys.readouterr().err
    assert code == 2 and f"{broken / 'sharded'}: cannot be read" in err and "the checkpoint is damaged" in err
    # where a model directory is expected, a sharded checkpoint is refused with the way out
    with pytest.raises(ConfigError, match=r"sharded over the processes that trained it .* `aligntrain export "):
        load_causal_lm(step2, "float32")
    # stopped after step 2 (16 examples), resumed to step 3 from the shards: the straight run's losses
    first, _ = launch(tmp_path, "sft", shards, cfg, "resumed", 2, "n_examples=16")
    assert first == pytest.approx(two[:2], abs=1e-6)
    shutil.copytree(tmp_path / "resumed", tmp_path / "resumed-alone")
    launch(tmp_path, "sft", shards, cfg, "resumed", 2, resume=True)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if r["split"] == "train"] == pytest.approx(two, abs=1e-6)
    # the same shards resumed by one process (FSDPTrainer on one device does not shard): it reads them all
    launch(tmp_path, "sft", shards, cfg, "resumed-alone", 1, "trainer=FSDPTrainer", resume=True)
    records = [json.loads(line) for line in (tmp_path / "resumed-alone" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if r["split"] == "train"] == pytest.approx(two, abs=1e-5)


@pytest.mark.slow
def test_two_sharded_processes_train_dpo_as_one_with_the_reference_sharded_too(tmp_path, tiny_model):
    """DPO with activation checkpointing and two micro-batches a step; eval metrics gathered over both."""
    shards = make_shards("dpo", tmp_path / "shards", tiny_model)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "unused", n_examples=16, loss={"name": "dpo"},
                       do_first_eval=True, eval_every_steps=2, activation_checkpointing=True)
    one, _ = launch(tmp_path, "dpo", shards, cfg, "one", 1)
    two, _ = launch(tmp_path, "dpo", shards, cfg, "two", 2)
    assert len(two) == 2 and two == pytest.approx(one, abs=1e-5)
    assert two[0] == pytest.approx(0.6931, abs=1e-4)  # the policy starts as the reference

    def evals(run):
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "examples_per_s", "tokens_per_s")}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["split"] == "eval"]

    assert evals("two") == [pytest.approx(m, abs=1e-5) for m in evals("one")]


@pytest.mark.slow
def test_lora_under_two_sharded_processes_trains_as_one_and_saves_its_adapter(tmp_path, tiny_model):
    """LoRA's frozen base and float32 adapters sharded together; every checkpoint carries the adapter
    in peft's layout (small: gathered each time), and resuming reads the shards."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shards = make_shards("sft", tmp_path / "shards", tiny_model)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "unused", n_examples=24, save_every_steps=1,
                       lr=1e-2, model={"lora": {"r": 4}})
    one, _ = launch(tmp_path, "sft", shards, cfg, "one", 1)
    two, summary = launch(tmp_path, "sft", shards, cfg, "two", 2)
    assert two == pytest.approx(one, abs=1e-5) and two[-1] < two[0]
    step2 = tmp_path / "two" / "checkpoints" / "step-0000002"
    assert (step2 / "adapter_model.safetensors").exists() and (step2 / "sharded" / ".metadata").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), summary["checkpoint"])
    launch(tmp_path, "sft", shards, cfg, "resumed", 2, "n_examples=16")
    launch(tmp_path, "sft", shards, cfg, "resumed", 2, resume=True)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if r["split"] == "train"] == pytest.approx(two, abs=1e-6)


@pytest.fixture
def one_process_group():
    """A process group of this process alone: FSDP2 shards over one rank with the same machinery."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True])
def test_the_fast_path_under_fsdp2_gives_the_unsharded_logps_and_gradients(tiny_model, one_process_group, monkeypatch,
                                                                          compiled):
    """Padding-free stream, the head's gradients in the forward, compiled layers (aot_eager here), two
    micro-batches accumulated without a reduction then one with: sharded and plain models agree."""
    from torch.distributed.tensor import DTensor

    from aligntrain import compiling, sharding
    from aligntrain.data import collate
    from aligntrain.modeling import SequenceLogps, model_inputs
    from aligntrain.packing import PACKED, use_packed_attention

    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    g = torch.Generator().manual_seed(5)
    batches = []
    for lengths in (((9, 3), (14, 5)), ((6, 2), (11, 4), (8, 8))):
        rows = []
        for n, p in lengths:
            ids = torch.randint(7, 300, (n,), generator=g).tolist()
            rows.append({"input_ids": ids, "loss_mask": [0] * p + [1] * (n - p), "length": n})
        batches.append(collate(rows, "sft", 0, PACKED, 64))

    def run(shard: bool):
        torch.manual_seed(0)
        lm = load_causal_lm(tiny_model, "float32")
        use_packed_attention(lm)
        model = SequenceLogps(lm, chunk_tokens=4, compiled=compiled, uniform_grad=True)
        if shard:
            sharding.shard(model, torch.device("cpu"))
        logps = []
        for i, batch in enumerate(batches):
            sync = sharding.gradient_sync(model, i == len(batches) - 1) if shard else contextlib.nullcontext()
            with sync:
                got, _ = model(**model_inputs(batch))
                (-0.37 * got.sum()).backward()
            logps.append(got.detach())
        grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                 for n, p in model.named_parameters()}
        return torch.cat(logps), grads

    plain, plain_grads = run(False)
    sharded, sharded_grads = run(True)
    assert torch.allclose(sharded, plain, atol=1e-5)
    assert sharded_grads.keys() == plain_grads.keys()
    for name, grad in sharded_grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-5), name


@pytest.mark.slow
def test_lora_dpo_under_two_sharded_processes_uses_the_sharded_base_as_reference(tmp_path, tiny_model):
    """LoRA DPO: the reference is the policy with its adapters off, a forward of the same sharded model."""
    shards = make_shards("dpo", tmp_path / "shards", tiny_model)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "unused", n_examples=16, lr=1e-2,
                       loss={"name": "dpo"}, model={"lora": {"r": 4}})
    one, _ = launch(tmp_path, "dpo", shards, cfg, "one", 1)
    two, _ = launch(tmp_path, "dpo", shards, cfg, "two", 2)
    assert two == pytest.approx(one, abs=1e-5)
    assert two[0] == pytest.approx(0.6931, abs=1e-4)  # adapters start at zero: policy == reference
