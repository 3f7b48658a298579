"""benchmarks/pipeline.py: processes take turns on the GPU in order, the next ones prepare meanwhile, and
nothing prepares while a timed part runs. The jobs here are small Python processes that speak gate.py's
protocol and write down when they did what."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gate  # noqa: E402  (a script folder, not a package)
import gated_trl  # noqa: E402
from pipeline import Job, run_jobs  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg") or not os.path.isdir("/proc"),
                                reason="POSIX process groups, Linux's /proc")

# A job: prepares for PREP seconds (writing the time every 5 ms to STAMPS), then runs: ready, a timed part of
# TIMED seconds, and prints what it saw as its RESULT.
CHILD = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {benchmarks!r})
    import gate
    prep, timed, stamps, fail = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4] == "fail"
    started = time.time()
    with open(stamps, "w") as f:
        while time.time() - started < prep:
            f.write(f"{{time.time()}}\\n"); f.flush(); time.sleep(0.005)
    if fail:
        raise SystemExit("this job fails while it prepares")
    gate.ready()
    went = time.time()
    gate.timed()
    timed_from = time.time()
    time.sleep(timed)
    timed_to = time.time()
    gate.untimed()
    print("RESULT " + json.dumps(dict(started=started, went=went, timed_from=timed_from, timed_to=timed_to)))
""")


@pytest.fixture
def child(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(benchmarks=str(REPO / "benchmarks")))

    def job(name: str, prep: float, timed: float, key: str | None = None, fail: bool = False) -> Job:
        return Job([sys.executable, str(script), str(prep), str(timed), str(tmp_path / f"{name}.stamps"),
                    "fail" if fail else "ok"], name, key or name)
    return job


def results(outcomes):
    out = []
    for o in outcomes:
        line = [x for x in o.stdout.splitlines() if x.startswith("RESULT ")]
        out.append(json.loads(line[0][7:]) if line else None)
    return out


def stamps(tmp_path, name):
    return [float(x) for x in (tmp_path / f"{name}.stamps").read_text().split()]


def test_jobs_take_turns_in_order_while_the_next_ones_prepare(child):
    ended = []
    outcomes = run_jobs([child("a", 0.1, 0.3), child("b", 0.3, 0.1), child("c", 0.2, 0.1)], preparing=2,
                        on_done=lambda o: ended.append(o.job.label))
    assert ended == ["a", "b", "c"] and [o.returncode for o in outcomes] == [0, 0, 0]
    a, b, c = results(outcomes)
    assert a["timed_to"] <= b["went"] and b["timed_to"] <= c["went"]  # one at a time, in order
    assert b["started"] < a["timed_to"]  # b prepared while a ran
    assert outcomes[1].prepare_s is not None and outcomes[1].prepare_s >= 0.3


def test_nothing_prepares_during_a_timed_part(child, tmp_path):
    outcomes = run_jobs([child("runner", 0.05, 0.6), child("preparer", 1.2, 0.0)], preparing=2)
    runner, preparer = results(outcomes)
    inside = [t for t in stamps(tmp_path, "preparer") if runner["timed_from"] < t < runner["timed_to"]]
    assert inside == []  # stopped the whole time
    assert preparer["went"] >= runner["timed_to"]
    # and it did go on preparing afterwards: its 1.2 s of stamps straddle the stop
    assert max(stamps(tmp_path, "preparer")) > runner["timed_to"]


def test_jobs_of_one_key_never_prepare_together(child, tmp_path):
    outcomes = run_jobs([child("first", 0.3, 0.0, key="k"), child("second", 0.1, 0.0, key="k")], preparing=2)
    first = stamps(tmp_path, "first")
    assert min(stamps(tmp_path, "second")) > max(first)  # second started after first was ready
    assert [o.returncode for o in outcomes] == [0, 0]


def test_a_failing_job_is_reported_and_the_rest_still_run(child):
    outcomes = run_jobs([child("ok1", 0.05, 0.05), child("bad", 0.05, 0.0, fail=True), child("ok2", 0.05, 0.05)])
    assert [o.returncode for o in outcomes] == [0, 1, 0]
    assert "fails while it prepares" in outcomes[1].stderr and outcomes[1].prepare_s is None
    assert results(outcomes)[2] is not None


def test_one_at_a_time_when_asked(child):
    outcomes = run_jobs([child("a", 0.1, 0.1), child("b", 0.1, 0.1)], preparing=1, alive=1)
    a, b = results(outcomes)
    assert b["started"] >= a["timed_to"]  # b began only once a had ended


def test_the_gate_does_nothing_without_a_pipeline(monkeypatch):
    monkeypatch.delenv(gate.ENV, raising=False)
    gate.ready(), gate.timed(), gate.untimed()  # no pipe: each returns at once


def test_gated_trl_reads_the_scripts_warm_steps():
    assert gated_trl.warm_steps(["--mode", "dpo", "--warm", "4"]) == 4
    assert gated_trl.warm_steps(["--warm=3"]) == 3
    assert gated_trl.warm_steps(["--mode", "sft"]) == 5  # the scripts' default


