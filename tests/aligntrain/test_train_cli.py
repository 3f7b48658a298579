"""The `aligntrain` CLI: one line and a documented exit code per error; the seed's `train CONFIG` path."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from trainer_fixtures import base_config, make_sft_shards, write_config

from aligntrain.cli import main
from paths import REPO, TESTS


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sft_prints_a_json_summary(tmp_path, capsys, tiny_model, sft_shards):
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", n_examples=16)
    code, out, _ = run(capsys, "sft", sft_shards, cfg, "--json", "--overrides", "lr=2e-3", "eval_every_steps=2")
    assert code == 0
    summary = json.loads(out)
    assert summary["steps"] == 2 and summary["checkpoint"].endswith("step-0000002")
    assert set(summary["eval"]) == {"loss", "trained_tokens", "input_tokens"}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == 2e-3


def test_config_errors_are_one_line_with_exit_code_1(tmp_path, capsys, tiny_model, sft_shards):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({**base_config(tiny_model, tmp_path / "run"), "lrr": 1}))
    assert run(capsys, "sft", sft_shards, cfg)[::2] == (1, "error: cfg.yml: unknown key 'lrr' (did you mean 'lr'?)\n")
    good = write_config(tmp_path / "good.yml", tiny_model, tmp_path / "run")
    assert run(capsys, "sft", sft_shards, good, "--overrides", "model.polcy_dtype=bfloat16")[::2] == \
        (1, "error: --overrides: unknown key 'model.polcy_dtype' (did you mean 'model.policy_dtype'?)\n")
    assert run(capsys, "dpo", sft_shards, good)[::2] == \
        (1, "error: good.yml: loss.name is 'sft'; `aligntrain dpo` needs dpo, ipo or hinge\n")


def test_shard_mismatch_is_exit_code_1(tmp_path, capsys, tiny_model, sft_shards):
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run")
    code, _, err = run(capsys, "sft", sft_shards, cfg, "--overrides", "max_length=128")
    assert code == 1
    assert err == (f"error: {sft_shards}: shards were converted with max_length=64 but the config says max_length=128; "
                   "re-convert with --max-length 128 or set max_length: 64\n")


def test_usage_errors_are_exit_code_2(tmp_path, capsys, tiny_model, sft_shards):
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run")
    code, _, err = run(capsys, "sft", sft_shards, tmp_path / "absent.yml")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "sft", sft_shards, cfg, "lr=1")
    assert code == 2 and "unexpected argument 'lr=1' (overrides go after --overrides" in err
    assert run(capsys, "sft", sft_shards, cfg, "--no-such-flag")[0] == 2


def test_config_command_prints_the_resolved_config(tmp_path, capsys):
    code, out, _ = run(capsys, "config", REPO / "sample_data" / "seed_config.yml", "--overrides", "lr=3e-5")
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["lr"] == 3e-5 and resolved["output_dir"] == "./runs/sft_smollm2_pirate"
    assert resolved["log_every_steps"] == 1 and "print_log_step" not in resolved


def test_generate_replies_for_each_model(tmp_path, capsys, tiny_model):
    code, out, _ = run(capsys, "generate", tiny_model, tiny_model, "-p", "Hello!", "--max-new-tokens", "4", "--json")
    assert code == 0
    [item] = json.loads(out)
    assert item["prompt"] == "Hello!" and list(item["replies"]) == [str(tiny_model)]  # same dir given twice


def test_seed_style_train_converts_caches_and_trains(tmp_path, capsys, tiny_model, monkeypatch):
    """`aligntrain train sample_data/seed_config.yml` with the tiny model in place of SmolLM2."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(REPO)
    seed_config = REPO / "sample_data" / "seed_config.yml"
    overrides = [f"model.name_or_path={tiny_model}", f"output_dir={tmp_path / 'run1'}", "n_epochs=1", "lr=1e-3"]
    code, out, err = run(capsys, "train", seed_config, "--json", "--overrides", *overrides)
    assert code == 0, err
    assert "converted shards: " + str(tmp_path / "cache" / "aligntools" / "shards") in err
    # on_error: skip in the sample config: the two tool-call chats the tiny ChatML template cannot render
    assert "2 raw records rejected (template-drops-content: 2); each with its reasons in " in err
    assert json.loads(out)["steps"] >= 1
    overrides[1] = f"output_dir={tmp_path / 'run2'}"
    code, _, err = run(capsys, "train", seed_config, "--json", "--overrides", *overrides)
    assert code == 0 and "reusing shards: " in err
    assert len(list((tmp_path / "cache" / "aligntools" / "shards").iterdir())) == 1


