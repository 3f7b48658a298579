"""From shards to batches: refused mismatches, deterministic order, process split, token budget, collation."""

import json
import shutil

import numpy as np
import pytest
import yaml
from tiny_tokenizer import make_tiny_tokenizer
from trainer_fixtures import base_config

from aligndata.write.shards import ShardError, ShardWriter
from aligntrain.config import load_config
from aligntrain.data import (ShardSplit, check_shards, collate, eval_batches, micro_batches, process_share,
                             step_indices, total_steps)
from aligntrain.modeling import load_tokenizer


def config(tmp_path, model_dir, **changes):
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(base_config(model_dir, tmp_path / "run", **changes)))
    return load_config(path)


def test_matching_shards_pass_and_give_their_manifest(tmp_path, tiny_model, sft_shards):
    manifest = check_shards(sft_shards, config(tmp_path, tiny_model), load_tokenizer(str(tiny_model)), "sft")
    assert manifest["task"] == "sft"


def test_shards_of_another_task_are_refused(tmp_path, tiny_model, sft_shards):
    cfg = config(tmp_path, tiny_model, loss={"name": "dpo"})
    with pytest.raises(ShardError) as e:
        check_shards(sft_shards, cfg, load_tokenizer(str(tiny_model)), "dpo")
    assert str(e.value) == (f"{sft_shards}: shards were converted for task 'sft', but loss.name 'dpo' trains on "
                            "'dpo' shards; convert with --to dpo")


def test_another_max_length_is_refused_with_both_values(tmp_path, tiny_model, sft_shards):
    cfg = config(tmp_path, tiny_model, max_length=128)
    with pytest.raises(ShardError) as e:
        check_shards(sft_shards, cfg, load_tokenizer(str(tiny_model)), "sft")
    assert str(e.value) == (f"{sft_shards}: shards were converted with max_length=64 but the config says "
                            "max_length=128; re-convert with --max-length 128 or set max_length: 64")


def test_another_tokenizer_is_refused_saying_what_differs(tmp_path, tiny_model, sft_shards):
    other = tmp_path / "other-tokenizer"
    make_tiny_tokenizer(other, add_bos=True)  # same vocabulary, different post-processing
    cfg = config(tmp_path, tiny_model)
    with pytest.raises(ShardError) as e:
        check_shards(sft_shards, cfg, load_tokenizer(str(other)), "sft")
    message = str(e.value)
    assert message.startswith(f"{sft_shards}: shards were made with another tokenizer than '{tiny_model}': sha256 is ")
    assert "vocab_size" not in message  # only what differs is named


def test_a_modified_shard_is_refused(tmp_path, tiny_model, sft_shards):
    copy = tmp_path / "copy"
    shutil.copytree(sft_shards, copy)
    shard = copy / "train" / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ShardError, match="checksum mismatch"):
        check_shards(copy, config(tmp_path, tiny_model), load_tokenizer(str(tiny_model)), "sft")


def test_shard_rows_outside_the_vocabulary_are_refused_at_train_start(tmp_path, tiny_model, sft_shards):
    copy = tmp_path / "copy"
    shutil.copytree(sft_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    vocab = manifest["tokenizer"]["vocab_size"]
    shutil.rmtree(copy / "train")
    writer = ShardWriter(copy, "sft")  # the project's own writer: the checksums are right
    writer.write("train", {"input_ids": [1, vocab, 2], "loss_mask": [0, 1, 1], "source": 0, "source_index": 0})
    manifest["splits"] = writer.close()
    manifest["counts"].update(read=1, kept=1, rejected={}, dropped={})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError) as e:
        check_shards(copy, config(tmp_path, tiny_model), load_tokenizer(str(tiny_model)), "sft")
    assert str(e.value) == (f"{copy / 'train' / 'shard-00000.arrow'}: row 0: input_ids holds token id {vocab}, outside "
                            f"the vocabulary (0 to {vocab - 1}); the shard does not hold what aligndata writes: "
                            "re-run `aligndata convert`")


