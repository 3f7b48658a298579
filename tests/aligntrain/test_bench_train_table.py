"""The pure helpers of benchmarks/bench_train.py: useful FLOPs from item lengths and the suite table."""

import sys

import pytest
from transformers import LlamaConfig

from paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train  # noqa: E402  (a script folder, not a package)
from bench_train import Row, data_counts, suite_lines, suite_table  # noqa: E402

from aligntrain.flops import training_flops  # noqa: E402

CONFIG = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=4, vocab_size=10)


def test_a_pair_counts_its_prompt_once_in_flops_and_twice_in_tokens():
    counted, flops = data_counts(CONFIG, "dpo", [(4, 2, 3)], policy=True, reference=True)
    assert counted == 2 * 4 + 2 + 3  # prompt+chosen and prompt+rejected, as TRL forwards them
    pairs = 10 + (5 + 6) + (5 + 6 + 7)  # prompt causal; chosen and rejected attend the prompt
    assert flops == training_flops(CONFIG, 9, pairs, 9, pairs)


def test_precomputed_reference_and_the_precompute_pass_split_the_flops():
    lengths = [(4, 2, 3), (1, 1, 1)]
    _, everything = data_counts(CONFIG, "dpo", lengths, policy=True, reference=True)
    _, policy = data_counts(CONFIG, "dpo", lengths, policy=True, reference=False)
    _, reference = data_counts(CONFIG, "dpo", lengths, policy=False, reference=True)
    assert policy + reference == everything and 0 < reference < policy


def test_an_sft_row_is_one_causal_sequence():
    counted, flops = data_counts(CONFIG, "sft", [(3,), (5,)], policy=True, reference=False)
    assert counted == 8 and flops == training_flops(CONFIG, 8, 6 + 15)


OURS = {"items_per_s": 10.0, "tokens_per_s": 9000.0, "flops_per_token": 1e9, "peak_gib": 20.5}
PADDED = {"items_per_s": 8.0, "tokens_per_s": 3000.0, "flops_per_token": 1e9, "peak_gib": 15.3}
PACKED = {"items_per_s": 4.0, "tokens_per_s": 4500.0, "flops_per_token": 1e9, "peak_gib": 18.0}


def test_sft_row_compares_with_each_trl_run_and_marks_the_best():
    row = Row("SFT tiny", "sft", "tiny", 8, ("sft", "sft_packed"))
    lines = suite_lines(row, {"": OURS}, {"sft": PADDED, "sft_packed": PACKED})
    table = suite_table(lines, "NVIDIA H200").splitlines()
    assert table[2] == ("| SFT tiny, vs TRL SFT padded | 10.00 | 8.00 | 3.00x | 9,000 | 3,000 | 0.9% | 0.3% "
                        "| 20.5/15.3 |")
    # packed items are 1024-token sequences, not rows: no items/s; the ratio is of tokens/s
    assert table[3] == ("| SFT tiny, vs TRL SFT packed (bfd) (TRL's best) | 10.00 | - | 2.00x | 9,000 | 4,500 | "
                        "0.9% | 0.5% | 20.5/18.0 |")


def test_without_trl_or_gpu_the_cells_are_dashes_and_the_precompute_pass_has_its_lines():
    row = Row("DPO tiny, precomputed", "dpo", "tiny", 4, ("dpo",), precompute=True)
    ours = {**OURS, "peak_gib": None, "precompute_pass": {**OUR_PASS, "peak_gib": None}}
    table = suite_table(suite_lines(row, {"": ours, "padding_free=true": OURS}, {}), "cpu").splitlines()
    assert table[2:] == [
        "| DPO tiny, precomputed | 10.00 | - | - | 9,000 | - | - | - | -/- |",
        "| DPO tiny, precomputed (padding_free=true) | 10.00 | - | - | 9,000 | - | - | - | 20.5/- |",
        ("| DPO tiny, precomputed: the precompute pass, loading the reference left out (ours; TRL's pass is not "
         "timed) | 8.00 | - | - | 6,400 | - | - | - | -/- |"),
        ("| DPO tiny, precomputed: our precompute pass whole, loading the reference included: 3.0 s of 5.0 s | 5.00 | "
         "- | - | 4,000 | - | - | - | -/- |"),
    ]