def test_seed_style_train_stops_at_an_invalid_raw_record_and_names_the_key_that_skips_it(tmp_path, capsys,
                                                                                       tiny_model, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    chat = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]}
    empty = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}]}
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in [chat] * 8 + [empty] + [chat] * 7))
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({**base_config(tiny_model, tmp_path / "run", loss={"name": "sft"}),
                                   "datasets": [{"type": "custom_dataset", "path": str(raw)}]}))
    code, _, err = run(capsys, "train", cfg)
    assert code == 1
    assert err.startswith(f"error: {raw}:9 (record 9) ")
    assert err.rstrip().endswith("with on_error: skip such records go to a rejects file and training goes on)")
    code, _, err = run(capsys, "train", cfg, "--overrides", "on_error=skip")
    assert code == 0, err
    assert "1 raw record rejected (empty-content: 1); each with its reasons in " in err


def test_seed_style_train_refuses_hub_datasets(tmp_path, capsys, tiny_model):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({**base_config(tiny_model, tmp_path / "run"),
                                   "datasets": [{"type": "huggingface_dataset", "name": "hh", "path": None}]}))
    code, _, err = run(capsys, "train", cfg)
    assert code == 1
    assert err.startswith("error: config: datasets[0] has type 'huggingface_dataset': only custom_dataset")


def _visible_gpus(monkeypatch, n: int, **env: str) -> None:
    """A host with `n` CUDA GPUs as torch sees it, started with `env` (WORLD_SIZE, ...) and no other launcher variable."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    for key in ("WORLD_SIZE", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_fsdp_trainer_on_several_gpus_without_a_launcher_stops_with_the_launch_command(tmp_path, capsys, tiny_model,
                                                                                     monkeypatch):
    import aligntrain.sources
    import aligntrain.trainer

    def loaded(*args, **kwargs):
        raise AssertionError("nothing is loaded before the launcher check")

    monkeypatch.setattr(aligntrain.sources, "prepare_shards", loaded)
    monkeypatch.setattr(aligntrain.trainer, "train", loaded)
    _visible_gpus(monkeypatch, 4)
    cfg = write_config(tmp_path / "my cfg.yml", tiny_model, tmp_path / "run")
    code, out, err = run(capsys, "train", cfg, "--overrides", "trainer=FSDPTrainer", "lr=2e-5")
    assert (code, out) == (2, "")
    assert err == ("error: trainer: FSDPTrainer with 4 visible GPUs needs one process per GPU (started like this it "
                   f"would train on one); run: accelerate launch --num_processes 4 -m aligntrain train '{cfg}' "
                   "--overrides trainer=FSDPTrainer lr=2e-5   (aligntrain then sets up FSDP itself, no accelerate "
                   "config needed; CUDA_VISIBLE_DEVICES=0 trains on one GPU)\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    fsdp = write_config(tmp_path / "fsdp.yml", tiny_model, tmp_path / "run", trainer="FSDPTrainer")
    code, _, err = run(capsys, "dpo", shards, fsdp, "--overrides", "loss.name=ipo")
    assert code == 2
    assert f"run: accelerate launch --num_processes 4 -m aligntrain dpo {shards} {fsdp} --overrides loss.name=ipo " in err


def test_processes_that_accelerate_does_not_join_are_refused(tmp_path, capsys, tiny_model, sft_shards, monkeypatch):
    """torchrun on CPU without ACCELERATE_USE_CPU: Accelerate sees one process, so each would train alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run")
    assert run(capsys, "sft", sft_shards, cfg)[::2] == (2, "error: the launcher started 2 processes (WORLD_SIZE) but "
                                                          "Accelerate joined 1; on CPU, set ACCELERATE_USE_CPU=true for gloo\n")


@pytest.mark.parametrize("gpus, env, idle", [(4, {}, 4), (2, {}, 2), (1, {}, 0), (0, {}, 0),
                                             (4, {"WORLD_SIZE": "4"}, 0),  # accelerate launch / torchrun
                                             (4, {"ACCELERATE_MIXED_PRECISION": "no"}, 0)])  # launched, one process
def test_only_an_unlaunched_fsdp_run_on_several_gpus_is_refused(monkeypatch, tiny_model, tmp_path, gpus, env, idle):
    from aligntrain.config import load_config
    from aligntrain.trainer import gpus_left_idle

    _visible_gpus(monkeypatch, gpus, **env)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run")
    assert gpus_left_idle(load_config(cfg, ["trainer=FSDPTrainer"])) == idle
    assert gpus_left_idle(load_config(cfg, [])) == 0  # BasicTrainer: one process is what it is


