"""The demo's configs (sample_data/seed_config*.yml, scripts/demo.sh): small on disk, and a DPO stage whose
proof is measured on pairs it never trained on, before and after."""

import json
import re

import pytest

from aligndata.read.reader import RecordStream
from aligndata.write.convert import _in_eval
from aligndata.write.shards import sha256_file
from aligntrain.cli import main
from aligntrain.config import load_config
from paths import REPO

SFT_CONFIG = REPO / "sample_data" / "seed_config.yml"
DPO_CONFIG = REPO / "sample_data" / "seed_config_dpo.yml"


def test_demo_configs_keep_one_checkpoint_without_optimizer_state():
    for path in (SFT_CONFIG, DPO_CONFIG):
        cfg = load_config(path)
        assert (cfg.keep_checkpoints, cfg.save_optimizer) == (1, False), path.name


def test_dpo_demo_measures_a_held_out_split_before_and_after():
    cfg = load_config(DPO_CONFIG)
    assert cfg.eval_fraction > 0 and cfg.do_first_eval and cfg.n_eval_examples is None
    assert cfg.eval_every_steps >= 100  # larger than the run: the end of the run is the only other eval


def test_demo_generates_on_prompts_of_held_out_pairs(monkeypatch):
    """The prompts `aligntrain generate` gets in demo.sh belong to pairs that the eval split holds out."""
    monkeypatch.chdir(REPO)
    script = (REPO / "scripts" / "demo.sh").read_text()
    generate = script[script.index('step "generations on held-out prompts'):]
    prompts = re.findall(r'-p "([^"]+)"', generate.split("\n\n")[0])
    assert len(prompts) == 2
    cfg = load_config(DPO_CONFIG)
    for prompt in prompts:
        held_out = []
        for ds in cfg.datasets:
            sha = sha256_file(ds.path)
            with RecordStream(ds.path) as stream:
                held_out += [_in_eval(cfg.seed, sha, r.index, cfg.eval_fraction) for r in stream
                             if prompt in json.dumps(r.value, ensure_ascii=False)]
        assert held_out == [True], prompt


@pytest.mark.slow
def test_dpo_demo_config_runs_and_reports_held_out_numbers_before_and_after(tmp_path, capsys, tiny_model,
                                                                            monkeypatch):
    """`aligntrain train sample_data/seed_config_dpo.yml` with the tiny model in place of SmolLM2 and no archive."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(REPO)
    code = main(["train", str(DPO_CONFIG), "--json", "--overrides", f"model.name_or_path={tiny_model}",
                 "model.archive=null", f"output_dir={tmp_path / 'run'}", "n_examples=8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    for when in ("eval_before_training", "eval"):
        assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(summary[when])
    assert summary["eval_before_training"]["rewards/margins"] == 0.0  # the policy is the reference at step 0
    [checkpoint] = (tmp_path / "run" / "checkpoints").iterdir()
    assert not list(checkpoint.glob("optimizer*"))
    manifest = json.loads(next((tmp_path / "cache" / "aligntools" / "shards").iterdir()).joinpath(
        "manifest.json").read_text())
    assert manifest["splits"]["eval"]["rows"] == 11