# our pass: 5 s in all, 3 s of it before the reference was loaded; 2 s with the reference loaded
OUR_PASS = {"secs": 5.0, "items_per_s": 5.0, "tokens_per_s": 4000.0, "flops_per_token": 2e8, "peak_gib": 12.0,
            "load_s": 3.0, "first_batch_s": 0.5,
            "after_load": {"secs": 2.0, "items_per_s": 8.0, "tokens_per_s": 6400.0}}
TRL_PASS = {"pairs": 16, "secs": 8.0, "items_per_s": 2.0, "tokens_per_s": 1600.0, "mean_tokens_per_item": 800.0,
            "flops_per_token": 2.5e8, "peak_gib": 9.5}


def test_the_precompute_passes_compare_ours_from_its_reference_loaded_with_trls():
    row = Row("DPO tiny, precomputed", "dpo", "tiny", 4, ("dpo",), precompute=True)
    trl = {"dpo": {**PADDED, "precompute": 1, "precompute_pass": TRL_PASS}}  # the anchor's own "precompute": its flag
    table = suite_table(suite_lines(row, {"": {**OURS, "precompute_pass": OUR_PASS}}, trl), "NVIDIA H200").splitlines()
    assert table[2] == "| DPO tiny, precomputed | 10.00 | 8.00 | 3.00x | 9,000 | 3,000 | 0.9% | 0.3% | 20.5/15.3 |"
    # like with like: 6,400 tokens/s with the reference loaded against TRL's 1,600; MFU 6400 x 2e8 and 1600 x 2.5e8
    assert table[3] == ("| DPO tiny, precomputed: the precompute pass, loading the reference left out (as TRL, which "
                        "loads it before its pass) | 8.00 | 2.00 | 4.00x | 6,400 | 1,600 | 0.1% | 0.0% | 12.0/9.5 |")
    assert table[4] == ("| DPO tiny, precomputed: our precompute pass whole, loading the reference included: 3.0 s of "
                        "5.0 s | 5.00 | - | - | 4,000 | - | 0.1% | - | 12.0/- |")
    assert len(table) == 5


def test_trls_pass_shows_when_ours_failed_and_its_mfu_is_a_dash_without_flops():
    row = Row("DPO tiny, precomputed", "dpo", "tiny", 4, ("dpo",), precompute=True)
    trl = {"dpo": {**PADDED, "precompute_pass": {**TRL_PASS, "flops_per_token": None}}}
    table = suite_table(suite_lines(row, {}, trl), "NVIDIA H200").splitlines()
    assert table[3] == ("| DPO tiny, precomputed: the precompute pass, loading the reference left out (as TRL, which "
                        "loads it before its pass) | - | 2.00 | - | - | 1,600 | - | - | -/9.5 |")
    assert len(table) == 4
    # no pass on either side (a row without precompute): no pass line
    assert len(suite_lines(Row("DPO tiny", "dpo", "tiny", 4, ("dpo",)), {"": OURS}, {"dpo": PADDED})) == 1


def test_a_failed_run_of_ours_still_shows_trl():
    row = Row("DPO tiny", "dpo", "tiny", 4, ("dpo",))
    table = suite_table(suite_lines(row, {}, {"dpo": PADDED}), "NVIDIA H200").splitlines()
    assert table[2] == "| DPO tiny | - | 8.00 | - | - | 3,000 | - | 0.3% | -/15.3 |"


