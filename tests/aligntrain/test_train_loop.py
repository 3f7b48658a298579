"""The training loop on a tiny random Llama: it learns, resumes exactly, stops on NaN, writes what it promises."""

import json
import math

import pytest
import torch
import yaml
from trainer_fixtures import base_config, interrupt, make_dpo_shards, poison_parameters_at, trainer_calls_at

from aligntrain.checkpoint import CHECKPOINTS, latest_checkpoint
from aligntrain.config import ConfigError, load_config
from aligntrain.trainer import NonFiniteLossError, train


def cfg_for(tmp_path, model_dir, name="cfg", **changes):
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(base_config(model_dir, tmp_path / f"run-{name}", **changes)))
    return load_config(path)


def losses(result):
    return [h["loss"] for h in result.history]


def test_sft_loss_falls(tmp_path, tiny_model, sft_shards):
    result = train(cfg_for(tmp_path, tiny_model, n_epochs=4, lr=1e-2, eval_every_steps=16, do_first_eval=True),
                   sft_shards)
    first, last = losses(result)[0], losses(result)[-1]
    assert len(result.history) == 16
    assert first == pytest.approx(math.log(420), rel=0.1)  # a random model is near-uniform over the vocabulary
    assert last < first - 1.0
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["loss"] for r in records if r["split"] == "eval"]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 16]
    assert evals[1] < evals[0] - 1.0


def test_dpo_reaches_high_reward_accuracy_on_its_training_pairs(tmp_path, tiny_model):
    shards = make_dpo_shards(tmp_path / "dpo-train-only", tiny_model, n_eval=0)  # eval = the training pairs
    cfg = cfg_for(tmp_path, tiny_model, n_epochs=4, eval_every_steps=16, n_eval_examples=32,
                  loss={"name": "dpo", "beta": 0.1})
    result = train(cfg, shards)
    assert result.eval_metrics["rewards/accuracies"] >= 0.9
    assert result.eval_metrics["rewards/margins"] > 0
    assert result.history[0]["rewards/accuracies"] == 0.0  # step 1: policy == reference, no margin yet
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert set(result.history[-1]) >= {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                        "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm", "lr",
                                        "tokens_per_s", "examples_per_s"}


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_model, sft_shards, dpo_shards, monkeypatch, task):
    shards = sft_shards if task == "sft" else dpo_shards
    changes = dict(n_epochs=2, save_every_steps=3, loss={"name": task})
    straight = train(cfg_for(tmp_path, tiny_model, "straight", **changes), shards)

    cfg = cfg_for(tmp_path, tiny_model, "killed", **changes)
    trainer_calls_at(monkeypatch, 5, interrupt)  # the process is killed during step 5 (step 4 done, not checkpointed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, shards)
    monkeypatch.undo()
    checkpoints = tmp_path / "run-killed" / CHECKPOINTS
    (checkpoints / ".tmp-step-0000006").mkdir()  # a save that was interrupted half-way
    (checkpoints / "step-0000009").mkdir()  # a directory without trainer_state.json is not a checkpoint
    assert latest_checkpoint(checkpoints).name == "step-0000003"

    resumed = train(cfg, shards, resume=True)
    assert len(straight.history) == 8 and len(resumed.history) == 5
    assert losses(resumed) == losses(straight)[3:]  # bit-identical on CPU
    assert [h["grad_norm"] for h in resumed.history] == [h["grad_norm"] for h in straight.history[3:]]
    records = [json.loads(line) for line in (tmp_path / "run-killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 9))  # no duplicate of step 4


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model, sft_shards,
                                                                                   monkeypatch):
    poison_parameters_at(monkeypatch, 3, float("nan"))
    cfg = cfg_for(tmp_path, tiny_model, save_every_steps=1)
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, sft_shards)
    assert str(e.value) == "loss is nan at step 3; stopped before the optimizer step"
    assert latest_checkpoint(tmp_path / "run-cfg" / CHECKPOINTS).name == "step-0000002"


