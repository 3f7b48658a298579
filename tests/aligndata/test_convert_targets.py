"""Where `aligndata convert` writes: special files, overlapping paths, symlinked and foreign-filled output
directories, leftovers of failed runs, and two runs on the same output (issue 16, "Outputs that overwrite
what they must not" and "Two runs at once").

Every refusal is a usage error (exit 2) that names the path and leaves every file as it was.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from faults import sigkill, wait_for, write_chats
from typer.testing import CliRunner

from aligndata.cli import app
from aligndata.write.convert import convert
from aligndata.write.lock import LockHeld, hold_lock, lock_path_for
from aligndata.write.shards import MANIFEST, read_manifest, verify_shards

BAD = {"conversations": [{"from": "human", "value": "no answer"}]}


def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["convert", "-q", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def shards(src, out, tok, *more) -> tuple[int, str]:
    return run(src, "--to", "sft", "--tokenizer", tok, "--out", out, *more)


def with_bad_record(path: Path) -> Path:
    write_chats(path, 3)
    with open(path, "a") as f:
        f.write(json.dumps(BAD) + "\n")
    return path


@pytest.fixture
def work(tmp_path) -> Path:
    """An empty folder of its own (tiny_tokenizer_dir writes the tokenizer's files into tmp_path)."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- special files are written in place, never renamed over ---------------------------------------------

def test_rejects_to_a_link_to_dev_null_leaves_dev_null_a_device(work, tiny_tokenizer_dir):
    src = with_bad_record(work / "in.jsonl")
    (work / "null").symlink_to("/dev/null")
    code, _ = shards(src, work / "out", tiny_tokenizer_dir, "--on-error", "skip", "--rejects", work / "null")
    assert code == 0
    assert (work / "null").is_symlink() and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_jsonl_output_to_a_fifo_is_written_into_the_fifo(work):
    src = write_chats(work / "in.jsonl", 3)
    fifo = work / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    code, _ = run(src, "--to", "openai", "--out", fifo)
    reader.join(10)
    assert code == 0 and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert len(got[0].splitlines()) == 3
    assert listing(work) == ["in.jsonl", "pipe"]


def test_rejects_naming_a_directory_is_refused(work, tiny_tokenizer_dir):
    src = with_bad_record(work / "in.jsonl")
    (work / "dir").mkdir()
    code, output = shards(src, work / "out", tiny_tokenizer_dir, "--on-error", "skip", "--rejects", work / "dir")
    assert code == 2 and "dir: exists and is not a regular file" in output
    assert listing(work) == ["dir", "in.jsonl"]


# -- inputs, output and rejects must be files of their own ----------------------------------------------

def test_rejects_equal_to_an_input_is_a_usage_error_that_writes_nothing(work, tiny_tokenizer_dir):
    src = with_bad_record(work / "in.jsonl")
    before = src.read_bytes()
    code, output = shards(src, work / "out", tiny_tokenizer_dir, "--on-error", "skip", "--rejects", src)
    assert code == 2 and f"input {src} and --rejects {src} are the same file" in output
    assert src.read_bytes() == before and listing(work) == ["in.jsonl"]


def test_jsonl_rejects_equal_to_the_output_is_a_usage_error(work):
    src = with_bad_record(work / "in.jsonl")
    out = work / "out.jsonl"
    out.write_text("previous\n")
    code, output = run(src, "--to", "openai", "--out", out, "--on-error", "skip", "--rejects", out, "--overwrite")
    assert code == 2 and "are the same file" in output
    assert out.read_text() == "previous\n"


def test_rejects_inside_the_shard_directory_is_a_usage_error(work, tiny_tokenizer_dir):
    src = with_bad_record(work / "in.jsonl")
    out = work / "out"
    assert shards(src, out, tiny_tokenizer_dir, "--on-error", "skip")[0] == 0
    code, output = shards(src, out, tiny_tokenizer_dir, "--on-error", "skip", "--rejects", out / "mine.jsonl",
                          "--overwrite")
    assert code == 2 and "is inside the output directory" in output
    verify_shards(out)


def test_rejects_naming_the_shard_directory_itself_is_a_usage_error(work, tiny_tokenizer_dir):
    src = with_bad_record(work / "in.jsonl")
    out = work / "out"
    assert shards(src, out, tiny_tokenizer_dir, "--on-error", "skip")[0] == 0
    code, output = shards(src, out, tiny_tokenizer_dir, "--on-error", "skip", "--rejects", out, "--overwrite")
    assert code == 2 and f"--rejects {out} is inside the output directory" in output
    verify_shards(out)


def test_input_inside_the_shard_directory_is_a_usage_error(work, tiny_tokenizer_dir):
    out = work / "out"
    assert shards(write_chats(work / "in.jsonl", 3), out, tiny_tokenizer_dir)[0] == 0
    inside = write_chats(out / "train" / "more.jsonl", 3)
    code, output = shards(inside, out, tiny_tokenizer_dir, "--overwrite")
    assert code == 2 and f"input {inside} is inside the output directory" in output
    assert inside.exists()


def test_eval_file_equal_to_the_training_input_is_a_usage_error(work, tiny_tokenizer_dir):
    src = write_chats(work / "in.jsonl", 3)
    code, output = shards(src, work / "out", tiny_tokenizer_dir, "--eval-file", src)
    assert code == 2 and f"input {src} and --eval-file {src} are the same file" in output
    assert listing(work) == ["in.jsonl"]


def test_eval_records_identical_to_training_records_are_counted(work, tiny_tokenizer_dir):
    train = write_chats(work / "train.jsonl", 4)
    held_out = work / "eval.jsonl"
    held_out.write_text(train.read_text().splitlines()[0] + "\n" + json.dumps(
        {"conversations": [{"from": "human", "value": "Other?"}, {"from": "gpt", "value": "Yes."}]}) + "\n")
    code, output = shards(train, work / "out", tiny_tokenizer_dir, "--eval-file", held_out)
    assert code == 0
    assert f"note: --eval-file {held_out}: 1 of its 2 kept records are identical to training records" in output


# -- the output directory -------------------------------------------------------------------------------

@pytest.mark.parametrize("out", [".", "-", "./", ".."])
def test_out_dot_or_dash_for_shards_is_a_usage_error(work, tiny_tokenizer_dir, monkeypatch, out):
    src = write_chats(work / "in.jsonl", 3)
    (work / "here").mkdir()
    monkeypatch.chdir(work / "here")
    code, output = shards(src, out, tiny_tokenizer_dir)
    assert code == 2 and output.startswith(f"error: --out {out!r}: shards are a directory" if out == "-"
                                           else f"error: --out {Path(out)}: name a directory of its own")
    assert listing(work) == ["here", "in.jsonl"] and listing(work / "here") == []


def test_symlinked_output_directory_is_written_through_with_overwrite(work, tiny_tokenizer_dir):
    src = write_chats(work / "in.jsonl", 3)
    (work / "real").mkdir()
    link = work / "link"
    link.symlink_to(work / "real")
    assert shards(src, link, tiny_tokenizer_dir)[0] == 0
    code, output = shards(src, link, tiny_tokenizer_dir, "--shard-rows", "2", "--overwrite")
    assert code == 0 and "cannot write" not in output
    assert link.is_symlink() and read_manifest(work / "real")["settings"]["shard_rows"] == 2
    assert listing(work) == ["in.jsonl", "link", "real"]  # no .real.old, .link.old or staging left
    assert shards(src, link, tiny_tokenizer_dir, "--shard-rows", "3", "--overwrite")[0] == 0  # and again


def test_stale_old_link_from_an_earlier_version_does_not_break_later_runs(work, tiny_tokenizer_dir):
    src = write_chats(work / "in.jsonl", 3)
    (work / ".out.old").symlink_to(work / "nowhere")
    assert shards(src, work / "out", tiny_tokenizer_dir)[0] == 0
    assert listing(work) == ["in.jsonl", "out"]


def test_overwrite_refuses_to_delete_files_it_did_not_write(work, tiny_tokenizer_dir):
    src = write_chats(work / "in.jsonl", 3)
    out = work / "out"
    assert shards(src, out, tiny_tokenizer_dir)[0] == 0
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints").mkdir()
    (out / "train" / "extra.bin").write_bytes(b"x")
    code, output = shards(src, out, tiny_tokenizer_dir, "--shard-rows", "2", "--overwrite")
    assert code == 2
    assert "holds files that aligndata did not write (checkpoints/, notes.txt, train/extra.bin)" in output
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoints").is_dir()
    assert listing(work) == ["in.jsonl", "out"]


def test_a_failed_run_or_usage_error_leaves_no_staging_directory(work, tiny_tokenizer_dir):
    src = with_bad_record(work / "in.jsonl")
    assert shards(src, work / "new" / "out", tiny_tokenizer_dir)[0] == 1  # stops at the bad record
    assert listing(work) == ["in.jsonl"]  # nor the parent it made for the output
    assert shards(work / "missing.jsonl", work / "out", tiny_tokenizer_dir)[0] == 2
    assert listing(work) == ["in.jsonl"]


def test_an_interrupted_runs_staging_is_removed_by_the_next_run_and_named(work, tiny_tokenizer_dir):
    src = write_chats(work / "in.jsonl", 3)
    staging = work / ".out.partial"
    staging.mkdir()
    (staging / ".incomplete").write_text("")  # as a SIGKILLed run leaves it
    code, output = shards(src, work / "out", tiny_tokenizer_dir)
    assert code == 0 and f"note: removed {staging}, left by an interrupted run" in output
    assert listing(work) == ["in.jsonl", "out"]


def test_existing_jsonl_output_needs_overwrite_as_shards_do(work):
    src = write_chats(work / "in.jsonl", 3)
    out = work / "out.jsonl"
    out.write_text("previous\n")
    code, output = run(src, "--to", "openai", "--out", out)
    assert code == 2 and f"{out}: exists; pass --overwrite to replace it" in output
    assert out.read_text() == "previous\n"
    assert run(src, "--to", "openai", "--out", out, "--overwrite")[0] == 0
    assert len(out.read_text().splitlines()) == 3


# -- one run at a time per output -----------------------------------------------------------------------

def test_second_run_on_a_locked_output_exits_2_naming_the_holder(work, tiny_tokenizer_dir):
    src = write_chats(work / "in.jsonl", 3)
    out = work / "out"
    with hold_lock(lock_path_for(out), "test"):
        code, output = shards(src, out, tiny_tokenizer_dir)
        assert code == 2 and f"the output {out} is being written by another run (pid {os.getpid()} on " in output
        code, output = run(src, "--to", "openai", "--out", work / "out.jsonl")
        assert code == 0  # another output: not locked
    assert listing(work) == ["in.jsonl", "out.jsonl"]  # and the lock file went with the lock


def test_lock_is_released_when_its_holder_is_killed(work):
    lock = work / ".out.lock"
    code = (f"from pathlib import Path; from aligndata.write.lock import hold_lock\n"
            f"with hold_lock(Path({str(lock)!r}), 'x'):\n    import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    wait_for(lambda: lock.exists() and lock.stat().st_size > 0, proc)
    with pytest.raises(LockHeld, match=f"pid {proc.pid} on "):
        with hold_lock(lock, "the output out"):
            pass
    sigkill(proc)
    with hold_lock(lock, "the output out"):  # the kernel released it with the process
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_convert_holds_the_lock_while_it_runs(work, tiny_tokenizer_dir, monkeypatch):
    import aligndata.write.convert as module

    src = write_chats(work / "in.jsonl", 3)
    out = work / "out"
    seen = []
    real_commit = module._commit

    def commit(staging: Path, target: Path) -> None:
        with pytest.raises(LockHeld):
            with hold_lock(lock_path_for(target), "probe"):
                pass
        seen.append(True)
        real_commit(staging, target)

    monkeypatch.setattr(module, "_commit", commit)
    convert([str(src)], out, "sft", str(tiny_tokenizer_dir))
    assert seen == [True] and (out / MANIFEST).exists()


@pytest.mark.slow
def test_ctrl_c_during_convert_removes_its_staging_directory(work, tiny_tokenizer_dir):
    src = write_chats(work / "in.jsonl", 20_000)
    staging = work / ".out.partial"
    # A test run started in the background by a non-interactive shell (nohup, `&`) inherits SIGINT ignored,
    # and so would the convert (Python then installs no KeyboardInterrupt handler): restore the default.
    proc = subprocess.Popen([sys.executable, "-m", "aligndata", "convert", "-q", str(src), "--to", "sft",
                             "--tokenizer", str(tiny_tokenizer_dir), "--out", str(work / "out"), "--shard-rows", "500"],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: len(list(staging.glob("train/*.arrow"))) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr == "error: interrupted\n"
    assert listing(work) == ["in.jsonl"]