def test_the_issue12_suite_covers_the_issue_rows():
    rows = bench_train.SUITES["issue12"]
    assert [(r.mode, r.shape, r.bs, r.trl, r.precompute) for r in rows] == [
        ("dpo", "qwen0.5b", 16, ("dpo",), False), ("dpo", "llama1b", 16, ("dpo",), False),
        ("sft", "qwen0.5b", 18, ("sft", "sft_packed"), False), ("sft", "llama1b", 36, ("sft", "sft_packed"), False),
        ("dpo", "qwen0.5b", 16, ("dpo",), True)]
    # SFT at equal tokens a step: TRL's packed items are max_length (1,024) tokens each, ours about 430
    assert [(r.bs_of("sft"), r.bs_of("sft_packed")) for r in rows[2:4]] == [(18, 8), (36, 16)]
    assert rows[0].bs_of("dpo") == 16


def test_mfu_cell_is_tokens_per_second_times_flops_per_token_over_the_peak():
    assert bench_train.mfu_cell({"tokens_per_s": 989e12 * 0.25 / 1e9, "flops_per_token": 1e9}, "NVIDIA H200") == "25.0%"
    assert bench_train.mfu_cell({"tokens_per_s": 1e3, "flops_per_token": None}, "NVIDIA H200") == "-"  # LoRA: none


def test_the_anchor_lengths_are_what_trl_forwards(tmp_path):
    anchor = tmp_path / "anchor.py"  # the anchor's generator, by its interface: make_rows(n, vocab_size)
    anchor.write_text("def make_rows(n, v):\n"
                      "    return [{'prompt': 'w1 ' * 600, 'chosen': 'w2 ' * 500, 'rejected': 'w3 ' * 3}] * n\n")
    module = bench_train.load_anchor(str(anchor))
    assert bench_train.anchor_lengths(module, "dpo", 2, 10, 1024) == [(600, 424, 4)] * 2  # keep_start; EOS
    assert bench_train.anchor_lengths(module, "sft", 1, 10, 1024) == [(1024,)]
    assert bench_train.anchor_lengths(module, "sft", 1, 10, 2048) == [(1101,)]  # + EOS


def test_large_models_run_one_process_at_a_time_unless_asked():
    small, large = Row("a", "dpo", "llama1b", 16, ("dpo",)), Row("b", "dpo", "llama8b", 16, ("dpo",))
    assert bench_train.overlap_for([small], None) == 2
    assert bench_train.overlap_for([small, large], None) == 0  # a waiting 8B process holds 48 GB of the GPU
    assert bench_train.overlap_for([large], 1) == 1 and bench_train.overlap_for([small], 0) == 0


def test_also_settings_name_a_real_module_attribute():
    assert bench_train.setting_problem("lr=1e-5") is None  # a config override: the child's loader checks it
    assert bench_train.setting_problem("inductor.combo_kernels=true") is None
    assert bench_train.setting_problem("aligntrain.compiling.FUSE_LINEARS=false") is None
    assert "has no setting 'nope'" in bench_train.setting_problem("inductor.nope=1")
    assert "no such module" in bench_train.setting_problem("aligntrain.nomodule.X=1")
    assert "NAME=VALUE" in bench_train.setting_problem("aligntrain.compiling.FUSE_LINEARS")


