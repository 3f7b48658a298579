"""A run's life beyond one uninterrupted process: two trainings on one run directory, --resume with
changed settings, SIGTERM / SIGUSR1 / Ctrl-C, damaged checkpoints, a full disk, the chat template shipped."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from faults import wait_for
from rich.console import Console
from trainer_fixtures import interrupt, make_sft_shards, trainer_calls_at, write_config

from aligndata.encode.template import BUILTIN_TEMPLATES, resolve_chat_template
from aligndata.encode.tokenizer import load_tokenizer
from aligndata.write.shards import MANIFEST
from aligntrain.checkpoint import CHECKPOINTS, latest_checkpoint
from aligntrain.cli import main as aligntrain_main
from aligntrain.config import load_config
from aligntrain.runlock import LOCK_FILE, hold_run_lock
from aligntrain.trainer import train


def aligntrain(capsys, *args) -> tuple[int, str]:
    code = aligntrain_main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, without_defaults_note(captured.err)


def without_defaults_note(err: str) -> str:
    """stderr less the block that names the config's defaulted values (printed before every run)."""
    kept, in_note = [], False
    for line in err.splitlines(keepends=True):
        in_note = line.startswith("defaults (not set in the config):") or (in_note and line.startswith("  "))
        if not in_note:
            kept.append(line)
    return "".join(kept)


def losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


@pytest.fixture(scope="module")
def run_at_step_2(tmp_path_factory, tiny_model, sft_shards):
    """A run whose latest checkpoint is step 2 of 4 (step 4's was lost) and whose metrics.jsonl logged steps
    1-4, as after a kill during step 4's save; and the losses of its 4 steps. Trained once, copied per test."""
    root = tmp_path_factory.mktemp("step-2-of-4")
    cfg = write_config(root / "cfg.yml", tiny_model, root / "run", n_examples=32, save_every_steps=2)
    straight = train(load_config(cfg), sft_shards, console=Console(file=io.StringIO()))
    shutil.rmtree(root / "run" / CHECKPOINTS / "step-0000004")
    return root / "run", losses(straight)


def copy_of(run_at_step_2, tmp_path, tiny_model, **changes):
    """The run at step 2 copied to tmp_path/run, with its config (plus `changes`) in tmp_path/cfg.yml."""
    shutil.copytree(run_at_step_2[0], tmp_path / "run")
    return write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", n_examples=32, save_every_steps=2,
                        **changes)


# -- one training per run directory ---------------------------------------------------------------------

def test_a_second_training_into_a_locked_run_directory_exits_2_naming_the_holder(tmp_path, capsys, tiny_model,
                                                                                  sft_shards):
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", n_examples=8)
    with hold_run_lock(tmp_path / "run"):  # the first training, as far as the lock can tell
        code, err = aligntrain(capsys, "sft", sft_shards, cfg)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # nothing written
    assert code == 2
    assert err.startswith(f"error: {tmp_path / 'run'}: this run directory is being written by another run "
                          f"(pid {os.getpid()} on {socket.gethostname()}, started ")
    assert err.endswith("); wait for it to end or choose another output_dir\n")
    assert aligntrain(capsys, "sft", sft_shards, cfg)[0] == 0  # released with the block


@pytest.mark.slow
def test_the_lock_of_a_killed_training_is_released(tmp_path, capsys, tiny_model, sft_shards):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from aligntrain.runlock import hold_run_lock\n"
                               f"with hold_run_lock({str(tmp_path / 'run')!r}):\n"
                               "    print('locked', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", n_examples=8)
    code, err = aligntrain(capsys, "sft", sft_shards, cfg)
    assert code == 2 and f"(pid {holder.pid} on " in err
    holder.kill()
    holder.wait()
    assert aligntrain(capsys, "sft", sft_shards, cfg)[0] == 0


def test_a_failed_start_leaves_no_run_directory(tmp_path, capsys, tiny_model, sft_shards):
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", max_length=128)  # shards have 64
    assert aligntrain(capsys, "sft", sft_shards, cfg)[0] == 1
    assert not (tmp_path / "run").exists()


# -- --resume with changed settings ----------------------------------------------------------------------

