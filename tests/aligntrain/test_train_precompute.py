"""precompute-ref: reference log-probs stored in the shards, atomically, and used instead of a reference model."""

import json

import pytest
import yaml
from trainer_fixtures import base_config, dpo_rows, make_dpo_shards

from aligndata.write.shards import REF_COLUMNS, ShardError, open_split, read_manifest, verify_shards
from aligntrain.config import load_config
from aligntrain.modeling import load_tokenizer
from aligntrain.precompute import precompute_reference, reference_identity
from aligntrain.trainer import train


def cfg_for(tmp_path, model_dir, name="cfg", **changes):
    path = tmp_path / f"{name}.yml"
    changes.setdefault("loss", {"name": "dpo"})
    path.write_text(yaml.safe_dump(base_config(model_dir, tmp_path / f"run-{name}", **changes)))
    return load_config(path)


def test_reference_log_probs_are_written_with_the_reference_identity(tmp_path, tiny_model):
    shards = make_dpo_shards(tmp_path / "shards", tiny_model, shard_rows=20)  # train: 2 files, eval: 1
    before = read_manifest(shards)
    cfg = cfg_for(tmp_path, tiny_model)
    manifest = precompute_reference(shards, cfg, batch_size=5)

    assert manifest == read_manifest(shards)
    assert manifest["reference"] == reference_identity(cfg)
    assert manifest["reference"]["dtype"] == "float32" and len(manifest["reference"]["sha256"]) == 64
    verify_shards(shards)  # new checksums are in the manifest
    tag = manifest["reference"]["sha256"][:12]
    assert [f["path"] for f in manifest["splits"]["train"]["files"]] == \
        [f"train/shard-00000-ref-{tag}.arrow", f"train/shard-00001-ref-{tag}.arrow"]
    assert [f["rows"] for f in manifest["splits"]["train"]["files"]] == \
        [f["rows"] for f in before["splits"]["train"]["files"]]
    assert sorted(p.name for p in (shards / "train").glob("*.arrow")) == \
        [f"shard-00000-ref-{tag}.arrow", f"shard-00001-ref-{tag}.arrow"]  # old files removed
    assert not (shards / ".precompute-ref").exists()
    table = open_split(shards, "train", manifest)
    assert all(c in table.column_names for c in REF_COLUMNS)
    assert all(v < 0 for v in table.column("ref_chosen_logp").to_pylist())
    # the rows themselves are unchanged (the fixture's rows are deterministic; the old files are gone)
    expected = [r["chosen_ids"] for r in dpo_rows(load_tokenizer(str(tiny_model)), 32, seed=0)]
    assert table.column("chosen_ids").to_pylist() == expected
    # `datasets` can still read the split (its sidecar lists the new files)
    state = json.loads((shards / "train" / "state.json").read_text())
    assert [f["filename"] for f in state["_data_files"]] == [f"shard-00000-ref-{tag}.arrow",
                                                             f"shard-00001-ref-{tag}.arrow"]
    # a second run with the same reference does nothing
    assert precompute_reference(shards, cfg) == manifest


def test_dpo_with_stored_reference_equals_dpo_with_a_reference_model(tmp_path, tiny_model):
    plain = make_dpo_shards(tmp_path / "plain", tiny_model)
    stored = make_dpo_shards(tmp_path / "stored", tiny_model)
    precompute_reference(stored, cfg_for(tmp_path, tiny_model))
    with_model = train(cfg_for(tmp_path, tiny_model, "model", eval_every_steps=4), plain)
    with_logps = train(cfg_for(tmp_path, tiny_model, "logps", eval_every_steps=4), stored)
    assert [h["loss"] for h in with_logps.history] == pytest.approx([h["loss"] for h in with_model.history], abs=1e-5)
    assert with_logps.eval_metrics["rewards/margins"] == pytest.approx(with_model.eval_metrics["rewards/margins"],
                                                                       abs=1e-5)


def test_stored_log_probs_of_another_reference_are_refused(tmp_path, tiny_model):
    shards = make_dpo_shards(tmp_path / "shards", tiny_model)
    precompute_reference(shards, cfg_for(tmp_path, tiny_model))
    other = cfg_for(tmp_path, tiny_model, "other", model={"reference_dtype": "bfloat16"})
    with pytest.raises(ShardError) as e:
        train(other, shards)
    assert "carry reference log-probs of" in str(e.value) and "(dtype float32" in str(e.value)
    assert str(e.value).endswith("re-run `aligntrain precompute-ref` or set loss.precomputed_reference: ignore")
    ignoring = cfg_for(tmp_path, tiny_model, "ignore", model={"reference_dtype": "bfloat16"},
                       loss={"name": "dpo", "precomputed_reference": "ignore"}, n_examples=8)
    assert train(ignoring, shards).steps == 1


def test_precompute_refuses_sft_shards(tmp_path, tiny_model):
    from trainer_fixtures import make_sft_shards

    shards = make_sft_shards(tmp_path / "sft", tiny_model)
    with pytest.raises(ShardError, match="converted for task 'sft'"):
        precompute_reference(shards, cfg_for(tmp_path, tiny_model))


def test_the_pass_compiles_its_reference_only_where_the_set_earns_the_compile_time_back(tmp_path, tiny_model,
                                                                                       monkeypatch):
    """compile: null compiles where a run would (compile_wanted) and the pass has COMPILE_FROM_PAIRS pairs or
    more; compile: true or false is taken as set."""
    import torch

    from aligntrain import precompute

    monkeypatch.setattr(precompute, "compile_wanted", lambda cfg, device: cfg.compile is not False)
    cuda = torch.device("cuda")
    auto = cfg_for(tmp_path, tiny_model, "auto")
    assert not precompute.compile_reference(auto, cuda, 224)
    assert precompute.compile_reference(auto, cuda, precompute.COMPILE_FROM_PAIRS)
    assert precompute.compile_reference(cfg_for(tmp_path, tiny_model, "on", compile=True), cuda, 224)
    assert not precompute.compile_reference(cfg_for(tmp_path, tiny_model, "off", compile=False), cuda, 10**6)