@pytest.mark.slow
def test_two_processes_read_each_epoch_once_and_match_one(tmp_path, tiny_model):
    """Two processes (torchrun, gloo DDP on CPU) over two epochs of 30 rows in steps of 8 (6 rows
    of each epoch left out, as the seed does): the processes read disjoint rows, together each kept row of an
    epoch once, the same rows per step as one process; losses and eval metrics (7 eval rows, shared 2/1 in
    the last eval batch) equal one process's."""
    shards = make_sft_shards(tmp_path / "shards", tiny_model, n_train=30, n_eval=7)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", n_epochs=2, n_eval_examples=7,
                       eval_batch_size=4, do_first_eval=True, eval_every_steps=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    # torchrun, as `accelerate launch --cpu` starts one process whatever --num_processes says; Accelerate
    # then sets up gloo only when told the processes are on CPU
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for run_name, launcher in (("one", [sys.executable]), ("two", launch)):
        (tmp_path / f"rows-{run_name}").mkdir()
        done = subprocess.run([*launcher, str(TESTS / "rows_read.py"), "sft", str(shards), str(cfg), "--json",
                               "--overrides", f"output_dir={tmp_path / run_name}"], capture_output=True, text=True,
                              env={**env, "ACCELERATE_USE_CPU": "true", "ROWS_DIR": str(tmp_path / f"rows-{run_name}")})
        assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 6  # only the main process prints

    def step_rows(run_name: str, rank: int, share: int) -> list[set[int]]:
        """The train rows process `rank` read, step by step (`share` rows per step)."""
        reads = [json.loads(line) for line in (tmp_path / f"rows-{run_name}" / f"rank-{rank}.jsonl").read_text().splitlines()]
        rows = [i for split, indices in reads if split == "train" for i in indices]
        return [set(rows[k:k + share]) for k in range(0, len(rows), share)]

    one, ranks = step_rows("one", 0, 8), [step_rows("two", rank, 4) for rank in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 6
    assert [r0 | r1 for r0, r1 in zip(*ranks)] == one and all(not r0 & r1 for r0, r1 in zip(*ranks))
    for epoch in (one[:3], one[3:]):
        assert sum(len(step) for step in epoch) == len(set().union(*epoch)) == 24  # every row at most once
    assert set().union(*one[:3]) != set().union(*one[3:])  # each epoch leaves other rows out

    def metrics(run_name: str) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "examples_per_s", "tokens_per_s")}
                for line in (tmp_path / run_name / "metrics.jsonl").read_text().splitlines()]

    assert [m["split"] for m in metrics("two")].count("eval") == 3  # before training, after steps 3 and 6
    assert metrics("two") == [pytest.approx(m, abs=1e-5) for m in metrics("one")]


def test_module_entry_point_prints_no_traceback(tmp_path, tiny_model, sft_shards):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("exp_name: x\nmodel: {name_or_path: m}\nloss: {name: sft}\ntotal_batch_size: many\n")
    result = subprocess.run([sys.executable, "-m", "aligntrain", "sft", str(sft_shards), str(cfg)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == "error: cfg.yml: key 'total_batch_size' must be an integer, got 'many' (str)\n"


def test_missing_model_directory_is_a_config_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    monkeypatch.chdir(REPO)
    code, _, err = run(capsys, "train", REPO / "sample_data" / "seed_config.yml")
    missing = tmp_path / "empty" / "aligntools" / "smollm2-135m-instruct"
    assert (code, err) == (1, f"error: cannot load tokenizer '{missing}': no such file or directory\n")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU-only case")
@pytest.mark.parametrize("env,fsdp2", [({"WORLD_SIZE": "2"}, False), ({"ACCELERATE_USE_FSDP": "true"}, True)])
def test_accelerates_fsdp_without_a_gpu_is_a_config_error_not_a_traceback(monkeypatch, tiny_model, tmp_path, env, fsdp2):
    """Accelerate's FSDP (an FSDP accelerate config, or FSDPTrainer where torch has no FSDP2) has no CPU path."""
    from aligntrain import sharding
    from aligntrain.config import ConfigError, load_config
    from aligntrain.trainer import make_accelerator

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sharding, "fsdp2_available", lambda: fsdp2)
    cfg = load_config(write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", trainer="FSDPTrainer"))
    with pytest.raises(ConfigError, match="Accelerate's FSDP .* shards the model over GPUs and there is none here"):
        make_accelerator(cfg, None)
