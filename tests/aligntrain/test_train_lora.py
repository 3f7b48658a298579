"""LoRA (model.lora): only the adapters train, the reference is the base with adapters off, checkpoints
are peft adapters, export merges them into a plain model, resume is exact."""

import json

import pytest
import torch
import yaml
from trainer_fixtures import base_config, killed_then_resumed, make_dpo_shards, write_config

import aligntrain.trainer as trainer_module
from aligntrain.cli import main
from aligntrain.config import ConfigError, load_config, to_yaml
from aligntrain.data import ShardSplit, collate
from aligntrain.modeling import SequenceLogps, load_causal_lm
from aligntrain.precompute import precompute_reference
from aligntrain.trainer import train

LORA = {"r": 4, "alpha": 8}


def cfg_for(tmp_path, model_dir, name="cfg", lora=LORA, **changes):
    changes.setdefault("loss", {"name": "dpo"})
    changes.setdefault("n_examples", 16)
    model = {**changes.pop("model", {}), **({"lora": lora} if lora is not None else {})}
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(base_config(model_dir, tmp_path / f"run-{name}", model=model, lr=1e-2, **changes)))
    return load_config(path)


def losses(result):
    return [h["loss"] for h in result.history]


def eval_batch(shards, task="dpo"):
    from aligndata.write.shards import read_manifest

    split = ShardSplit(shards, "eval", read_manifest(shards))
    return collate(split.rows(list(range(8))), task, 0)


@torch.no_grad()
def logps(lm, batch):
    return SequenceLogps(lm)(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])[0]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, dpo_shards):
    """A LoRA DPO run of two steps, with its trained policy (the peft model) kept."""
    tmp_path = tmp_path_factory.mktemp("lora-run")
    kept = {}
    real = trainer_module.lora_policy

    def keep(*args):
        kept["policy"] = real(*args)
        return kept["policy"]

    trainer_module.lora_policy = keep
    try:
        result = train(cfg_for(tmp_path, tiny_model), dpo_shards)
    finally:
        trainer_module.lora_policy = real
    return result, kept["policy"]


def test_only_the_adapters_train_and_the_first_step_has_policy_equal_to_reference(lora_run, tiny_model):
    result, policy = lora_run
    assert result.history[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # log 2: adapters start at zero
    assert losses(result)[1] < losses(result)[0]
    base = load_causal_lm(tiny_model, "float32").state_dict()
    trained = {k: v for k, v in policy.state_dict().items()}
    adapters = {k for k in trained if ".lora_" in k}
    assert adapters and all(trained[k].dtype == torch.float32 for k in adapters)
    assert any(k.endswith("lora_B.default.weight") and trained[k].abs().sum() > 0 for k in adapters)
    frozen = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v for k, v in trained.items()
              if k not in adapters}
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[k], base[k]) for k in base)  # bit for bit: nothing but the adapters moved


def test_adapters_off_reproduce_the_base_model_exactly(lora_run, tiny_model, dpo_shards):
    _, policy = lora_run
    batch = eval_batch(dpo_shards)
    with policy.disable_adapter():
        off = logps(policy, batch)
    on = logps(policy, batch)
    assert torch.equal(off, logps(load_causal_lm(tiny_model, "float32"), batch))
    assert not torch.allclose(on, off)


def test_checkpoint_is_a_peft_adapter_with_the_tokenizer(lora_run, tiny_model, dpo_shards):
    from peft import PeftModel
    from transformers import AutoTokenizer

    result, policy = lora_run
    ckpt = result.checkpoint
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "optimizer.pt",
            "trainer_state.json", "config.yaml"} <= names
    assert "model.safetensors" not in names  # the base is not copied into every checkpoint
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    assert AutoTokenizer.from_pretrained(ckpt).chat_template
    loaded = PeftModel.from_pretrained(load_causal_lm(tiny_model, "float32"), ckpt)
    batch = eval_batch(dpo_shards)
    assert torch.equal(logps(loaded, batch), logps(policy, batch))


def test_export_merge_gives_a_plain_model_with_the_adapter_models_log_probs(lora_run, tmp_path, capsys, dpo_shards):
    from transformers import AutoModelForCausalLM

    result, policy = lora_run
    assert main(["export", str(result.run_dir), str(tmp_path / "merged"), "--merge"]) == 0
    assert capsys.readouterr().out == f"merged model of {result.checkpoint} written to {tmp_path / 'merged'}\n"
    merged_dir = tmp_path / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in merged_dir.iterdir()}
    assert not any(merged_dir.glob("adapter_*")) and not (merged_dir / "optimizer.pt").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not hasattr(merged, "peft_config")
    batch = eval_batch(dpo_shards)
    assert torch.allclose(logps(merged, batch), logps(policy, batch), atol=1e-5, rtol=0)

    assert main(["export", str(result.checkpoint), str(tmp_path / "adapter")]) == 0  # without --merge: the adapter
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == \
        {p.name for p in result.checkpoint.iterdir()} - {"optimizer.pt", "scheduler.pt", "rng_state_0.pt",
                                                          "trainer_state.json", "config.yaml"}
    assert main(["export", str(result.checkpoint), str(tmp_path / "adapter")]) == 2  # OUT exists
    assert capsys.readouterr().err.endswith("adapter: already exists; choose another OUT or remove it\n")