def test_resume_refuses_a_changed_seed_or_batch_size_listing_the_differences(tmp_path, capsys, tiny_model, sft_shards,
                                                                             run_at_step_2):
    cfg = copy_of(run_at_step_2, tmp_path, tiny_model)
    code, err = aligntrain(capsys, "sft", sft_shards, cfg, "--resume", "--overrides", "seed=3", "total_batch_size=4")
    checkpoint = tmp_path / "run" / CHECKPOINTS / "step-0000002"
    assert (code, err) == (1, f"error: --resume: {checkpoint} was trained with other settings that a resumed run "
                              "cannot change (seed: 0 -> 3; total_batch_size: 8 -> 4); restore them, or start a new "
                              "run in another output_dir\n")


def test_resume_refuses_other_shards(tmp_path, capsys, tiny_model, run_at_step_2):
    cfg = copy_of(run_at_step_2, tmp_path, tiny_model)
    other = make_sft_shards(tmp_path / "other", tiny_model, n_train=40)
    code, err = aligntrain(capsys, "sft", other, cfg, "--resume")
    assert code == 1
    assert ("(shards: sft shards (eval 8 rows, train 32 rows; settings 000000000000) -> sft shards (eval 8 rows, "
            "train 40 rows; settings 000000000000))") in err


def test_resume_with_a_new_lr_trains_with_it_and_records_the_change(tmp_path, capsys, tiny_model, sft_shards,
                                                                    run_at_step_2):
    cfg = copy_of(run_at_step_2, tmp_path, tiny_model, lr=1e-3, gradient_accumulation_steps=2)
    straight = run_at_step_2[1]
    code, err = aligntrain(capsys, "sft", sft_shards, cfg, "--resume", "--overrides", "lr=2e-3",
                           "gradient_accumulation_steps=4")
    assert code == 0
    change = "resumed at step 2 with changed settings: gradient_accumulation_steps: 2 -> 4; lr: 0.001 -> 0.002"
    assert change in err.splitlines()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (2, "resume"), (3, "train"),
                                                          (4, "train")]
    assert records[2]["changed"] == {"gradient_accumulation_steps": {"before": 2, "now": 4},
                                     "lr": {"before": 0.001, "now": 0.002}}
    assert [r["lr"] for r in records if r["split"] == "train"] == [1e-3, 1e-3, 2e-3, 2e-3]
    assert records[3]["loss"] == pytest.approx(straight[2], rel=1e-5)  # step 3 starts from step 2's weights
    assert records[4]["loss"] != pytest.approx(straight[3], rel=1e-5)  # after a step with lr 2e-3
    saved = (run / "config.yaml").read_text()
    assert yaml.safe_load(saved)["lr"] == 2e-3 and saved.endswith(f"# {change}\n")


def test_resume_tolerates_a_torn_last_line_in_metrics(tmp_path, capsys, tiny_model, sft_shards, run_at_step_2):
    cfg = copy_of(run_at_step_2, tmp_path, tiny_model)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "split": "tra')  # killed mid-write
    code, err = aligntrain(capsys, "sft", sft_shards, cfg, "--resume")
    assert code == 0
    assert f"{metrics}: dropped line 5, not complete JSON (written when the run was killed?)" in err.splitlines()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == run_at_step_2[1]


# -- damaged checkpoints --------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate optimizer.pt", "delete optimizer.pt", "truncate scheduler.pt",
                                    "delete model.safetensors", "truncate model.safetensors"])
def test_a_damaged_checkpoint_is_named_on_resume(tmp_path, capsys, tiny_model, sft_shards, run_at_step_2, damage):
    cfg = copy_of(run_at_step_2, tmp_path, tiny_model)
    checkpoint = tmp_path / "run" / CHECKPOINTS / "step-0000002"
    how, name = damage.split()
    path = checkpoint / name
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, err = aligntrain(capsys, "sft", sft_shards, cfg, "--resume")
    fix = f"the checkpoint is damaged: move {checkpoint} away to resume from the one before it\n"
    assert code == 2 and err.endswith(fix) and len(err.splitlines()) == 1
    if name == "model.safetensors":
        assert err.startswith(f"error: {checkpoint}: cannot load its model (") and "model.name_or_path" not in err
    elif how == "delete":
        assert err == (f"error: {path}: missing, though the run saved its optimizer state (deleted or moved?); "
                       f"cannot resume exactly; {fix}")
    else:
        assert err.startswith(f"error: {path}: cannot be read (")


