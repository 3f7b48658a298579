"""Configs that try to make aligntrain work forever, leak a secret, or write where a run must not:
alias bombs, chained references, environment values, run directories that are not ours."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from trainer_fixtures import base_config

from aligntrain.cli import main as aligntrain_main
from aligntrain.config import MAX_VALUE_CHARS, MAX_YAML_NODES, ConfigError, load_config, to_dict, to_yaml
from aligntrain.trainer import train


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yml"
    path.write_text(text)
    return path


def refused_quickly(path: Path, match: str) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    assert time.monotonic() - started < 2.0


# -- limits ---------------------------------------------------------------------------------------------

def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 leaves
    path = write(tmp_path, "exp_name: bomb\n" + "\n".join(levels) + "\nmodel: {name_or_path: m}\n")
    refused_quickly(path, f"^cfg.yml: the YAML expands to more than {MAX_YAML_NODES} values through its aliases")


def test_yaml_alias_to_a_node_that_contains_it_is_refused(tmp_path):
    refused_quickly(write(tmp_path, "exp_name: &e [*e]\n"), "expands to more than")


def test_yaml_nested_too_deeply_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="^cfg.yml: the YAML is nested too deeply$"):  # not a RecursionError
        load_config(write(tmp_path, "exp_name: " + "[" * 5000 + "]" * 5000 + "\n"))


def test_references_that_multiply_are_refused_past_the_size_limit(tmp_path):
    # each key repeats the one before ten times: 10**9 characters at the end, if it were expanded
    keys = ["exp_name", "output_dir", "chat_template", "model.tokenizer_name_or_path", "model.archive",
            "wandb.entity", "wandb.project", "model.name_or_path"]
    cfg: dict = {"exp_name": "x" * 10, "model": {}, "wandb": {}}
    for before, key in zip(keys, keys[1:]):
        group, _, name = key.rpartition(".")
        (cfg[group] if group else cfg)[name] = "".join(["${" + before + "}"] * 10)
    refused_quickly(write(tmp_path, yaml.safe_dump(cfg)), f"its references expand past {MAX_VALUE_CHARS} characters")


def test_reference_chains_deeper_than_the_limit_are_refused(tmp_path):
    keys = ["seed", "total_batch_size", "gradient_accumulation_steps", "eval_batch_size", "max_length", "n_epochs",
            "warmup_steps", "log_every_steps", "logprob_chunk_tokens", "keep_checkpoints", "save_every_steps",
            "eval_every_steps", "n_eval_examples", "tokens_per_batch", "n_examples", "max_prompt_length", "lr",
            "weight_decay"]  # 17 references, one after the other
    cfg = {"exp_name": "chain", "model": {"name_or_path": "m"}, "weight_decay": 1}
    cfg.update({key: "${" + after + "}" for key, after in zip(keys, keys[1:])})
    refused_quickly(write(tmp_path, yaml.safe_dump(cfg)), r"^cfg.yml: \$\{[a-z_]+\}: references nested more than 16 deep$")


def test_unknown_keys_are_reported_before_references_are_resolved(tmp_path, monkeypatch):
    monkeypatch.delenv("ALIGNTOOLS_UNSET", raising=False)
    path = write(tmp_path, "exp_name: ${oc.env:ALIGNTOOLS_UNSET}\nmodel: {name_or_path: m, polcy_dtype: bfloat16}\n")
    with pytest.raises(ConfigError, match=r"^cfg.yml: unknown key 'model.polcy_dtype' \(did you mean 'model.policy_dtype'\?\)$"):
        load_config(path)


def test_short_reference_chains_still_resolve(tmp_path):
    cfg = load_config(write(tmp_path, "exp_name: demo\nchat_template: ${output_dir}/t.jinja\nmodel: {name_or_path: m}\n"
                                      "wandb: {project: '${chat_template}-${exp_name}'}\n"))
    assert cfg.wandb.project == "runs/demo/t.jinja-demo"


# -- the environment's values stay out of the run's files -------------------------------------------------

def test_values_read_from_the_environment_are_saved_as_written(tmp_path, monkeypatch, tiny_model, sft_shards):
    monkeypatch.setenv("ALIGNTOOLS_SECRET", "s3cr3t-value")
    raw = base_config(tiny_model, tmp_path / "run", n_examples=8, wandb={"enabled": False,
                                                                          "entity": "${oc.env:ALIGNTOOLS_SECRET}"})
    raw["exp_name"] = "team-${oc.env:ALIGNTOOLS_SECRET}"
    del raw["output_dir"]  # runs/${exp_name}: reads the environment through exp_name
    cfg = load_config(write(tmp_path, yaml.safe_dump(raw)))
    assert (cfg.wandb.entity, cfg.exp_name, cfg.output_dir) == ("s3cr3t-value", "team-s3cr3t-value",
                                                                 "runs/team-s3cr3t-value")
    saved = yaml.safe_load(to_yaml(cfg))
    assert (saved["wandb"]["entity"], saved["exp_name"], saved["output_dir"]) == (
        "${oc.env:ALIGNTOOLS_SECRET}", "team-${oc.env:ALIGNTOOLS_SECRET}", "runs/${exp_name}")
    assert to_dict(cfg)["wandb"]["entity"] == "${oc.env:ALIGNTOOLS_SECRET}"  # what wandb is given
    assert saved["model"]["name_or_path"] == str(tiny_model)  # values without the environment are saved resolved

    cfg.output_dir = str(tmp_path / "run")
    result = train(cfg, sft_shards)
    for path in [result.run_dir / "config.yaml", *result.checkpoint.iterdir()]:
        assert b"s3cr3t" not in path.read_bytes(), path


# -- run directories ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("output_dir", ["~", "/", "HOME"])
def test_run_directory_cannot_be_the_root_or_the_home_directory(tmp_path, monkeypatch, output_dir):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    path = write(tmp_path, yaml.safe_dump({"exp_name": "x", "model": {"name_or_path": "m"},
                                           "output_dir": str(home) if output_dir == "HOME" else output_dir}))
    what = "the filesystem root" if output_dir == "/" else "the home directory itself"
    shown = "/" if output_dir == "/" else str(home)
    with pytest.raises(ConfigError, match=f"^cfg.yml: key 'output_dir' is {shown}, {what}; a run needs a directory"):
        load_config(path)


def test_run_directory_that_holds_other_files_is_refused(tmp_path, capsys, tiny_model, sft_shards):
    notes = tmp_path / "my-notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(base_config(tiny_model, notes, n_examples=8)))
    code = aligntrain_main(["sft", str(sft_shards), str(cfg)])
    err = capsys.readouterr().err
    assert (code, err) == (1, f"error: key 'output_dir': {notes} is not empty and is not a training run "
                              "(thesis.tex); choose a new directory for the run\n")
    assert sorted(p.name for p in notes.iterdir()) == ["thesis.tex"]