def test_generate_accepts_an_adapter_checkpoint(lora_run, tmp_path, capsys):
    result, _ = lora_run
    assert main(["export", str(result.run_dir), str(tmp_path / "merged"), "--merge"]) == 0
    capsys.readouterr()
    args = ["-p", "Hello!", "--max-new-tokens", "4", "--json"]
    assert main(["generate", str(result.checkpoint), str(tmp_path / "merged"), *args]) == 0
    (reply,) = json.loads(capsys.readouterr().out)
    assert reply["replies"][str(result.checkpoint)] == reply["replies"][str(tmp_path / "merged")]


def test_adapter_with_a_missing_base_model_is_a_one_line_error(lora_run, tmp_path, capsys):
    import shutil

    result, _ = lora_run
    moved = tmp_path / "ckpt"
    shutil.copytree(result.checkpoint, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/base"}))
    assert main(["export", str(moved), str(tmp_path / "out"), "--merge"]) == 1
    assert capsys.readouterr().err == (f"error: {moved}: the LoRA adapter's base model '/gone/base' "
                                       "(base_model_name_or_path in adapter_config.json) does not exist here\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_killed_and_resumed_lora_run_equals_uninterrupted(tmp_path, tiny_model, dpo_shards, monkeypatch):
    changes = dict(n_examples=40, save_every_steps=2)
    straight, resumed = killed_then_resumed(monkeypatch, lambda name: cfg_for(tmp_path, tiny_model, name, **changes),
                                            dpo_shards, kill_at=4)
    assert len(straight.history) == 5 and len(resumed.history) == 3
    assert losses(resumed) == losses(straight)[2:]  # bit-identical on CPU: adapter, optimizer, RNG restored
    assert [h["grad_norm"] for h in resumed.history] == [h["grad_norm"] for h in straight.history[2:]]


@pytest.mark.slow
def test_activation_checkpointing_and_bfloat16_train_the_adapters(tmp_path, tiny_model, dpo_shards):
    plain = train(cfg_for(tmp_path, tiny_model, "plain"), dpo_shards)
    checkpointed = train(cfg_for(tmp_path, tiny_model, "ckpt", activation_checkpointing=True), dpo_shards)
    assert losses(checkpointed) == pytest.approx(losses(plain), abs=1e-6)
    assert checkpointed.history[0]["grad_norm"] == pytest.approx(plain.history[0]["grad_norm"], rel=1e-5)
    mixed = train(cfg_for(tmp_path, tiny_model, "bf16", activation_checkpointing=True,
                          model={"policy_dtype": "bfloat16", "reference_dtype": "bfloat16"}), dpo_shards)
    assert losses(mixed) == pytest.approx(losses(plain), abs=2e-2)
    assert mixed.history[0]["grad_norm"] > 0


@pytest.mark.slow
def test_precomputed_reference_log_probs_work_with_lora(tmp_path, tiny_model):
    plain = make_dpo_shards(tmp_path / "plain", tiny_model)
    stored = make_dpo_shards(tmp_path / "stored", tiny_model)
    precompute_reference(stored, cfg_for(tmp_path, tiny_model, "pre"))
    live = train(cfg_for(tmp_path, tiny_model, "live"), plain)
    from_shards = train(cfg_for(tmp_path, tiny_model, "shards"), stored)
    assert losses(from_shards) == pytest.approx(losses(live), abs=1e-6)


@pytest.mark.slow
def test_a_lora_sft_run_as_archive_is_merged_into_policy_and_reference(tmp_path, tiny_model, sft_shards, dpo_shards):
    sft = train(cfg_for(tmp_path, tiny_model, "sft", loss={"name": "sft"}), sft_shards)
    dpo = train(cfg_for(tmp_path, tiny_model, "dpo", model={"archive": str(sft.run_dir)}), dpo_shards)
    assert dpo.history[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # reference = SFT model = policy
    full = train(cfg_for(tmp_path, tiny_model, "full", lora=None, model={"archive": str(sft.run_dir)}), dpo_shards)
    assert full.history[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert losses(full)[1] < losses(full)[0]  # the merged weights are trained in full, not left frozen
    from aligntrain.modeling import load_archive

    merged = load_causal_lm(tiny_model, "float32")
    load_archive(merged, sft.run_dir)
    batch = eval_batch(dpo_shards)
    assert not torch.allclose(logps(merged, batch), logps(load_causal_lm(tiny_model, "float32"), batch))


def test_seed_style_config_with_lora_runs_aligntrain_train(tmp_path, capsys, tiny_model):
    raw = tmp_path / "chats.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Hello {i}"},
                                                    {"role": "assistant", "content": "It is sunny."}]}) + "\n"
                           for i in range(8)))
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", n_examples=8,
                       datasets=[{"type": "custom_dataset", "path": str(raw)}],
                       model={"lora": {"r": 2, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}})
    assert main(["train", str(cfg), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1 and summary["checkpoint"].endswith("step-0000001")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["lora"]
    assert saved == {"r": 2, "alpha": 32.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                     "modules_to_save": ["lm_head"]}


# -- config ------------------------------------------------------------------------------------------

def test_a_config_without_lora_is_saved_as_before(tmp_path, tiny_model):
    path = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run")
    assert list(yaml.safe_load(to_yaml(load_config(path)))["model"]) == [
        "name_or_path", "tokenizer_name_or_path", "archive", "policy_dtype", "reference_dtype", "fsdp_policy_mp",
        "attn_implementation", "cudnn_attention", "flash_attention"]
    assert yaml.safe_load(to_yaml(load_config(path, ["model.lora.r=8"])))["model"]["lora"]["r"] == 8


@pytest.mark.parametrize("lora, message", [
    ({"rank": 8}, "unknown key 'model.lora.rank' (did you mean 'model.lora.r'?)"),
    ({"r": 0}, "key 'model.lora.r' must be a positive integer, got 0"),
    ({"dropout": 1.0}, "key 'model.lora.dropout' must be in [0, 1), got 1.0"),
    ({"target_modules": "q_proj"}, "key 'model.lora.target_modules' must be a list or 'all-linear', got 'q_proj' (str)"),
    ({"target_modules": []}, "key 'model.lora.target_modules' must be 'all-linear' or a non-empty list of module names"),
    ({"modules_to_save": "lm_head"}, "key 'model.lora.modules_to_save' must be a list, got 'lm_head' (str)"),
])
def test_lora_config_errors_name_the_key(tmp_path, tiny_model, lora, message):
    path = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", model={"lora": lora})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"cfg.yml: {message}"


def test_lora_without_peft_installed_names_the_pip_command(tmp_path, tiny_model, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    path = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", model={"lora": {}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == ("cfg.yml: key 'model.lora' needs the peft package: pip install 'aligntools[lora]' "
                            "(or pip install 'peft>=0.13')")


def test_target_modules_the_model_lacks_are_a_config_error(tmp_path, tiny_model, dpo_shards):
    with pytest.raises(ConfigError) as e:
        train(cfg_for(tmp_path, tiny_model, lora={"target_modules": ["qkv_proj"]}), dpo_shards)
    assert str(e.value).startswith("model.lora: Target modules {'qkv_proj'} not found in the base model.")


def test_fsdp_units_never_mix_the_frozen_base_dtype_with_float32_adapters(tmp_path, tiny_model):
    from aligntrain.lora import fsdp_wrap_policy, lora_policy

    cfg = cfg_for(tmp_path, tiny_model, model={"reference_dtype": "bfloat16"},
                  lora={"r": 4, "modules_to_save": ["lm_head"]})
    policy = lora_policy(cfg, None)
    wrap = fsdp_wrap_policy(policy)
    units = [m for m in policy.modules() if wrap(module=m, recurse=False, nonwrapped_numel=0)] + [policy]
    owned = set()
    for unit in units:  # each unit owns the parameters not owned by a unit nested in it
        params = {id(p): p for p in unit.parameters()}
        for inner in units:
            if inner is not unit and any(inner is m for m in unit.modules()):
                for p in inner.parameters():
                    params.pop(id(p), None)
        assert len({p.dtype for p in params.values()}) <= 1, type(unit).__name__
        owned |= params.keys()
    assert any(p.dtype == torch.bfloat16 for p in policy.parameters())
    assert {id(p) for p in policy.parameters()} == owned


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_training_reference_equals_a_separately_loaded_reference_model(tmp_path, tiny_model, dpo_shards, dtype):
    from aligntrain.lora import AdapterOffReference, lora_policy
    from aligntrain.modeling import Reference
    from aligntrain.trainer import make_accelerator

    cfg = cfg_for(tmp_path, tiny_model, model={"policy_dtype": dtype, "reference_dtype": dtype})
    policy = lora_policy(cfg, None)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # adapters that change the model: switched off, they must leave no trace
    accelerator = make_accelerator(cfg, policy)
    model = accelerator.prepare(SequenceLogps(policy))
    batch = eval_batch(dpo_shards)
    separate = Reference(cfg, torch.device("cpu"))(batch)
    assert torch.equal(AdapterOffReference(model, policy)(batch), separate)
    with torch.no_grad():
        assert not torch.allclose(model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])[0], separate)


def test_export_of_a_full_weight_run_is_its_hugging_face_model(tmp_path, tiny_model, sft_shards, capsys):
    from transformers import AutoModelForCausalLM

    run = train(cfg_for(tmp_path, tiny_model, lora=None, loss={"name": "sft"}, n_examples=8), sft_shards)
    assert main(["export", str(run.run_dir), str(tmp_path / "model"), "--merge", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "model"
    names = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not names & {"optimizer.pt", "scheduler.pt", "rng_state_0.pt", "trainer_state.json", "config.yaml"}
    AutoModelForCausalLM.from_pretrained(tmp_path / "model")
