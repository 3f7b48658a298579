"""Faults injected into training: kills, corrupted shards, a full disk, hostile manifests, configs and archives.

Every fault must end in a clean, documented outcome: no traceback, the documented exit code, a message naming
the file, and nothing of the previous good state lost (latest checkpoint, shards).
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from faults import run_cli, sigkill, wait_for
from trainer_fixtures import base_config, make_sft_shards, poison_parameters_at, write_config

from aligndata.write.shards import MANIFEST, ShardError, verify_shards
from aligntrain.checkpoint import CHECKPOINTS, latest_checkpoint
from aligntrain.cli import main as aligntrain_main
from aligntrain.config import load_config
from aligntrain.trainer import train


def aligntrain(capsys, *args) -> tuple[int, str]:
    code = aligntrain_main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


# -- shards damaged after conversion ----------------------------------------------------------------

@pytest.mark.parametrize("damage", ["flip-a-byte", "truncate", "delete"])
def test_damaged_shard_is_detected_by_aligntrain_at_start(tmp_path, capsys, tiny_model, damage):
    shards = make_sft_shards(tmp_path / "sft", tiny_model, n_train=16, n_eval=0)
    shard = shards / "train" / "shard-00000.arrow"
    data = shard.read_bytes()
    if damage == "flip-a-byte":
        shard.write_bytes(data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:])
    elif damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.unlink()
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run")
    code, err = aligntrain(capsys, "sft", shards, cfg)
    assert code == 2  # damaged input (as in aligndata); shards that do not fit the config are exit 1
    problem = "shard listed in the manifest is missing" if damage == "delete" else "checksum mismatch"
    assert err.startswith(f"error: {shard}: {problem}")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run" / CHECKPOINTS).exists()  # refused before any training


# -- a full disk --------------------------------------------------------------------------------------

def test_full_disk_during_checkpoint_save_keeps_the_previous_checkpoint_latest(tmp_path, capsys, tiny_model,
                                                                               sft_shards, monkeypatch):
    real_save, saves = torch.save, []

    def disk_fills_on_the_second_checkpoint(obj, f, *args, **kwargs):
        saves.append(str(f))
        if "step-0000002" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_on_the_second_checkpoint)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", save_every_steps=1)
    code, err = aligntrain(capsys, "sft", sft_shards, cfg)
    assert code == 2
    last = err.splitlines()[-1]  # after the progress lines of steps 1 and 2
    assert last == (f"error: {tmp_path / 'run' / CHECKPOINTS / '.tmp-step-0000002' / 'scheduler.pt'}: "
                    "No space left on device")
    assert latest_checkpoint(tmp_path / "run" / CHECKPOINTS).name == "step-0000001"
    monkeypatch.setattr(torch, "save", real_save)
    resumed = train(load_config(cfg), sft_shards, resume=True)  # and the run goes on from it
    assert resumed.steps == 4 and len(resumed.history) == 3


@pytest.mark.slow
@pytest.mark.parametrize("fails_at", ["model.safetensors", "optimizer.pt"])
def test_full_disk_in_a_real_checkpoint_save_is_a_clean_exit_2(tmp_path, tiny_model, sft_shards, fails_at):
    weights = (tiny_model / "model.safetensors").stat().st_size  # a checkpoint's weights are as large
    limit = weights // 2 if fails_at == "model.safetensors" else weights + 8000  # the optimizer state is ~2x
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", save_every_steps=1, n_examples=16)
    proc = run_cli("aligntrain", "sft", sft_shards, cfg, limit=limit)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(
        f"error: {tmp_path / 'run' / CHECKPOINTS / '.tmp-step-0000001' / fails_at}: write failed, disk full? (")
    assert latest_checkpoint(tmp_path / "run" / CHECKPOINTS) is None  # the half-written save is not a checkpoint


def test_non_finite_loss_through_the_cli_is_exit_3_naming_the_step(tmp_path, capsys, tiny_model, sft_shards,
                                                                    monkeypatch):
    poison_parameters_at(monkeypatch, 3, float("inf"))
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", save_every_steps=1)
    code, err = aligntrain(capsys, "sft", sft_shards, cfg)
    assert code == 3
    assert err.splitlines()[-1].startswith("error: loss is ") and err.splitlines()[-1].endswith(
        " at step 3; stopped before the optimizer step; the last good checkpoint is kept")
    assert latest_checkpoint(tmp_path / "run" / CHECKPOINTS).name == "step-0000002"


# -- hostile manifests, configs and archives ------------------------------------------------------------

@pytest.mark.parametrize("rel", ["../../etc/passwd", "/etc/passwd", "train/../../outside.arrow"])
def test_manifest_shard_path_outside_the_directory_is_refused(tmp_path, capsys, tiny_model, rel):
    shards = make_sft_shards(tmp_path / "sft", tiny_model, n_train=16, n_eval=0)
    manifest = json.loads((shards / MANIFEST).read_text())
    manifest["splits"]["train"]["files"][0]["path"] = rel
    (shards / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="escapes the shard directory"):
        verify_shards(shards)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run")
    code, err = aligntrain(capsys, "sft", shards, cfg)
    assert (code, err) == (2, f"error: {shards}/{MANIFEST}: shard path {rel!r} escapes the shard directory\n")


@pytest.mark.parametrize("exp_name", ["../../escaped", "/tmp/escaped", "runs/../../escaped"])
def test_config_run_name_cannot_escape_the_runs_directory(tmp_path, capsys, tiny_model, sft_shards, exp_name):
    cfg = base_config(tiny_model, tmp_path / "run", exp_name=exp_name)
    del cfg["output_dir"]  # the run directory is then runs/<exp_name>
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    code, err = aligntrain(capsys, "sft", sft_shards, path)
    assert (code, err) == (1, f"error: cfg.yml: key 'exp_name' {exp_name!r} must stay inside the runs directory "
                              "(no absolute path, no '..')\n")


def test_config_yaml_never_runs_code(tmp_path, capsys, tiny_model, sft_shards):
    marker = tmp_path / "pwned"
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(base_config(tiny_model, tmp_path / "run")).replace(
        "exp_name: tiny", f"exp_name: !!python/object/apply:os.system ['touch {marker}']"))
    code, err = aligntrain(capsys, "sft", sft_shards, path)
    assert code == 1 and err.startswith("error: cfg.yml: not valid YAML (could not determine a constructor")
    assert not marker.exists()


class _Payload:
    """Unpickling this runs `touch MARKER`: what a malicious `policy.pt` would do with a plain torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_archive_is_refused_and_never_runs(tmp_path, capsys, tiny_model, sft_shards):
    marker, archive = tmp_path / "pwned", tmp_path / "policy.pt"
    torch.save({"state": _Payload(marker)}, archive)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", model={"archive": str(archive)})
    code, err = aligntrain(capsys, "sft", sft_shards, cfg)
    assert code == 1 and err.startswith(f"error: model.archive: {archive}")
    assert not marker.exists()
    assert not (tmp_path / "run" / CHECKPOINTS).exists()