def test_checkpoint_is_a_transformers_model_with_everything_to_resume(tmp_path, tiny_model, sft_shards):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligndata.write.shards import read_manifest
    from aligntrain.data import ShardSplit
    from aligntrain.modeling import SequenceLogps

    result = train(cfg_for(tmp_path, tiny_model, eval_every_steps=4, n_eval_examples=8), sft_shards)
    ckpt = result.checkpoint
    assert ckpt.name == "step-0000004"
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "scheduler.pt", "rng_state_0.pt",
            "config.yaml", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["output_dir"] == str(tmp_path / "run-cfg")
    assert (result.run_dir / "config.yaml").exists()
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert tokenizer("Hello")["input_ids"]
    # the reloaded weights reproduce the final eval loss computed inside the run
    split = ShardSplit(sft_shards, "eval", read_manifest(sft_shards))
    from aligntrain.data import collate

    batch = collate(split.rows(list(range(8))), "sft", 0)
    with torch.no_grad():
        logps, tokens = SequenceLogps(model)(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert (-logps.sum() / tokens.sum()).item() == pytest.approx(result.eval_metrics["loss"], abs=1e-5)


def test_accumulation_and_token_budget_do_not_change_the_step(tmp_path, tiny_model, sft_shards):
    """The loss is normalised by the step's global token count, so how a step is split does not matter."""
    one = train(cfg_for(tmp_path, tiny_model, "ga1", gradient_accumulation_steps=1, n_examples=16), sft_shards)
    four = train(cfg_for(tmp_path, tiny_model, "ga4", gradient_accumulation_steps=4, n_examples=16), sft_shards)
    budget = train(cfg_for(tmp_path, tiny_model, "budget", tokens_per_batch=60, n_examples=16), sft_shards)
    for a, b in [(one, four), (one, budget)]:
        assert losses(a) == pytest.approx(losses(b), abs=1e-5)
        assert [h["grad_norm"] for h in a.history] == pytest.approx([h["grad_norm"] for h in b.history], rel=1e-4)


def test_cpu_fallbacks_for_gpu_settings(tmp_path, tiny_model, sft_shards):
    """bf16 autocast runs on CPU; fp16 (no CPU kernels) runs as float32; FSDPTrainer in one process is
    plain training; activation checkpointing gives the same numbers."""
    plain = train(cfg_for(tmp_path, tiny_model, "plain"), sft_shards)
    bf16 = train(cfg_for(tmp_path, tiny_model, "bf16", model={"policy_dtype": "bfloat16"}), sft_shards)
    fp16 = train(cfg_for(tmp_path, tiny_model, "fp16", model={"policy_dtype": "float16"}), sft_shards)
    fsdp = train(cfg_for(tmp_path, tiny_model, "fsdp", trainer="FSDPTrainer", activation_checkpointing=True),
                 sft_shards)
    assert losses(bf16) == pytest.approx(losses(plain), rel=2e-2) and losses(bf16) != losses(plain)
    assert losses(fp16) == losses(plain)
    assert losses(fsdp) == pytest.approx(losses(plain), abs=1e-5)
    from safetensors.torch import load_file

    weights = load_file(str(bf16.checkpoint / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}  # float32 master weights


def test_existing_run_is_not_overwritten_without_resume(tmp_path, tiny_model, sft_shards):
    cfg = cfg_for(tmp_path, tiny_model, n_examples=8)
    train(cfg, sft_shards)
    with pytest.raises(ConfigError) as e:
        train(cfg, sft_shards)
    assert str(e.value) == (f"{tmp_path / 'run-cfg'}: this run already has checkpoints; pass --resume to continue "
                            "it, or choose another output_dir")


def test_seed_policy_archive_and_run_dir_archives_load(tmp_path, tiny_model, sft_shards, dpo_shards):
    from aligntrain.modeling import load_archive, load_causal_lm

    sft = train(cfg_for(tmp_path, tiny_model, "sft", n_examples=8), sft_shards)
    trained = load_causal_lm(sft.checkpoint, "float32").state_dict()
    policy_pt = tmp_path / "policy.pt"
    torch.save({"step_idx": 1, "state": trained, "metrics": {}}, policy_pt)  # the seed project's archive
    for archive in (policy_pt, sft.run_dir, sft.checkpoint):
        model = load_causal_lm(tiny_model, "float32")
        load_archive(model, archive)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    # DPO from the archive: at step 0 policy == reference, so every reward is exactly 0
    cfg = cfg_for(tmp_path, tiny_model, "dpo", n_examples=8, do_first_eval=True, eval_every_steps=1,
                  loss={"name": "dpo"}, model={"archive": str(policy_pt)})
    first_eval = json.loads((train(cfg, dpo_shards).run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert (first_eval["step"], first_eval["rewards/chosen"], first_eval["rewards/margins"]) == (0, 0.0, 0.0)


def test_archive_of_another_model_is_refused(tmp_path, tiny_model):
    from aligntrain.modeling import load_archive, load_causal_lm

    bad = tmp_path / "bad.pt"
    torch.save({"state": {"not.a.weight": torch.zeros(2)}}, bad)
    with pytest.raises(ConfigError) as e:
        load_archive(load_causal_lm(tiny_model, "float32"), bad)
    assert str(e.value).startswith(f"model.archive: {bad} does not match model.name_or_path (missing ")


def test_tensorboard_events_are_written(tmp_path, tiny_model, sft_shards):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(cfg_for(tmp_path, tiny_model, report_to_tensorboard=True, eval_every_steps=2), sft_shards)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]


@pytest.mark.slow
def test_wandb_offline_run_is_written(tmp_path, tiny_model, sft_shards, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    result = train(cfg_for(tmp_path, tiny_model, wandb={"enabled": True, "project": "tests"}), sft_shards)
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    run_id = (result.run_dir / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)


def test_lr_schedule_warms_up_like_the_seed_then_decays():
    from aligntrain.trainer import lr_factor

    # seed warmup: min(1, (step + 1) / (warmup + 1)), then constant
    assert [lr_factor(s, 3, 10, "constant", 0.0) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [lr_factor(s, 0, 4, "linear", 0.0) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(2, 0, 4, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(4, 0, 4, "cosine", 0.1) == pytest.approx(0.1)



def test_the_next_steps_batches_prepared_during_the_backward_change_nothing(monkeypatch, tmp_path, tiny_model,
                                                                            sft_shards):
    import aligntrain.trainer as trainer_module

    prefetched = train(cfg_for(tmp_path, tiny_model, "prefetched", eval_every_steps=2, n_eval_examples=8), sft_shards)
    monkeypatch.setattr(trainer_module, "PREFETCH", False)
    in_turn = train(cfg_for(tmp_path, tiny_model, "in-turn", eval_every_steps=2, n_eval_examples=8), sft_shards)
    assert len(prefetched.history) == len(in_turn.history) > 2
    assert prefetched.history == [{**h, **{k: p[k] for k in ("examples_per_s", "tokens_per_s")}}
                                  for h, p in zip(in_turn.history, prefetched.history)]  # bit-identical on CPU
    assert prefetched.eval_metrics == in_turn.eval_metrics


def fused_on_cpu(monkeypatch):
    """Build torch's fused AdamW on the CPU too (the trainer asks for it on CUDA only), so a CPU run takes the
    path that reads a step's metrics once the next step is queued (trainer._skips_on_device)."""
    import aligntrain.trainer as T

    built = []
    build = T.build_optimizer

    def fused(cfg, model, fused=False, **kwargs):
        built.append(build(cfg, model, fused=True, **kwargs))
        return built[-1]

    monkeypatch.setattr(T, "build_optimizer", fused)
    return built


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_metrics_read_a_step_late_are_the_metrics_read_at_once(tmp_path, tiny_model, sft_shards, dpo_shards,
                                                               monkeypatch, task):
    """With the fused optimizer each step's loss and gradient norm stay on the device until the next step is
    queued (ASYNC_METRICS); the history, the log and the checkpoint are those of reading them at once."""
    import aligntrain.trainer as T

    fused_on_cpu(monkeypatch)
    shards = sft_shards if task == "sft" else dpo_shards
    runs = {}
    real_step = T.train_step
    for late in (False, True):
        monkeypatch.setattr(T, "ASYNC_METRICS", late)
        queued = []
        monkeypatch.setattr(T, "train_step", lambda *a, **k: queued.append(real_step(*a, **k)) or queued[-1])
        cfg = cfg_for(tmp_path, tiny_model, f"{task}-{late}", save_every_steps=3, loss={"name": task, "beta": 0.1})
        runs[late] = train(cfg, shards), [q.deferred for q in queued]
    (at_once, _), (late, deferred) = runs[False], runs[True]
    assert any(deferred), "no step was read late"
    assert len(late.history) == len(at_once.history) == 4
    for key in ("loss", "grad_norm", "input_tokens", "lr"):
        assert [h[key] for h in late.history] == [h[key] for h in at_once.history], key
    records = [json.loads(line) for line in (late.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert all(h["tokens_per_s"] > 0 for h in late.history)
    state = json.loads((late.checkpoint / "trainer_state.json").read_text())
    assert state["train_metrics"]["loss"] == late.history[-1]["loss"]


def test_a_non_finite_step_read_late_stops_the_run_with_no_update_after_the_last_good_step(tmp_path, tiny_model,
                                                                                          sft_shards, monkeypatch):
    """Step 3's loss is NaN; the host reads it after step 4 is queued. The fused optimizer skipped the updates
    of steps 3 and 4 (found_inf), so the weights and the optimizer's step count are those after step 2."""
    import aligntrain.trainer as T

    built = fused_on_cpu(monkeypatch)
    after = {}
    real_step = T.train_step

    def step(at, model, *args, **kwargs):
        out = real_step(at, model, *args, **kwargs)
        if at == 2:  # the CPU has run step 2's update by now
            after["model"], after["weights"] = model, [p.detach().clone() for p in model.parameters()]
        return out

    monkeypatch.setattr(T, "train_step", step)
    poison_parameters_at(monkeypatch, 3, float("nan"))  # wraps the step above: the first weight is NaN from step 3
    cfg = cfg_for(tmp_path, tiny_model, n_examples=48, debug=True)  # 6 steps, no checkpoints
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, sft_shards)
    assert str(e.value) == "loss is nan at step 3; stopped before the optimizer step"
    optimizer = built[0]
    assert all(optimizer.state[p]["step"].item() == 2 for group in optimizer.param_groups for p in group["params"])
    now = [p.detach() for p in after["model"].parameters()]
    assert torch.isnan(now[0]).all()  # the weight the test filled with NaN
    assert all(torch.equal(a, b) for a, b in zip(now[1:], after["weights"][1:]))


def test_the_steps_sums_held_by_the_host_and_the_device_stack_in_name_order():
    # token counts the host holds join the device's sums in one copy (pinned and queued on CUDA)
    from types import SimpleNamespace

    from aligntrain.trainer import _all_reduce, _reduce_stacked

    accelerator = SimpleNamespace(device=torch.device("cpu"), reduce=lambda t, op: t)
    sums = {"loss_sum": torch.tensor(2.5), "useful_tokens": 1234.0, "attention_pairs": 56789, "chosen": torch.tensor(-1.0)}
    names = sorted(sums)
    stacked = _reduce_stacked(sums, names, accelerator)
    assert stacked.dtype == torch.float32 and stacked.tolist() == [56789.0, -1.0, 2.5, 1234.0]
    assert _all_reduce(sums, accelerator) == {"attention_pairs": 56789.0, "chosen": -1.0, "loss_sum": 2.5,
                                              "useful_tokens": 1234.0}
    assert _reduce_stacked({"only": torch.tensor(3.0)}, ["only"], accelerator).tolist() == [3.0]