TRAINER_SCRIPT = textwrap.dedent("""
    import time, torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    class Timer(TrainerCallback):  # as the anchor's: the clock starts at the end of step --warm
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                self.t0 = time.time()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    rows = [{{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}}] * 8
    timer = Timer()
    args = TrainingArguments(output_dir={out!r}, max_steps=4, per_device_train_batch_size=2, report_to="none",
                             save_strategy="no", use_cpu=True)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer]).train()
    print("RESULT {{}}")
""")


@pytest.mark.slow
def test_gated_trl_gates_a_transformers_trainer(tmp_path):
    """A script's Trainer.train waits for the turn, and its timed part begins at the end of step --warm."""
    script = tmp_path / "script.py"
    script.write_text(TRAINER_SCRIPT.format(out=str(tmp_path / "out")))
    command = [sys.executable, str(REPO / "benchmarks" / "gated_trl.py"), str(script), "--warm", "2"]
    [outcome] = run_jobs([Job(command, "trainer", "k")])
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    assert outcome.messages == ["ready", "timed", "untimed"] and outcome.prepare_s is not None


def test_gated_trl_runs_a_script_as_its_main(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint('RESULT', sys.argv[1:], __name__)\n")
    out = subprocess.run([sys.executable, "-c", "import sys; "
                          f"sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import gated_trl; "
                          "gated_trl.install = lambda warm: None; gated_trl.main()", str(script), "--warm", "2"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "RESULT ['--warm', '2'] __main__"


def test_a_timed_part_past_the_watchdog_lets_the_preparing_go_on(child, tmp_path):
    outcomes = run_jobs([child("runner", 0.05, 1.0), child("preparer", 1.5, 0.0)], preparing=2, watchdog_s=0.3)
    runner, _ = results(outcomes)
    inside = [t for t in stamps(tmp_path, "preparer") if runner["timed_from"] + 0.45 < t < runner["timed_to"]]
    assert inside  # stopped at first, going on again once the watchdog had fired


def test_stopping_the_scheduler_ends_every_job(child, tmp_path):
    """`timeout` sends SIGTERM to the suite: the jobs it started (stopped ones included) end with it."""
    script = tmp_path / "scheduler.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / "benchmarks")!r})
        from pipeline import Job, run_jobs
        jobs = [Job([sys.executable, "-c", "import os, sys, time; print(os.getpid(), flush=True); time.sleep(60)"], n, n)
                for n in ("a", "b", "c")]
        run_jobs(jobs, preparing=3)
    """))
    scheduler = subprocess.Popen([sys.executable, str(script)])
    deadline = time.time() + 20
    pids = []
    while time.time() < deadline and len(pids) < 3:  # a, b and c started (none says ready: all prepare)
        time.sleep(0.1)
        pids = _job_pids(scheduler.pid)
    assert len(pids) == 3, pids
    scheduler.terminate()
    assert scheduler.wait(timeout=20) != 0
    deadline = time.time() + 10  # signalled, they exit as soon as the (maybe busy) machine runs them
    while time.time() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not [pid for pid in pids if _alive(pid)]


def _job_pids(parent: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                children.append(int(entry))
    return children


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class FakePipeline:
    """gate.py's pipe in this process: what it says is read back, and each of its questions is answered."""

    def __init__(self, monkeypatch, answers: int):
        self.said, said_w = os.pipe()
        answer_r, answer_w = os.pipe()
        os.write(answer_w, b"g" * answers)
        cores = " ".join(map(str, sorted(os.sched_getaffinity(0)))) if hasattr(os, "sched_getaffinity") else "0"
        monkeypatch.setenv(gate.ENV, f"{said_w},{answer_r},{cores}")
        monkeypatch.setitem(gate._state, "gone", False)
        monkeypatch.setitem(gate._state, "waited", 0.0)
        self.fds = [said_w, answer_r, answer_w]

    def messages(self) -> list[str]:
        for fd in self.fds:
            os.close(fd)
        with os.fdopen(self.said) as said:
            return said.read().split()


def test_the_timed_pass_waits_for_its_turn_and_counts_tokens_as_the_anchor(monkeypatch):
    pipeline = FakePipeline(monkeypatch, answers=2)  # ready, timed
    dataset = {"prompt_ids": [[1] * 5, [1] * 2], "chosen_ids": [[2] * 4, [2] * 3], "rejected_ids": [[3] * 7, [3]]}
    ran = []

    def run():
        ran.append(gate._state["gone"])
        time.sleep(0.05)
        return "cached"

    out, result = gated_trl.timed_pass(run, dataset, max_length=10)
    gate.ready()  # Trainer.train's own: the turn was had, it returns at once
    assert pipeline.messages() == ["ready", "timed", "untimed"]
    assert out == "cached" and ran == [True]  # the pass ran on its turn
    tokens = min(10, 9) + min(10, 12) + (2 + 3) + (2 + 1)  # prompt+chosen, prompt+rejected, each cut to 10
    assert result["pairs"] == 2 and result["mean_tokens_per_item"] == tokens / 2 == 13.5
    assert result["tokens_per_s"] == pytest.approx(tokens / result["secs"], rel=0.05)
    assert result["items_per_s"] == pytest.approx(2 / result["secs"], rel=0.05) and result["peak_gib"] is None


def test_pass_counts_without_max_length_cuts_nothing():
    dataset = {"prompt_ids": [[1] * 600], "chosen_ids": [[2] * 500], "rejected_ids": [[3] * 4]}
    assert gated_trl.pass_counts(dataset, None) == (1, 1100 + 604)
    assert gated_trl.pass_counts(dataset, 1024) == (1, 1024 + 604)


def fake_trl(monkeypatch, method: bool = True):
    """A stand-in for trl.trainer.dpo_trainer: DPOTrainer whose precompute pass returns the dataset named."""
    import types

    class DPOTrainer:
        args = types.SimpleNamespace(max_length=3)

    if method:
        DPOTrainer._precompute_ref_logps = lambda self, dataset, name, batch_size: (name, batch_size)
    module = types.ModuleType("trl.trainer.dpo_trainer")
    module.DPOTrainer = DPOTrainer
    monkeypatch.setitem(sys.modules, "trl.trainer.dpo_trainer", module)
    return DPOTrainer


def test_gated_trl_times_dpo_trainers_train_pass_only(monkeypatch, capsys):
    monkeypatch.delenv(gate.ENV, raising=False)
    trainer = fake_trl(monkeypatch)
    original = trainer._precompute_ref_logps
    gated_trl.install_precompute()
    assert trainer._precompute_ref_logps is not original
    dataset = {"prompt_ids": [[1, 1], [1]], "chosen_ids": [[2, 2], [2]], "rejected_ids": [[3], [3]]}
    assert trainer()._precompute_ref_logps(dataset, "eval", 4) == ("eval", 4)
    assert capsys.readouterr().out == ""  # an eval pass (train may run one in its timed steps): as it is
    assert trainer()._precompute_ref_logps(dataset, "train", 4) == ("train", 4)
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(gated_trl.PASS_LINE + " ")
    result = json.loads(line.split(" ", 1)[1])
    assert result["pairs"] == 2 and result["mean_tokens_per_item"] == (3 + 3 + 2 + 2) / 2  # max_length 3


def test_gated_trl_without_trl_or_its_precompute_method_patches_nothing(monkeypatch):
    trainer = fake_trl(monkeypatch, method=False)
    gated_trl.install_precompute()
    assert not hasattr(trainer, "_precompute_ref_logps")
    monkeypatch.setitem(sys.modules, "trl.trainer.dpo_trainer", None)  # `import` raises ImportError
    gated_trl.install_precompute()


DPO_SCRIPT = textwrap.dedent("""
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    vocab = {{f"w{{i}}": i for i in range(29)}}
    vocab.update({{"<pad>": 29, "<eos>": 30, "<unk>": 31}})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32, pad_token_id=29, eos_token_id=30)
    rows = [{{"prompt": "w1 w2 w3 ", "chosen": "w4 w5", "rejected": "w6"}}] * 4
    args = DPOConfig(output_dir={out!r}, max_steps=2, per_device_train_batch_size=2, report_to="none",
                     save_strategy="no", use_cpu=True, max_length=5, precompute_ref_log_probs=True)
    DPOTrainer(model=LlamaForCausalLM(config), ref_model=LlamaForCausalLM(config), args=args,
               train_dataset=Dataset.from_list(rows), processing_class=tok).train()
    print("RESULT {{}}")
""")


@pytest.mark.slow
def test_gated_trl_times_trls_precompute_pass(tmp_path):
    """With TRL installed: DPOTrainer's precompute pass is a timed part of its own, on the job's turn, and
    prints its PRECOMPUTE line; Trainer.train's ready() then returns at once."""
    pytest.importorskip("trl")
    script = tmp_path / "script.py"
    script.write_text(DPO_SCRIPT.format(out=str(tmp_path / "out")))
    command = [sys.executable, str(REPO / "benchmarks" / "gated_trl.py"), str(script), "--warm", "1"]
    [outcome] = run_jobs([Job(command, "dpo", "k")])
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    assert outcome.messages == ["ready", "timed", "untimed", "timed", "untimed"]
    [line] = [x for x in outcome.stdout.splitlines() if x.startswith(gated_trl.PASS_LINE + " ")]
    result = json.loads(line.split(" ", 1)[1])
    # prompt 3 words, completions 2 and 1 plus EOS: min(5, 3 + 3) + min(5, 3 + 2)
    assert result["pairs"] == 4 and result["mean_tokens_per_item"] == 10
