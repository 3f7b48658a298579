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
    time.sleep(0.2)
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
