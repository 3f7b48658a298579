"""Config: seed keys load unchanged; every kind of mistake fails on load with a message naming the key."""

from pathlib import Path

import pytest
import yaml

from aligntrain.config import ConfigError, load_config, to_yaml
from paths import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    """The message of the ConfigError that loading `text` (with `overrides`) raises."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    return str(e.value)


MINIMAL = "exp_name: demo\nmodel: {name_or_path: /models/tiny}\nloss: {name: dpo}\n"


def test_seed_config_keys_load_unchanged(tmp_path):
    cfg = load_config(REPO / "sample_data" / "seed_config.yml")
    assert cfg.trainer == "BasicTrainer"
    assert cfg.datasets[0].type == "custom_dataset"
    assert cfg.loss.name in ("sft", "dpo")
    assert cfg.output_dir.endswith(cfg.exp_name)  # `${exp_name}` resolved


def test_seed_spellings_map_to_ours_and_scientific_strings_are_numbers(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "lr: 5e-7\noutput_dirs: ./outputs/${exp_name}\nsave_model_step: 50\n"
                                                "print_log_step: 10\nsave_optimizer: false\n"))
    assert cfg.lr == 5e-7  # PyYAML reads `5e-7` as a string; the seed's configs are full of them
    assert (cfg.output_dir, cfg.save_every_steps, cfg.log_every_steps, cfg.save_optimizer) == \
        ("./outputs/demo", 50, 10, False)


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    assert error_of(tmp_path, MINIMAL + "lrr: 1e-5\n") == "cfg.yml: unknown key 'lrr' (did you mean 'lr'?)"


def test_unknown_nested_key_names_the_closest_valid_one(tmp_path):
    text = "exp_name: demo\nmodel: {name_or_path: m, polcy_dtype: bfloat16}\nloss: {name: sft}\n"
    assert error_of(tmp_path, text) == \
        "cfg.yml: unknown key 'model.polcy_dtype' (did you mean 'model.policy_dtype'?)"


def test_missing_required_key(tmp_path):
    assert error_of(tmp_path, "exp_name: demo\nloss: {name: sft}\n") == \
        "cfg.yml: missing required key 'model.name_or_path'"


def test_wrong_type(tmp_path):
    assert error_of(tmp_path, MINIMAL + "lr: fast\n") == "cfg.yml: key 'lr' must be a number, got 'fast' (str)"
    assert error_of(tmp_path, MINIMAL + "total_batch_size: 2.5\n") == \
        "cfg.yml: key 'total_batch_size' must be an integer, got 2.5 (float)"
    assert error_of(tmp_path, MINIMAL + "do_first_eval: 'yes'\n") == \
        "cfg.yml: key 'do_first_eval' must be true or false, got 'yes' (str)"


def test_choice_suggests_the_right_spelling(tmp_path):
    assert error_of(tmp_path, MINIMAL + "optimizer: adamw\n") == \
        "cfg.yml: key 'optimizer' must be one of AdamW, Adam, RMSprop, SGD; got 'adamw' (did you mean 'AdamW'?)"


def test_dotted_overrides_reach_nested_keys_and_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["model.policy_dtype=bfloat16", "lr=2e-5", "loss.beta=0.5",
                                                 "eval_every_steps=null", "n_epochs=3"])
    assert (cfg.model.policy_dtype, cfg.lr, cfg.loss.beta, cfg.eval_every_steps, cfg.n_epochs) == \
        ("bfloat16", 2e-5, 0.5, None, 3)


def test_override_of_a_key_that_does_not_exist_fails(tmp_path):
    assert error_of(tmp_path, MINIMAL, ["model.polcy_dtype=bfloat16"]) == \
        "--overrides: unknown key 'model.polcy_dtype' (did you mean 'model.policy_dtype'?)"
    assert error_of(tmp_path, MINIMAL, ["lr"]) == "--overrides: 'lr' is not of the form key=value"


def test_override_value_is_type_checked(tmp_path):
    assert error_of(tmp_path, MINIMAL, ["model.policy_dtype=float64"]) == \
        ("--overrides model.policy_dtype=float64: key 'model.policy_dtype' must be one of float32, bfloat16, float16; "
                            "got 'float64' (did you mean 'float16'?)")


def test_semantic_rules_name_the_key(tmp_path):
    cases = {
        "total_batch_size: 8\ngradient_accumulation_steps: 3\n":
            "cfg.yml: key 'total_batch_size' (8) must be divisible by gradient_accumulation_steps (3)",
        "max_length: 128\nmax_prompt_length: 128\n":
            "cfg.yml: key 'max_prompt_length' must be smaller than max_length (128), got 128",
        "n_epochs: null\n": "cfg.yml: set n_epochs or n_examples (both are null)",
        "lr: 0\n": "cfg.yml: key 'lr' must be > 0, got 0.0",
    }
    for extra, message in cases.items():
        assert error_of(tmp_path, MINIMAL + extra) == message


def test_label_smoothing_only_for_dpo(tmp_path):
    assert error_of(tmp_path, "exp_name: d\nmodel: {name_or_path: m}\nloss: {name: ipo, label_smoothing: 0.1}\n") == \
        "cfg.yml: key 'loss.label_smoothing' applies to loss.name: dpo only (conservative DPO), not 'ipo'"


def test_seed_readme_batch_size_override_means_total_batch_size(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["lr=2e-5", "batch_size=32"])
    assert (cfg.lr, cfg.total_batch_size) == (2e-5, 32)
    assert load_config(write(tmp_path, MINIMAL + "batch_size: 16\n")).total_batch_size == 16


def test_max_prompt_length_is_checked_and_defaulted_only_for_preference_losses(tmp_path):
    sft = "exp_name: s\nmodel: {name_or_path: m}\nloss: {name: sft}\nmax_length: 256\n"
    assert load_config(write(tmp_path, sft)).max_prompt_length is None  # SFT never reads it
    assert load_config(write(tmp_path, MINIMAL + "max_length: 256\n")).max_prompt_length == 128  # half, as the seed's 256/512
    assert load_config(write(tmp_path, MINIMAL), defaults={"max_length": 512}).max_prompt_length == 256  # `train`
    assert load_config(write(tmp_path, MINIMAL)).max_prompt_length is None  # max_length follows the shards
    assert load_config(write(tmp_path, MINIMAL + "max_prompt_length: 100\n")).max_prompt_length == 100


def test_alias_and_new_spelling_together_is_refused(tmp_path):
    assert error_of(tmp_path, MINIMAL + "output_dirs: a\noutput_dir: b\n") == \
        "cfg.yml: keys 'output_dirs' and 'output_dir' mean the same thing; keep one"


def test_reference_to_an_unset_key_fails(tmp_path):
    assert error_of(tmp_path, MINIMAL + "output_dir: runs/${nope}\n") == \
        "cfg.yml: ${nope} refers to a key that is not set"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "output_dirs: ./outputs/${exp_name}\n"), ["lr=3e-6"])
    again = load_config(write(tmp_path, to_yaml(cfg)))
    assert again == cfg
    assert yaml.safe_load(to_yaml(cfg))["output_dir"] == "./outputs/demo"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yml")
    assert error_of(tmp_path, "exp_name: [unclosed\n").startswith("cfg.yml: not valid YAML (")


def test_environment_references_follow_omegaconf(tmp_path, monkeypatch):
    text = "exp_name: d\nloss: {name: sft}\nmodel: {name_or_path: '${oc.env:XDG_CACHE_HOME,~/.cache}/m'}\n"
    monkeypatch.setenv("XDG_CACHE_HOME", "/cache")
    assert load_config(write(tmp_path, text)).model.name_or_path == "/cache/m"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert load_config(write(tmp_path, text)).model.name_or_path == str(Path.home() / ".cache" / "m")