def test_steps_walk_each_epoch_permutation_once_and_are_reproducible():
    n, b = 20, 4
    epoch0 = np.concatenate([step_indices(s, n, b, seed=7) for s in range(5)])
    epoch1 = np.concatenate([step_indices(s, n, b, seed=7) for s in range(5, 10)])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(20))
    assert epoch0.tolist() != epoch1.tolist()  # reshuffled per epoch
    assert step_indices(6, n, b, seed=7).tolist() == step_indices(6, n, b, seed=7).tolist()
    assert step_indices(6, n, b, seed=7).tolist() != step_indices(6, n, b, seed=8).tolist()


def test_incomplete_last_batch_of_an_epoch_is_dropped():
    n, b = 10, 4  # 2 full steps per epoch, 2 rows left out
    steps = [step_indices(s, n, b, seed=0).tolist() for s in range(2)]
    assert all(len(s) == 4 for s in steps) and len(set(sum(steps, []))) == 8


def test_total_steps_from_epochs_or_examples(tmp_path, tiny_model):
    assert total_steps(32, config(tmp_path, tiny_model, n_epochs=3)) == 12
    assert total_steps(32, config(tmp_path, tiny_model, n_examples=20)) == 3  # rounded up, as the seed does
    with pytest.raises(ShardError, match="the train split has 4 rows, fewer than total_batch_size=8"):
        total_steps(4, config(tmp_path, tiny_model))


def test_processes_get_disjoint_contiguous_shares():
    rows = np.arange(8)
    shares = [process_share(rows, r, 4).tolist() for r in range(4)]
    assert shares == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_fixed_accumulation_splits_into_equal_parts():
    parts = micro_batches(np.arange(8), np.ones(8), 4, None, 1)
    assert [p.tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_token_budget_packs_greedily_in_order():
    widths = np.array([5, 10, 3, 8])
    # one sequence per row: [0,1] pads to 2x10 = 20 <= 20; adding 2 would be 3x10 = 30
    assert [p.tolist() for p in micro_batches(np.arange(4), widths, 1, 20, 1)] == [[0, 1], [2, 3]]
    # two sequences per row (chosen + rejected): 2x2x10 = 40 > 20, so every row goes alone
    assert [p.tolist() for p in micro_batches(np.arange(4), widths, 1, 20, 2)] == [[0], [1], [2], [3]]
    # a row wider than the budget still gets a micro-batch of its own
    assert [p.tolist() for p in micro_batches(np.arange(2), np.array([50, 2]), 1, 20, 1)] == [[0], [1]]


def test_eval_shares_are_equal_and_padding_has_weight_zero():
    got = [list(eval_batches(5, None, 4, rank, 2)) for rank in range(2)]
    assert [(i.tolist(), w.tolist()) for i, w in got[0]] == [([0, 1], [1, 1]), ([4], [1])]
    assert [(i.tolist(), w.tolist()) for i, w in got[1]] == [([2, 3], [1, 1]), ([4], [0])]
    assert [i.tolist() for i, _ in eval_batches(100, 3, 8, 0, 1)] == [[0, 1, 2]]


def test_dpo_collation_puts_chosen_first_and_trains_only_completions():
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]},
            {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9, 9]}]
    b = collate(rows, "dpo", pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 6, 0, 0], [7, 9, 9, 0, 0]]
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]


def test_split_reads_rows_by_index_and_knows_widths(tiny_model, dpo_shards):
    from aligndata.write.shards import read_manifest

    split = ShardSplit(dpo_shards, "train", read_manifest(dpo_shards))
    assert len(split) == 32 and not split.has_reference
    row = split.rows(np.array([3]))[0]
    assert split.widths[3] == len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
    manifest = json.loads((dpo_shards / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 32


def test_the_shards_cache_of_other_encoding_rules_is_another_directory(tmp_path, monkeypatch):
    """`aligntrain train` never reuses (nor trips over) a conversion made under older encoding rules."""
    from aligndata.options import ENCODING_RULES, ConvertOptions
    from aligntrain.sources import shards_cache_dir

    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    options = ConvertOptions(task="sft", tokenizer=str(tmp_path))
    now = shards_cache_dir(options, [raw])
    monkeypatch.setattr("aligntrain.sources.ENCODING_RULES", ENCODING_RULES - 1)
    assert shards_cache_dir(options, [raw]) != now
