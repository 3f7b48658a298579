"""Shards and manifests that do not hold what they claim (issue 16): rows written with the project's own
writer (hashes updated, so the checksums pass) that no conversion makes, and manifests edited by hand.
`aligndata inspect` (and aligntrain, through the same `check_contents`) refuses them in one line naming
the shard and the row, exit 2; `inspect` also verifies the checksums that aligntrain verifies.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from faults import write_chats
from typer.testing import CliRunner

from aligndata.cli import app
from aligndata.write.convert import convert
from aligndata.write.shards import MANIFEST, ShardError, ShardWriter, check_contents, read_manifest


@pytest.fixture
def sft_out(tmp_path, tiny_tokenizer_dir) -> Path:
    out = tmp_path / "out"
    convert([str(write_chats(tmp_path / "in.jsonl", 4))], out, "sft", str(tiny_tokenizer_dir), max_length=64)
    return out


def rewrite(out: Path, task: str, rows: list[dict]) -> Path:
    """Replace the train split with `rows`, written by ShardWriter, and a manifest that agrees with them."""
    manifest = json.loads((out / MANIFEST).read_text())
    shutil.rmtree(out / "train")
    writer = ShardWriter(out, task)
    for i, row in enumerate(rows):
        writer.write("train", {**row, "source": 0, "source_index": i})
    manifest["splits"] = writer.close()
    manifest["counts"] = {"read": len(rows), "kept": len(rows), "rejected": {}, "dropped": {}, "truncated": {}}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def inspect(out: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["inspect", str(out)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


GOOD = {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}
SHARD = "train/shard-00000.arrow"


@pytest.mark.parametrize("bad, message", [
    ({"input_ids": [5, 999_999, 7], "loss_mask": [0, 1, 1]},
     "input_ids holds token id 999999, outside the vocabulary (0 to {last})"),
    ({"input_ids": [5, -3, 7], "loss_mask": [0, 1, 1]},
     "input_ids holds token id -3, outside the vocabulary (0 to {last})"),
    ({"input_ids": [5, 6, 7], "loss_mask": [0, 1]}, "loss_mask is not as long as input_ids"),
    ({"input_ids": [], "loss_mask": []}, "input_ids is empty"),
    ({"input_ids": [5, 6, 7], "loss_mask": [0, 0, 0]}, "no token is trained (the loss mask is all 0)"),
    ({"input_ids": [5, 6, 7], "loss_mask": [0, 2, 1]}, "loss_mask holds 2, not 0 or 1"),
    ({"input_ids": [5] * 1280, "loss_mask": [1] * 1280}, "longer than the manifest's max_length 64"),
])
def test_sft_rows_no_conversion_writes_are_refused_naming_shard_and_row(sft_out, bad, message):
    rewrite(sft_out, "sft", [GOOD, GOOD, bad, GOOD])
    last = read_manifest(sft_out)["tokenizer"]["vocab_size"] - 1
    code, output = inspect(sft_out)
    assert code == 2
    assert output == (f"error: {sft_out / SHARD}: row 2: {message.format(last=last)}; the shard does not hold what "
                      "aligndata writes: re-run `aligndata convert`\n")


def test_dpo_pair_with_an_empty_completion_is_refused(tmp_path, tiny_tokenizer_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi?"}],
                                 "chosen": [{"role": "assistant", "content": "Hello."}],
                                 "rejected": [{"role": "assistant", "content": "Go away."}]}) + "\n")
    out = tmp_path / "out"
    convert([str(pairs)], out, "dpo", str(tiny_tokenizer_dir))
    good = {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8]}
    rewrite(out, "dpo", [good, {**good, "rejected_ids": []}])
    with pytest.raises(ShardError, match=r"shard-00000.arrow: row 1: rejected_ids is empty;"):
        check_contents(out, read_manifest(out))


def test_a_shard_listed_twice_is_refused(sft_out):
    manifest = json.loads((sft_out / MANIFEST).read_text())
    files = manifest["splits"]["train"]["files"]
    files.append(dict(files[0]))
    manifest["splits"]["train"]["rows"] *= 2
    manifest["counts"]["kept"] *= 2
    manifest["counts"]["read"] *= 2
    (sft_out / MANIFEST).write_text(json.dumps(manifest))
    code, output = inspect(sft_out)
    assert code == 2 and f"shard {SHARD} is listed twice (its rows would be read twice)" in output


def test_edited_counts_that_disagree_with_the_shards_are_refused(sft_out):
    manifest = json.loads((sft_out / MANIFEST).read_text())
    manifest["counts"]["kept"] = 9999
    (sft_out / MANIFEST).write_text(json.dumps(manifest))
    code, output = inspect(sft_out)
    assert code == 2 and "counts.kept is 9999 but the splits hold 4 rows" in output


def test_edited_row_counts_that_agree_with_each_other_but_not_with_the_shard_are_refused(sft_out):
    manifest = json.loads((sft_out / MANIFEST).read_text())
    for entry in (manifest["splits"]["train"], manifest["splits"]["train"]["files"][0]):
        entry["rows"] = 9999
    manifest["counts"].update(kept=9999, read=9999)
    (sft_out / MANIFEST).write_text(json.dumps(manifest))
    code, output = inspect(sft_out)
    assert code == 2 and f"{sft_out / SHARD}: holds 4 rows and " in output and "the manifest lists 9999 and" in output


def test_inspect_verifies_the_checksums(sft_out):
    shard = sft_out / SHARD
    data = bytearray(shard.read_bytes())
    data[-20] ^= 1
    shard.write_bytes(bytes(data))
    code, output = inspect(sft_out)
    assert code == 2 and f"{shard}: checksum mismatch" in output


def test_a_good_output_passes_every_check(sft_out):
    check_contents(sft_out, read_manifest(sft_out))
    assert inspect(sft_out)[0] == 0
