"""What a new user meets first: values taken from defaults are named, `train` needs loss.name, max_length
follows the shards, --help lists --overrides and --version exists, the display keeps step/total and ETA first."""

import io
import json
import re
import shutil
import subprocess
import sys

import yaml
from rich.console import Console
from trainer_fixtures import base_config, write_config

from aligntrain.cli import main
from aligntrain.config import Config, defaults_note, load_config
from aligntrain.metrics import MetricsLogger


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_defaults_note_names_every_value_the_config_left_out_and_only_those(tmp_path):
    cfg_file = tmp_path / "cfg.yml"
    cfg_file.write_text("exp_name: x\nmodel: {name_or_path: m}\nloss: {name: sft}\neval_every_steps: null\n")
    note = defaults_note(load_config(cfg_file, ["total_batch_size=4"]), width=10_000)
    assert note.startswith("defaults (not set in the config): seed=0, debug=false, datasets=[], ")
    assert "lr=5e-07" in note and "n_epochs=1" in note and "max_length=null" in note
    for written in ("exp_name=", "model.name_or_path=", "loss.name=", "eval_every_steps=", "total_batch_size="):
        assert written not in note  # set by the file (null counts) or by --overrides


def test_a_run_prints_the_defaults_it_used(tmp_path, capsys, tiny_model, sft_shards):
    raw = base_config(tiny_model, tmp_path / "run")
    del raw["lr"]
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(raw))
    code, _, err = run(capsys, "sft", sft_shards, cfg, "--json", "--overrides", "n_examples=8")
    assert code == 0, err
    [block] = [line for line in err.splitlines() if line.startswith("defaults (not set in the config): ")]
    assert "lr=5e-07" in err and "n_examples" not in block


def test_train_without_loss_name_is_a_config_error(tmp_path, capsys, tiny_model):
    raw = base_config(tiny_model, tmp_path / "run", datasets=[{"type": "custom_dataset", "path": "x.jsonl"}])
    del raw["loss"]
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(raw))
    assert run(capsys, "train", cfg)[::2] == (
        1, "error: cfg.yml: missing required key 'loss.name' (`aligntrain train` trains what it names: "
           "sft, dpo, ipo, hinge)\n")


def test_max_length_left_unset_follows_the_shards(tmp_path, capsys, tiny_model, sft_shards):
    raw = base_config(tiny_model, tmp_path / "run", n_examples=8)
    del raw["max_length"]
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(raw))
    code, _, err = run(capsys, "sft", sft_shards, cfg, "--json")
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["max_length"] == 64  # the shards'


def test_shards_without_a_limit_say_how_to_follow_them(tmp_path, capsys, tiny_model, sft_shards):
    shards = tmp_path / "shards"
    shutil.copytree(sft_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["settings"]["max_length"] = None  # converted without --max-length
    (shards / "manifest.json").write_text(json.dumps(manifest))
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run")
    code, _, err = run(capsys, "sft", shards, cfg)
    assert code == 1
    assert err == (f"error: {shards}: shards were converted with max_length=None but the config says max_length=64; "
                   "re-convert with --max-length 64 or remove max_length from the config (it then follows the shards, "
                   "converted without a limit)\n")


def test_help_lists_overrides_and_usage_lines_name_the_arguments(capsys):
    for command in ("sft", "dpo", "train", "config", "precompute-ref"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and "  --overrides KEY=VALUE ...  " in out, command
    _, out, _ = run(capsys, "sft", "--help")
    assert out.startswith("Usage: aligntrain sft [OPTIONS] SHARDS CONFIG\n")
    _, out, _ = run(capsys, "generate", "--help")
    assert out.startswith("Usage: aligntrain generate [OPTIONS] MODEL_DIR...\n")
    assert "<list[" not in out and "-p, --prompt TEXT " in out


def test_version(capsys):
    from aligntrain import __version__

    assert run(capsys, "--version")[:2] == (0, f"aligntrain {__version__}\n")


def test_progress_at_80_columns_shows_step_total_and_eta_before_the_metrics(tmp_path):
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    log = MetricsLogger(Config(exp_name="dpo_smollm2_pirate"), tmp_path, total_steps=12, start_step=0, enabled=True,
                        console=console)
    log.log(3, "train", {"loss": 0.6931, "rewards/accuracies": 0.75, "rewards/margins": 0.0123, "grad_norm": 12.5,
                         "lr": 5e-6, "examples_per_s": 1.5, "tokens_per_s": 250.0}, show=False)
    log.close()
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue()).replace("\r", "\n").splitlines()
    line = [line for line in lines if "3/12" in line][-1]
    assert len(line) <= 80
    assert re.match(r"step +3/12 \d:\d\d:\d\d ETA \S+ .*loss 0.6931 ", line)  # the metrics last, cut at the right


def test_generate_into_a_pipe_prints_no_loading_bars(tiny_model):
    result = subprocess.run([sys.executable, "-m", "aligntrain", "generate", str(tiny_model), "-p", "Hi",
                             "--max-new-tokens", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Loading weights" not in result.stderr and "it/s]" not in result.stderr


def test_keys_of_other_trainers_get_suggestions_by_meaning(tmp_path, capsys):
    for key, meant in [("learning_rate", "lr"), ("epochs", "n_epochs"), ("num_epochs", "n_epochs"),
                       ("warmup", "warmup_steps"), ("max_seq_length", "max_length")]:
        cfg = tmp_path / "cfg.yml"
        cfg.write_text(f"exp_name: x\nmodel: {{name_or_path: m}}\n{key}: 1\n")
        assert run(capsys, "config", cfg)[::2] == (1, f"error: cfg.yml: unknown key {key!r} (did you mean {meant!r}?)\n")
    assert run(capsys, "config", cfg, "--overrides", "learning_rate=1")[2] == \
        "error: --overrides: unknown key 'learning_rate' (did you mean 'lr'?)\n"


def test_an_override_of_the_wrong_type_is_the_overrides_error(tmp_path, capsys):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("exp_name: x\nmodel: {name_or_path: m}\n")
    assert run(capsys, "config", cfg, "--overrides", "lr=fast")[::2] == \
        (1, "error: --overrides lr=fast: key 'lr' must be a number, got 'fast' (str)\n")
