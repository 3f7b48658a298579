"""Faults injected into conversion: kills at random points, a full disk, tokenizer code that must not run.

Every fault must end in a clean, documented outcome: no traceback, the documented exit code, a message naming
the file, and nothing of the previous good output lost.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from faults import run_cli, sigkill, wait_for, write_chats
from typer.testing import CliRunner

from aligndata.cli import app as aligndata_app
from aligndata.write.convert import convert
from aligndata.write.shards import MANIFEST, ShardError, read_manifest, verify_shards

# -- convert killed at random points ------------------------------------------------------------------

@pytest.mark.slow
def test_convert_killed_at_random_points_keeps_the_old_output_and_a_rerun_completes(tmp_path, tiny_tokenizer_dir):
    big = write_chats(tmp_path / "big.jsonl", 4000)
    out, staging = tmp_path / "out", tmp_path / ".out.partial"
    rng = random.Random(20261128)
    points = sorted(rng.sample(range(1, 15), 3))  # kill once this many of the 20 shards are in the staging dir
    previous_rows = None
    for attempt, point in enumerate(points):
        shard_rows = 200 + attempt  # each attempt replaces an output made with other settings
        code = (f"import sys; from pathlib import Path; from aligndata.write.convert import convert; "
                f"convert([{str(big)!r}], Path({str(out)!r}), 'sft', {str(tiny_tokenizer_dir)!r}, "
                f"shard_rows={shard_rows}, overwrite=True)")
        proc = subprocess.Popen([sys.executable, "-c", code])
        wait_for(lambda: len(list(staging.glob("train/*.arrow"))) >= point, proc)
        sigkill(proc)
        assert not (staging / MANIFEST).exists()
        if attempt == 0:  # nothing converted yet: no manifest, and readers say why
            assert not (out / MANIFEST).exists()
            with pytest.raises(ShardError, match="no such shard directory|did not finish"):
                read_manifest(out)
        else:  # the previous complete output is untouched
            assert read_manifest(out)["settings"]["shard_rows"] == previous_rows
            verify_shards(out)
        result = convert([str(big)], out, "sft", str(tiny_tokenizer_dir), shard_rows=shard_rows, overwrite=True)
        assert not result.skipped and result.manifest["counts"]["kept"] == 4000
        verify_shards(out)
        assert not staging.exists()
        previous_rows = shard_rows


def test_convert_to_jsonl_killed_midway_keeps_the_old_output_and_a_rerun_completes(tmp_path):
    small, big = write_chats(tmp_path / "small.jsonl", 3), write_chats(tmp_path / "big.jsonl", 60_000)
    out = tmp_path / "out.jsonl"
    first = CliRunner().invoke(aligndata_app, ["convert", "-q", str(small), "--to", "openai", "--out", str(out)])
    assert first.exit_code == 0
    old = out.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "aligndata", "convert", "-q", str(big), "--to", "openai",
                             "--out", str(out), "--on-error", "skip", "--overwrite"], stderr=subprocess.DEVNULL)
    partial = tmp_path / f".out.jsonl.partial-{proc.pid}"
    wait_for(lambda: partial.exists() and partial.stat().st_size > random.Random(3).randint(1, 4) << 20, proc)
    sigkill(proc)
    assert out.read_bytes() == old and not (tmp_path / "out.jsonl.rejects.jsonl").exists()
    again = CliRunner().invoke(aligndata_app, ["convert", "-q", str(big), "--to", "openai", "--out", str(out),
                                               "--overwrite"])
    assert again.exit_code == 0 and "read 60000 = written 60000 + rejected 0" in again.output
    assert len(out.read_text().splitlines()) == 60_000
    assert not partial.exists()  # the killed run's temporary file was cleaned up by the next run


# -- a full disk --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("to", ["openai", "sft"])
def test_full_disk_during_convert_is_a_clean_io_error_and_keeps_the_old_output(tmp_path, tiny_tokenizer_dir, to):
    small, big = write_chats(tmp_path / "small.jsonl", 4), write_chats(tmp_path / "big.jsonl", 3000)
    out = tmp_path / ("out.jsonl" if to == "openai" else "out")
    shard_args = ["-t", tiny_tokenizer_dir] if to == "sft" else []
    first = CliRunner().invoke(aligndata_app, ["convert", "-q", str(small), "--to", to, "--out", str(out),
                                               *map(str, shard_args)])
    assert first.exit_code == 0, first.output
    before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()
                    and p.name != "big.jsonl")
    proc = run_cli("aligndata", "convert", "-q", big, "--to", to, "--out", out, *shard_args, "--overwrite", limit=64_000)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {out}: cannot write (")
    assert "File too large" in proc.stderr and "the previous output is left as it was" in proc.stderr
    after = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()
                   and p.name != "big.jsonl" and ".partial" not in str(p))
    assert after == before  # only an unfinished staging directory is added, which the next run removes
    if to == "sft":
        verify_shards(out)
        assert read_manifest(out)["counts"]["read"] == 4


# -- tokenizer code ------------------------------------------------------------------------------------

def test_trust_remote_code_is_off_unless_asked(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    convert([str(write_chats(tmp_path / "c.jsonl", 2))], tmp_path / "o", "sft", str(tiny_tokenizer_dir))
    assert seen and not any(seen)