# -- training killed by SIGKILL, then resumed ------------------------------------------------------------

@pytest.mark.slow
def test_training_killed_by_sigkill_resumes_with_identical_losses(tmp_path, tiny_model, sft_shards):
    changes = dict(n_epochs=2, save_every_steps=3)
    straight = train(load_config(write_config(tmp_path / "straight.yml", tiny_model, tmp_path / "run-straight",
                                              **changes)), sft_shards)
    cfg = write_config(tmp_path / "killed.yml", tiny_model, tmp_path / "run-killed", **changes)
    kill_after = random.Random(7).randint(4, 7)  # steps logged before the kill (8 in all)
    # Each step is slowed down (not changed) so that the kill lands between, during or just after saves.
    code = ("import sys, time; import aligntrain.trainer as t; real = t.train_step\n"
            "def slow(*a, **k):\n    time.sleep(0.05)\n    return real(*a, **k)\n"
            "t.train_step = slow; from aligntrain.cli import main\n"
            f"sys.exit(main(['sft', {str(sft_shards)!r}, {str(cfg)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run-killed" / "metrics.jsonl"

    def logged() -> int:
        return metrics.read_text().count('"split": "train"') if metrics.exists() else 0

    wait_for(lambda: logged() >= kill_after, proc, timeout=120)
    sigkill(proc)
    latest = latest_checkpoint(tmp_path / "run-killed" / CHECKPOINTS)
    done = int(latest.name.split("-")[1])
    assert done == kill_after // 3 * 3 or done == (kill_after - 1) // 3 * 3  # the last complete save, never a .tmp-
    resumed = train(load_config(cfg), sft_shards, resume=True)
    loss = [h["loss"] for h in straight.history]
    assert [h["loss"] for h in resumed.history] == loss[done:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, 9))