def test_idle_report_splits_the_gpus_waits_by_the_hosts_phase():
    def kernel(ts, dur, name):
        return {"ph": "X", "cat": "kernel", "ts": ts, "dur": dur, "name": name}

    events = [
        {"ph": "X", "cat": "user_annotation", "ts": 0, "dur": 1000, "name": "policy forward"},
        {"ph": "X", "cat": "user_annotation", "ts": 1000, "dur": 3000, "name": "backward"},
        {"ph": "X", "cat": "user_annotation", "ts": 0, "dur": 5000, "name": "an unrelated range"},
        kernel(100, 400, "fwd_a"), kernel(450, 200, "fwd_b"),  # overlapping: busy 100-650
        kernel(710, 290, "fwd_c"),  # a 60 us gap resuming in the forward
        {"ph": "X", "cat": "gpu_memcpy", "ts": 1000, "dur": 100, "name": "Memcpy HtoD"},  # work, no gap before it
        kernel(2100, 900, "bwd_a"),  # 1000 us waiting, resumed in the backward
        kernel(4620, 10, "after_all"),  # 1620 us, resumed outside every phase
        kernel(4631, 5, "close"),  # 1 us: under the gap threshold, still idle
    ]
    report = bench_train.idle_report(events, top=2)
    lines = report.splitlines()
    assert lines[0].startswith("GPU busy 1.9 ms of a 4.5 ms span (41%)")  # 550 + 290 + 100 + 900 + 10 + 5 us
    assert "idle 2.7 ms, 2.7 ms of it in 3 gaps" in lines[0]  # 60 + 1000 + 1620 (+ 1) us
    assert "between phases 1.6 ms, backward 1.0 ms, policy forward 0.1 ms" in lines[0]
    assert len(lines) == 3 and "after Memcpy HtoD / before bwd_a" not in lines[1]
    assert "1.62 ms" in lines[1] and "after bwd_a / before after_all" in lines[1]
    assert "1.00 ms" in lines[2] and "after Memcpy HtoD / before bwd_a" in lines[2]
    assert bench_train.idle_report([events[0]]) == "idle: no GPU work in the trace"


def test_a_repeated_also_is_a_run_of_its_own_in_the_table():
    """--also x --also y --also x (a setting interleaved with another to see drift between processes): three
    runs with three names, the repeat numbered, each run given its own overrides."""
    import argparse

    assert bench_train.run_names(["", "a=1", "b=2", "a=1", "a=1"]) == ["", "a=1", "b=2", "a=1 #2", "a=1 #3"]
    args = argparse.Namespace(steps=3, warm=1, gc=0, profile_step=None, cprofile_step=None, lora=None, max_length=64,
                              cache="/tmp/c", also=["k=1", "k=2", "k=1"], skip_trl=True)
    row = Row("SFT tiny", "sft", "tiny", 4, ("sft",), False)
    jobs = bench_train.row_jobs(row, args)
    assert [name for _, name, _ in jobs] == ["", "k=1", "k=2", "k=1 #2"]
    overrides = [job.command[job.command.index("--overrides") + 1:] if "--overrides" in job.command else []
                 for _, _, job in jobs]
    assert overrides == [[], ["k=1"], ["k=2"], ["k=1"]]
    assert jobs[3][2].label == "aligntrain SFT tiny (k=1 #2)"


def test_our_precompute_pass_waits_for_its_turn_on_the_gpu_before_its_timed_part(monkeypatch):
    calls = []
    for name in ("ready", "timed", "untimed"):
        monkeypatch.setattr(bench_train.gate, name, lambda name=name: calls.append(name))
    monkeypatch.setattr(bench_train, "timed_precompute", lambda *a: calls.append("pass") or {"secs": 1.0})
    assert bench_train.gated_precompute(None, None, None, []) == {"secs": 1.0}
    assert calls == ["ready", "timed", "pass", "untimed"]

    def fails(*a):
        raise RuntimeError("out of memory")

    calls.clear()
    monkeypatch.setattr(bench_train, "timed_precompute", fails)
    with pytest.raises(RuntimeError):
        bench_train.gated_precompute(None, None, None, [])
    assert calls == ["ready", "timed", "untimed"]  # the processes preparing go on