def test_a_checkpoint_saved_without_optimizer_state_says_so(tmp_path, capsys, tiny_model, sft_shards, run_at_step_2):
    cfg = copy_of(run_at_step_2, tmp_path, tiny_model)
    checkpoint = tmp_path / "run" / CHECKPOINTS / "step-0000002"
    (checkpoint / "optimizer.pt").unlink()
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text())
    (checkpoint / "config.yaml").write_text(yaml.safe_dump({**saved, "save_optimizer": False}))
    code, err = aligntrain(capsys, "sft", sft_shards, cfg, "--resume")
    assert (code, err) == (1, f"error: {checkpoint}: no optimizer state (saved with save_optimizer: false); "
                              "cannot resume exactly\n")


def test_an_archive_with_the_right_keys_and_wrong_shapes_is_a_config_error(tmp_path, capsys, tiny_model, sft_shards):
    from safetensors.torch import load_file

    state = {k: torch.zeros(*[n + 1 for n in v.shape]) for k, v in load_file(tiny_model / "model.safetensors").items()}
    archive = tmp_path / "policy.pt"
    torch.save({"state": state}, archive)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", model={"archive": str(archive)})
    code, err = aligntrain(capsys, "sft", sft_shards, cfg)
    assert code == 1
    assert err.startswith(f"error: model.archive: {archive} does not match model.name_or_path ({len(state)} tensors "
                          "of another shape, e.g. ")
    assert len(err.splitlines()) == 1


def test_a_full_disk_in_the_final_save_names_the_file(tmp_path, capsys, tiny_model, sft_shards, monkeypatch):
    real_write_text = pathlib.Path.write_text

    def disk_full_in_checkpoints(self, *args, **kwargs):
        if ".tmp-step-" in str(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a library's writer reports it: no file
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full_in_checkpoints)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", n_examples=16)
    code, err = aligntrain(capsys, "sft", sft_shards, cfg)
    assert code == 2
    assert err.splitlines()[-1] == (f"error: {tmp_path / 'run' / CHECKPOINTS / '.tmp-step-0000002' / 'config.yaml'}: "
                                    "No space left on device")


# -- signals ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_finishes_the_step_saves_and_says_how_to_resume(tmp_path, capsys, tiny_model, sft_shards,
                                                                        run_at_step_2, monkeypatch, sig):
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", n_examples=32)
    trainer_calls_at(monkeypatch, 2, lambda _: os.kill(os.getpid(), sig))  # arrives during step 2
    monkeypatch.setattr(sys, "argv", ["aligntrain", "sft", str(sft_shards), str(cfg)])
    code, err = aligntrain(capsys, "sft", sft_shards, cfg)
    checkpoint = tmp_path / "run" / CHECKPOINTS / "step-0000002"
    assert code == 143
    assert err.splitlines()[-1] == (f"error: stopped by {sig.name} after step 2; checkpoint saved: {checkpoint}; "
                                    f"resume with: aligntrain sft {sft_shards} {cfg} --resume")
    assert latest_checkpoint(tmp_path / "run" / CHECKPOINTS) == checkpoint
    assert signal.getsignal(sig) is signal.SIG_DFL  # the handlers are put back
    monkeypatch.undo()
    resumed = train(load_config(cfg), sft_shards, resume=True)
    assert losses(resumed) == run_at_step_2[1][2:]  # as if never stopped


def test_ctrl_c_names_the_last_complete_checkpoint(tmp_path, capsys, tiny_model, sft_shards, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", n_examples=32, save_every_steps=2)

    trainer_calls_at(monkeypatch, 3, interrupt)
    monkeypatch.setattr(sys, "argv", ["aligntrain", "sft", str(sft_shards), str(cfg)])
    code, err = aligntrain(capsys, "sft", sft_shards, cfg)
    checkpoint = tmp_path / "run" / CHECKPOINTS / "step-0000002"
    assert (code, err.splitlines()[-1]) == (130, f"error: interrupted; the last complete checkpoint is {checkpoint}; "
                                                 f"resume with: aligntrain sft {sft_shards} {cfg} --resume")


def test_ctrl_c_before_any_checkpoint_says_there_is_nothing_to_resume(tmp_path, capsys, tiny_model, sft_shards,
                                                                       monkeypatch):
    trainer_calls_at(monkeypatch, 1, interrupt)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", n_examples=16)
    code, err = aligntrain(capsys, "sft", sft_shards, cfg)
    assert (code, err) == (130, "error: interrupted before the first checkpoint was saved; nothing to resume\n")


@pytest.mark.slow
def test_sigterm_to_a_training_process_then_its_resume_command_continues_it_exactly(tmp_path, tiny_model, sft_shards):
    changes = dict(n_epochs=2, save_every_steps=5)
    straight = train(load_config(write_config(tmp_path / "straight.yml", tiny_model, tmp_path / "straight",
                                              **changes)), sft_shards)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", **changes)
    code = ("import sys, time; import aligntrain.trainer as t; real = t.train_step\n"
            "def slow(*a, **k):\n    time.sleep(0.2)\n    return real(*a, **k)\n"
            "t.train_step = slow; from aligntrain.cli import main\n"
            f"sys.argv = ['aligntrain', 'sft', {str(sft_shards)!r}, {str(cfg)!r}]; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc, timeout=120)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM after step ")
    step = int(last.split("after step ")[1].split(";")[0])
    assert 2 <= step < 8 and latest_checkpoint(tmp_path / "run" / CHECKPOINTS).name == f"step-{step:07d}"
    resume = shlex.split(last.split("resume with: ")[1])
    assert resume == ["aligntrain", "sft", str(sft_shards), str(cfg), "--resume"]
    done = subprocess.run([sys.executable, "-m", *resume], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 9))
    assert [r["loss"] for r in logged] == losses(straight)


# -- the chat template the checkpoints ship ------------------------------------------------------------------

def shards_rendered_with(tmp_path, tiny_model, source: str, text: str):
    shards = make_sft_shards(tmp_path / "shards", tiny_model, n_train=8, n_eval=0)
    manifest = json.loads((shards / MANIFEST).read_text())
    manifest["chat_template"] = {"source": source, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (shards / MANIFEST).write_text(json.dumps(manifest))
    return shards


def test_checkpoints_ship_the_chat_template_the_shards_were_rendered_with(tmp_path, tiny_model):
    shards = shards_rendered_with(tmp_path, tiny_model, "builtin:hh", BUILTIN_TEMPLATES["hh"])
    assert load_tokenizer(str(tiny_model)).chat_template != BUILTIN_TEMPLATES["hh"]
    result = train(load_config(write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", n_examples=8)), shards)
    assert load_tokenizer(str(result.checkpoint)).chat_template == BUILTIN_TEMPLATES["hh"]


def test_a_template_file_named_in_the_config_is_shipped_when_its_hash_matches(tmp_path, tiny_model):
    text = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    template = tmp_path / "mine.jinja"
    template.write_text(text)
    shards = shards_rendered_with(tmp_path, tiny_model, "file:mine.jinja", text)
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", n_examples=8, chat_template=str(template))
    result = train(load_config(cfg), shards)
    assert load_tokenizer(str(result.checkpoint)).chat_template == text


def test_shards_of_an_unknown_template_are_refused_with_the_fix(tmp_path, capsys, tiny_model):
    shards = shards_rendered_with(tmp_path, tiny_model, "file:theirs.jinja", "{{ messages }}")
    cfg = write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", n_examples=8)
    code, err = aligntrain(capsys, "sft", shards, cfg)
    own = resolve_chat_template(load_tokenizer(str(tiny_model)), None).sha256
    assert code == 1
    assert err == (f"error: {shards}: the shards were rendered with chat template file:theirs.jinja (sha256 "
                   f"{hashlib.sha256(b'{{ messages }}').hexdigest()[:12]}), "
                   f"which is not available here (tokenizer has sha256 {own[:12]}); set chat_template: to that "
                   "template (a built-in name or its .jinja file) so that checkpoints ship the format the model is "
                   "trained on, or re-convert the shards with the tokenizer's template\n")
    assert not (tmp_path / "run").exists()