def test_our_pass_is_timed_whole_and_from_its_reference_loaded(monkeypatch):
    """TRL's timed pass starts with its reference loaded: ours is timed whole and from the moment
    precompute_reference's Reference is constructed (aligntrain itself unchanged, its class put back)."""
    import time

    from aligntrain import precompute

    class Reference:  # loads in 0.2 s; a forward takes none
        def __init__(self, cfg, device):
            time.sleep(0.2)

        def __call__(self, batch):
            return batch

    def precompute_reference(shards, cfg):  # as the real one: some set-up, the reference, its batches
        time.sleep(0.05)
        reference = precompute.Reference(cfg, "cpu")
        for batch in range(3):
            reference(batch)
        time.sleep(0.1)

    monkeypatch.setattr(precompute, "Reference", Reference)
    monkeypatch.setattr(precompute, "precompute_reference", precompute_reference)
    lengths = [(4, 2, 3), (1, 1, 1)]
    result = bench_train.timed_precompute(None, None, CONFIG, lengths)
    assert precompute.Reference is Reference
    counted, flops = data_counts(CONFIG, "dpo", lengths, policy=False, reference=True)
    assert result["mean_tokens_per_item"] == counted / 2 and result["flops_per_token"] == flops / counted
    after = result["after_load"]
    assert result["load_s"] >= 0.25 and after["secs"] >= 0.1 and result["first_batch_s"] < 0.15
    assert after["secs"] == pytest.approx(result["secs"] - result["load_s"], abs=2e-3)
    assert after["tokens_per_s"] == pytest.approx(counted / after["secs"], rel=0.02)
    assert after["items_per_s"] == pytest.approx(2 / after["secs"], rel=0.02) and result["peak_gib"] is None


def test_a_trl_process_s_precompute_line_is_kept_with_its_flops(tmp_path, capsys):
    """gated_trl.py's PRECOMPUTE line goes into TRL's result, with the FLOPs of the anchor's data for the
    reference's forward alone (checked against the pass's mean tokens per item, as the training run's)."""
    import argparse
    import json

    anchor = tmp_path / "anchor.py"  # every pair: prompt 4 words, chosen 2 (+ EOS), rejected 3 (+ EOS)
    anchor.write_text("def make_rows(n, v):\n"
                      "    return [{'prompt': 'w1 ' * 4, 'chosen': 'w2 ' * 2, 'rejected': 'w3 ' * 3}] * n\n")
    args = argparse.Namespace(anchor=str(anchor), steps=2, max_length=1024, lora=None)
    row = Row("DPO tiny, precomputed", "dpo", "tiny", 2, ("dpo",), precompute=True)
    config = bench_train.model_config("tiny")
    per_item = 2 * 4 + 3 + 4  # prompt+chosen, prompt+rejected
    trained = {"items_per_s": 3.0, "tokens_per_s": 45.0, "mean_tokens_per_item": per_item, "precompute": 1}
    pass_ = {"pairs": 6, "secs": 2.0, "items_per_s": 3.0, "tokens_per_s": 45.0, "mean_tokens_per_item": per_item,
             "peak_gib": None}
    stdout = f"loading\nPRECOMPUTE {json.dumps(pass_)}\nRESULT {json.dumps(trained)}\n"
    result = bench_train.trl_result(args, row, "dpo", stdout)
    counted, flops = data_counts(config, "dpo", [(4, 3, 4)] * 6, policy=False, reference=True)
    assert result["precompute"] == 1 and result["precompute_pass"] == {**pass_, "flops_per_token": flops / counted}
    _, trained_flops = data_counts(config, "dpo", [(4, 3, 4)] * 6, policy=True, reference=False)
    assert result["flops_per_token"] == trained_flops / counted

    off = {**pass_, "mean_tokens_per_item": per_item + 1}  # not the anchor's data as read here: no MFU, a note
    stdout_off = f"PRECOMPUTE {json.dumps(off)}\nRESULT {json.dumps(trained)}\n"
    assert bench_train.trl_result(args, row, "dpo", stdout_off)["precompute_pass"]["flops_per_token"] is None
    assert "precompute pass" in capsys.readouterr().err
    assert "precompute_pass" not in bench_train.trl_result(args, row, "dpo", f"RESULT {json.dumps(trained)}\n")
    assert bench_train.trl_result(args, row, "dpo", "PRECOMPUTE {}\n") is None  # no RESULT: the run failed
    lora = argparse.Namespace(**{**vars(args), "lora": "r=8"})
    assert bench_train.trl_result(lora, row, "dpo", stdout)["precompute_pass"]["flops_per_token"] is None
