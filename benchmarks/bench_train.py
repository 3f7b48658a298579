"""Training throughput on one GPU: `aligntrain dpo|sft` against TRL 1.16's trainers, same card, same call.

The anchor is `../shared/bench/trl_anchor.py` (TRL's DPOTrainer / SFTTrainer on a randomly initialised
model of a real shape, word-level synthetic data with log-normal prompt and reply lengths). This script
builds the same kind of data for us (its own generator, the same length distribution: prompt median 120
tokens, replies 220, max_length 1024), converts it with `aligndata convert` into shards, and times
`aligntrain.trainer.train` step by step. Each side runs in a fresh process; the first `--warm` steps
are not timed; peak GPU memory is read over the timed steps.

  python benchmarks/bench_train.py --mode dpo --shape qwen0.5b --bs 16 --steps 20
  python benchmarks/bench_train.py --mode sft --shape qwen0.5b --bs 8 --steps 30
  python benchmarks/bench_train.py --shape tiny --steps 4 --warm 1 --skip-trl     # a CPU smoke run
  python benchmarks/bench_train.py --mode dpo --shape llama1b --bs 16 --lora r=16,alpha=32,targets=all-linear
  python benchmarks/bench_train.py --suite issue12                  # every row of issue 12, one table
  python benchmarks/bench_train.py --suite issue12 --shape-override tiny --skip-trl --steps 3 --warm 1  # on CPU

MFU (aligntrain/flops.py) credits both sides by one rule, `data_counts`, applied to the per-item lengths
of the data each side trains on: useful FLOPs only (no padding; a pair's prompt once; the reference's
forward unless precomputed), divided by the tokens the table counts (the non-pad tokens each item
forwards: prompt+chosen and prompt+rejected for a pair). Our lengths come from our shards; TRL's from
the anchor's own generator (`anchor_lengths`, checked against the anchor's mean tokens per item). A
side's MFU is its tokens/s times its FLOPs per token over the card's dense bf16 peak, so TRL's padding,
its prompt forwarded twice and its packing cost it time and earn it no FLOPs.

With `--lora`, both sides train LoRA adapters of the same peft config on a frozen bf16 base and take
the reference from the base with adapters disabled; the TRL side is `trl_lora.py` (TRL's DPOTrainer
with `peft_config`, the anchor's data and timing), as the anchor has no peft option.

What differs by design: TRL trains the bf16 weights directly; aligntrain keeps float32 master weights
and AdamW state and computes in bf16 under autocast (policy_dtype: bfloat16), which costs memory and
some speed and is the numerically safer recipe. The reference model is bf16 in both.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import gate
from childrun import result_line
from gated_trl import PASS_LINE
from pipeline import Job, Outcome, run_jobs

from aligntrain.flops import item_counts, mfu, training_flops

REPO = Path(__file__).resolve().parents[1]
ANCHOR = REPO.parent / "shared" / "bench" / "trl_anchor.py"
TRL_LORA = Path(__file__).resolve().parent / "trl_lora.py"
GATED_TRL = Path(__file__).resolve().parent / "gated_trl.py"
PASS = "precompute_pass"  # a result's precompute pass, ours and TRL's (the anchor's "precompute" is its flag)

# Model shapes by their published configurations (Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.1-8B) and a toy
# one for CPU; the embeddings are tied unless the shape says otherwise (Llama-3.1-8B's are not).
SHAPES = {
    "qwen0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, vocab_size=151936, rope_theta=1e6)),
    "llama1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256, rope_theta=5e5)),
    "llama8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256, rope_theta=5e5, tie_word_embeddings=False)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000)),
}
LARGE_SHAPES = {"llama8b"}  # run one process at a time by default (overlap_for)
# Content, then the end-of-sequence token after every assistant turn: no chat markup, so both sides
# train on the same tokens (TRL appends EOS to completions of a tokenizer without a chat template).
TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
            "{% else %} {% endif %}{% endfor %}")


def build_model_dir(shape: str, out: Path, tokenizer_out: Path) -> int:
    """A randomly initialised model of `shape` in `out` and a word-level tokenizer (w0, w1, ... one id
    each) in `tokenizer_out`: a directory of its own, for next to a config.json whose model_type is
    qwen2, transformers 5 loads it as Qwen2Tokenizer, which puts its own byte-level pre-tokenizer in
    front of the word vocabulary (every word then maps to nothing)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab_size = SHAPES[shape][1]["vocab_size"]
    words = {f"w{i}": i for i in range(vocab_size - 3)}
    words.update({"<pad>": vocab_size - 3, "<eos>": vocab_size - 2, "<unk>": vocab_size - 1})
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = TEMPLATE
    config = model_config(shape, eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 3)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # an 8B init takes minutes on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tok.save_pretrained(tokenizer_out)
    return params


def model_config(shape: str, **extra):
    """The transformers config of `shape` (also what trl_lora.py builds for TRL)."""
    from transformers import AutoConfig

    kind, dims = SHAPES[shape]
    return AutoConfig.for_model(kind, **{"max_position_embeddings": 4096, "tie_word_embeddings": True, **extra, **dims})


def parse_lora(spec: str) -> dict:
    """`r=16,alpha=32,targets=all-linear` (targets: all-linear or names joined by '+') -> our model.lora."""
    fields = dict(part.split("=", 1) for part in spec.split(","))
    unknown = set(fields) - {"r", "alpha", "targets"}
    if unknown:
        raise SystemExit(f"--lora: unknown field(s) {sorted(unknown)}; use r=16,alpha=32,targets=all-linear")
    targets = fields.get("targets", "all-linear")
    return {"r": int(fields.get("r", 16)), "alpha": float(fields.get("alpha", 32)),
            "target_modules": targets if targets == "all-linear" else targets.split("+")}


def draw_length(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    """A log-normal length (the median times e^N(0, sigma)) clipped to [lo, hi]: the benchmarks' prompts
    (median 120, sigma 0.8, 8-600) and replies (220, 0.7, 4-800)."""
    return min(hi, max(lo, int(median * math.exp(rng.gauss(0, sigma)))))


def write_rows(path: Path, n: int, vocab_size: int, mode: str, seed: int = 1) -> None:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(f"w{rng.randrange(vocab_size - 3)}" for _ in range(k))

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            prompt, chosen, rejected = text(draw_length(rng, 120, 0.8, 8, 600)), \
                text(draw_length(rng, 220, 0.7, 4, 800)), text(draw_length(rng, 220, 0.7, 4, 800))
            if mode == "dpo":
                row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            else:
                row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}]}
            f.write(json.dumps(row) + "\n")


def load_anchor(path: str):
    """trl_anchor.py as a module (its data generator and timer; also trl_lora.py's)."""
    spec = importlib.util.spec_from_file_location("trl_anchor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def anchor_lengths(anchor, mode: str, n: int, vocab_size: int, max_length: int) -> list[tuple[int, ...]]:
    """Per item of the anchor's data (its generator, seed and n rows; one word, one token), what TRL 1.16
    forwards: the EOS both trainers append to a completion, then for DPO (prompt, chosen, rejected) with
    each prompt+completion cut to its first max_length tokens (truncation keep_start), for SFT (row
    length,) cut the same way (packing, bfd, cuts each row so before it packs)."""
    lengths = []
    for row in anchor.make_rows(n, vocab_size):
        p, c, r = (len(row[k].split()) for k in ("prompt", "chosen", "rejected"))
        if mode == "dpo":
            lengths.append((p, min(c + 1, max_length - p), min(r + 1, max_length - p)))
        else:
            lengths.append((min(max_length, p + c + 1),))
    return lengths


def trl_flops_per_token(args: argparse.Namespace, row: Row, mode: str, reported: dict,
                        pass_: bool = False) -> float | None:
    """Useful FLOPs per counted token of the anchor's own data for `row`, by data_counts' rule (as ours): of
    its training run, or (`pass_`) of its precompute pass over `reported`'s pairs (the reference's forward
    alone, as our pass); checked against the mean tokens per item reported (None, with a note, where they
    differ)."""
    config = model_config(row.shape)
    n = reported["pairs"] if pass_ else row.bs_of(mode) * (args.steps + 2)
    lengths = anchor_lengths(load_anchor(args.anchor), "dpo" if mode == "dpo" else "sft", n, config.vocab_size,
                             args.max_length)
    if pass_:
        counted, flops = data_counts(config, "dpo", lengths, policy=False, reference=True)
    else:
        counted, flops = data_counts(config, row.mode, lengths, policy=True,
                                     reference=mode == "dpo" and not row.precompute)
    if mode != "sft_packed" and abs(counted / len(lengths) - reported["mean_tokens_per_item"]) > 0.1:
        print(f"TRL {row.name} ({mode}{', precompute pass' if pass_ else ''}): the anchor forwarded "
              f"{reported['mean_tokens_per_item']} tokens per item, its data as read here "
              f"{counted / len(lengths):.1f}: no MFU", file=sys.stderr)
        return None
    return flops / counted


def trl_result(args: argparse.Namespace, row: Row, mode: str, stdout: str) -> dict | None:
    """A TRL process's RESULT with its FLOPs per token (None with --lora), and its precompute pass where
    gated_trl.py timed one (its PASS_LINE) as PASS, with the pass's own FLOPs per token."""
    result = result_line(stdout)
    if result is None:
        return None
    result["flops_per_token"] = None if args.lora else trl_flops_per_token(args, row, mode, result)
    pass_ = result_line(stdout, PASS_LINE)
    if pass_ is not None:
        result[PASS] = {**pass_, "flops_per_token": None if args.lora else
                        trl_flops_per_token(args, row, mode, pass_, pass_=True)}
    return result


def build_inputs(base: Path, shape: str, mode: str, n: int, max_length: int, scratch: Path,
                 shards: Path | None = None) -> tuple[Path, Path, Path, int]:
    """(model dir, tokenizer dir, shards, parameter count) of `shape` and `n` rows of `mode`, each built in
    `base` unless already there (the shards in `shards` instead when given); the raw rows are written in
    `scratch`, this process's own folder."""
    from aligndata.write.convert import convert
    from aligndata.write.shards import MANIFEST

    model_dir, tokenizer_dir, count = base / f"model-{shape}", base / f"tokenizer-{shape}", base / f"model-{shape}.params"
    if not count.exists():
        count.write_text(str(build_model_dir(shape, model_dir, tokenizer_dir)))  # last: the model is complete
    shards = shards or base / f"shards-{shape}-{mode}-{n}-{max_length}"
    if not (shards / MANIFEST).exists():
        rows = scratch / "rows.jsonl"
        write_rows(rows, n, SHAPES[shape][1]["vocab_size"], mode)
        convert([str(rows)], shards, mode, str(tokenizer_dir), max_length=max_length,
                max_prompt_length=max_length // 2 if mode == "dpo" else None, length_policy="truncate", overwrite=True)
    return model_dir, tokenizer_dir, shards, int(count.read_text())


def bench_config(mode: str, batch: int, steps: int, max_length: int, gc: int, model_dir: Path, tokenizer_dir: Path,
                 dtype: str, output_dir: Path, lora: dict | None = None, **top) -> dict:
    """The config of one benchmark run (JSON, which is YAML): `batch` items a step for `steps` steps, one
    micro-batch a step, no logging on the way; `top`: more top-level keys (bench_fsdp.py's trainer)."""
    return {
        "exp_name": "bench", "seed": 0, "debug": True, "lr": 1e-6, **top, "total_batch_size": batch,
        "gradient_accumulation_steps": 1, "max_length": max_length,
        "max_prompt_length": max_length // 2 if mode == "dpo" else None,
        "n_examples": batch * steps, "activation_checkpointing": bool(gc),
        "model": {"name_or_path": str(model_dir), "tokenizer_name_or_path": str(tokenizer_dir),
                  "policy_dtype": dtype, "reference_dtype": dtype, **({"lora": lora} if lora else {})},
        "loss": {"name": mode, "beta": 0.1}, "output_dir": str(output_dir), "log_every_steps": 10 ** 6,
    }


def run_ours(args: argparse.Namespace) -> dict:
    import torch

    import aligntrain.trainer as T
    from aligndata.write.shards import open_split
    from aligntrain.config import load_config

    t_process = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    # the model of a shape and the shards of a (shape, mode, size) are built once per suite (--cache), except
    # the shards a precompute run writes reference log-probs into
    base = Path(args.cache) if args.cache else work
    n = args.bs * (args.steps + 2)
    model_dir, tokenizer_dir, shards, params = build_inputs(base, args.shape, args.mode, n, args.max_length, work,
                                                            work / "shards" if args.precompute else None)
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    cfg_path = work / "config.yml"
    cfg_path.write_text(json.dumps(bench_config(args.mode, args.bs, args.steps, args.max_length, args.gc, model_dir,
                                                tokenizer_dir, dtype, work / "run",
                                                lora=parse_lora(args.lora) if args.lora else None)))
    settings = [o for o in args.overrides if o.startswith(SETTING_PREFIXES)]
    for item in settings:  # --also inductor.combo_kernels=true or aligntrain.compiling.FUSE_LINEARS=false
        import yaml

        module, name, value = setting_target(item)
        setattr(module, name, yaml.safe_load(value))
    cfg = load_config(cfg_path, overrides=[o for o in args.overrides if o not in settings] or None)
    config = model_config(args.shape)
    lengths = item_lengths(open_split(shards, "train"), args.mode)
    counted, flops = data_counts(config, args.mode, lengths, policy=True, reference=args.mode == "dpo" and not args.precompute)
    per_item = counted / len(lengths)
    result = {}
    passing = 0.0  # our precompute pass and the pipeline's wait for the GPU before it: in neither part below
    if args.precompute:
        began = time.perf_counter()
        result[PASS] = gated_precompute(shards, cfg, config, lengths)
        passing = time.perf_counter() - began

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    times: list[float] = []
    graphs: list[int] = []  # graphs compiled so far, at the start of the timed steps and at their end
    step_fn = T.train_step
    profiled_secs = 0.0

    def profiled_step(profiler, step, *a, **k):
        nonlocal profiled_secs
        sync()  # the previous step's last kernels count in its time, not in the profiled one
        started = time.perf_counter()
        out = profiler(step_fn, step, *a, **k)
        sync()
        times.append(time.perf_counter())
        profiled_secs += times[-1] - started
        return out

    def timed_step(step, *a, **k):
        gate.ready()  # the first step waits for this process's turn on the GPU (bench pipeline)
        if step == args.profile_step:
            return profiled_step(profile_step, step, *a, **k)  # not timed: profiling slows it
        if step == args.cprofile_step:
            return profiled_step(host_profile_step, step, *a, **k)
        out = step_fn(step, *a, **k)
        # A step ends with its optimizer update queued, and the next step's host work overlaps it, as in any
        # run: the clock waits for the GPU only at the ends of the timed span.
        if step in (args.warm, args.steps):
            sync()
        if step == args.warm:
            gate.timed()  # before the clock: the timed steps have the host to themselves
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            graphs.append(compiled_graphs())
            gc_watch.start()
        times.append(time.perf_counter())
        return out

    T.train_step = timed_step
    gc_watch = GcWatch()
    t_start = time.perf_counter()
    T.train(cfg, shards)
    gc_watch.stop()
    gate.untimed()
    graphs.append(compiled_graphs())
    waited = gate.waited()  # the pipeline's wait for the GPU is in neither part below (with a pass: in `passing`)
    secs = times[-1] - times[args.warm - 1] - profiled_secs
    profiled = sum(1 for n in (args.profile_step, args.cprofile_step) if n)
    steps_timed = len(times) - args.warm - profiled  # profiled steps are not timed
    items = steps_timed * args.bs
    return {"secs": round(secs, 3), "items_per_s": round(items / secs, 2),
            "tokens_per_s": round(items * per_item / secs, 1), "mean_tokens_per_item": round(per_item, 1),
            "flops_per_token": None if args.lora else flops / counted,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else None,
            **({"profile": "\n\n".join(profile_text)} if profile_text else {}),
            "params": params, "steps_timed": steps_timed,
            "prepare_s": round(t_start - t_process - passing, 1),
            "first_step_s": round(times[0] - t_start - (0 if args.precompute else waited), 1),
            "train_s": round(time.perf_counter() - t_start, 1), "graphs_compiled_timed": graphs[-1] - graphs[0],
            "gc": gc_watch.summary(), **result}


class GcWatch:
    """Python's garbage collections from start() to stop(): how many of each generation and the time they
    took (a full collection of a process holding a model and its compiled graphs stalls the host)."""

    def __init__(self):
        self.on, self.began, self.counts, self.secs = False, 0.0, [0, 0, 0], [0.0, 0.0, 0.0]

    def _callback(self, phase: str, info: dict) -> None:
        if not self.on:
            return
        if phase == "start":
            self.began = time.perf_counter()
        else:
            generation = info.get("generation", 2)
            self.counts[generation] += 1
            self.secs[generation] += time.perf_counter() - self.began

    def start(self) -> None:
        import gc

        self.on = True
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stop(self) -> None:
        import gc

        self.on = False
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def summary(self) -> str:
        return ", ".join(f"gen{g} {n} x {1e3 * t:.1f} ms" for g, (n, t) in enumerate(zip(self.counts, self.secs)))


SETTING_PREFIXES = ("inductor.", "aligntrain.")  # --also items that set a module attribute, not a config key


def setting_target(item: str):
    """(module, attribute name, value text) of an --also item `inductor.NAME=V` (torch._inductor.config.NAME)
    or `aligntrain.MODULE.NAME=V`."""
    key, value = item.split("=", 1)
    path = "torch._inductor.config." + key[len("inductor."):] if key.startswith("inductor.") else key
    module, _, name = path.rpartition(".")
    return importlib.import_module(module), name, value


def setting_problem(item: str) -> str | None:
    """Why an --also item that sets a module attribute cannot (None: it can, or it is a config override,
    which the child's config loader checks)."""
    if not item.startswith(SETTING_PREFIXES):
        return None
    if "=" not in item:
        return f"{item!r} is not of the form NAME=VALUE"
    try:
        module, name, _ = setting_target(item)
    except ImportError as e:
        return f"{item.split('=', 1)[0]}: no such module ({e})"
    if not hasattr(module, name):
        return f"{module.__name__} has no setting {name!r}"
    return None


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (dynamo's count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


PHASES = ("policy forward", "reference forward", "backward", "clip_grad_norm", "optimizer.step")


def profile_step(step_fn, step, model, objective, optimizer, scheduler, batches, cfg, accelerator, **kw):
    """One training step under torch.profiler, each phase a named range: prints the wall clock and device
    time of every phase, the step's total kernel time against its wall clock, and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    def ranged(fn, name):
        def run(*a, **k):
            with record_function(name):
                return fn(*a, **k)
        return run

    saved = {"forward": model.forward, "backward": accelerator.backward,
             "clip": accelerator.clip_grad_norm_, "step": optimizer.step, "reference": objective.reference}
    model.forward = ranged(saved["forward"], PHASES[0])
    if objective.reference is not None:
        objective.reference = ranged(saved["reference"], PHASES[1])
    accelerator.backward = ranged(saved["backward"], PHASES[2])
    accelerator.clip_grad_norm_ = ranged(saved["clip"], PHASES[3])
    optimizer.step = ranged(saved["step"], PHASES[4])
    inner = getattr(optimizer, "optimizer", optimizer)
    own_clip = hasattr(inner, "clip_grad_norm_")  # masters.MasterAdam clips as its update reads the gradients
    if own_clip:
        inner.clip_grad_norm_ = ranged(inner.clip_grad_norm_, PHASES[3])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    try:
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        started = time.perf_counter()
        with profile(activities=activities) as prof:
            out = step_fn(step, model, objective, optimizer, scheduler, batches, cfg, accelerator, **kw)
            torch.cuda.synchronize() if torch.cuda.is_available() else None
        wall = time.perf_counter() - started
    finally:
        model.forward, accelerator.backward, accelerator.clip_grad_norm_ = saved["forward"], saved["backward"], saved["clip"]
        optimizer.step, objective.reference = saved["step"], saved["reference"]
        if own_clip:
            del inner.clip_grad_norm_  # the method again
    events = prof.key_averages()
    device_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    from torch.autograd import DeviceType

    # kernels only, as the table's own total counts them: user ranges (ours, Optimizer.step) span kernels
    kernels = sum(getattr(e, device_attr) for e in events
                  if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e3
    lines = [f"profiled step {step}: wall {wall * 1e3:.1f} ms under the profiler (which slows the host), GPU kernel "
             f"time {kernels:.1f} ms; compare the kernel time with an unprofiled step (items per step / items/s)"]
    for e in events:
        if e.key in PHASES:
            device = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1e3
            lines.append(f"  {e.key:18s} host {e.cpu_time_total / 1e3:8.1f} ms  device {device:8.1f} ms  x{e.count}")
    lines.append(events.table(sort_by=device_attr, row_limit=45, max_name_column_width=90))
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as f:
            trace = json.load(f)
    lines.append(idle_report(trace.get("traceEvents", [])))
    profile_text.append("\n".join(lines))
    return out


GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # chrome-trace categories of work on the device


def idle_report(trace_events: list[dict], top: int = 8, min_gap_us: float = 20.0) -> str:
    """Where the GPU waited in a profiled step, from its chrome trace: the device's busy time (the union of
    its kernels and copies) against the span from the first to the last, the idle time split by the phase
    the host was in when the next kernel came (PHASES' host ranges; "between phases" outside them), and
    the longest gaps with the kernels on either side."""
    work = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "?")) for e in trace_events
                  if e.get("ph") == "X" and e.get("cat") in GPU_WORK)
    if not work:
        return "idle: no GPU work in the trace"
    ranges = [(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in trace_events
              if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e.get("name") in PHASES]
    gaps, busy, end, last = [], 0.0, work[0][0], work[0][2]
    for start, stop, name in work:
        if start - end >= min_gap_us:
            gaps.append((start - end, end, last, name, start))
        if stop > end:
            busy += stop - max(start, end)
            end, last = stop, name
    span = end - work[0][0]
    by_phase: dict[str, float] = {}
    for length, _, _, _, resumed in gaps:
        phase = next((n for a, b, n in ranges if a <= resumed <= b), "between phases")
        by_phase[phase] = by_phase.get(phase, 0.0) + length
    idle = span - busy
    lines = [f"GPU busy {busy / 1e3:.1f} ms of a {span / 1e3:.1f} ms span ({busy / span:.0%}); idle {idle / 1e3:.1f} ms, "
             f"{sum(g[0] for g in gaps) / 1e3:.1f} ms of it in {len(gaps)} gaps of {min_gap_us:.0f} us or more, by the "
             "host's phase when work resumed: " + ", ".join(f"{k} {v / 1e3:.1f} ms" for k, v in
                                                           sorted(by_phase.items(), key=lambda kv: -kv[1]))]
    for length, at, before, after, _ in sorted(gaps, reverse=True)[:top]:
        lines.append(f"  gap {length / 1e3:6.2f} ms at +{(at - work[0][0]) / 1e3:6.1f} ms: after {before[:50]} / before {after[:50]}")
    return "\n".join(lines)


profile_text: list[str] = []  # profile_step's report, handed to the parent in the child's RESULT


def host_profile_step(step_fn, step, *args, **kw):
    """One training step under cProfile: where the host's (Python's) time goes, the functions that spend the
    most in their own code, then the most including what they call."""
    import cProfile
    import io
    import pstats

    import torch

    profiler = cProfile.Profile()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    started = time.perf_counter()
    profiler.enable()
    out = step_fn(step, *args, **kw)
    profiler.disable()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write(f"host profile of step {step}: wall {(time.perf_counter() - started) * 1e3:.1f} ms under cProfile\n")
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    profile_text.append("\n".join(line.rstrip() for line in text.getvalue().splitlines() if line.strip()))
    return out


def gated_precompute(shards: Path, cfg, config, lengths: list[tuple[int, ...]]) -> dict:
    """timed_precompute on this process's turn on the GPU (gate.ready: the pass runs on the GPU, as training
    does), as a timed part of its own: nothing else prepares on the host meanwhile."""
    with gate.timed_turn():
        return timed_precompute(shards, cfg, config, lengths)


def timed_precompute(shards: Path, cfg, config, lengths: list[tuple[int, ...]]) -> dict:
    """`precompute_reference` over every pair of the shards, timed as a whole: what `aligntrain precompute-ref`
    costs before training. `load_s` is its part before the reference is loaded and on the device (the
    tokenizer, the shards' check, the hash of the weights, loading the reference), `after_load` the rates of
    the rest: TRL's timed pass starts there (the anchor loads its reference before DPOTrainer, which hashes
    it in __init__ before the pass). Compiling the reference, on its first batches, is in `after_load`;
    `first_batch_s` is the first batch's forward (compiling included)."""
    import torch

    from aligntrain import precompute

    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    marks: dict[str, float] = {}
    reference = precompute.Reference

    class Marked(reference):  # the pass's reference, marking when it is loaded and its first batch is done
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sync()
            marks["loaded"] = time.perf_counter()

        def __call__(self, batch):
            out = super().__call__(batch)
            if "first" not in marks:
                sync()
                marks["first"] = time.perf_counter()
            return out

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    precompute.Reference = Marked
    try:
        t0 = time.perf_counter()
        precompute.precompute_reference(shards, cfg)
        sync()
        t1 = time.perf_counter()
    finally:
        precompute.Reference = reference
    counted, flops = data_counts(config, "dpo", lengths, policy=False, reference=True)

    def rates(secs: float) -> dict:
        return {"secs": round(secs, 3), "items_per_s": round(len(lengths) / secs, 2),
                "tokens_per_s": round(counted / secs, 1)}

    loaded = marks.get("loaded")  # none where the shards had this reference's log-probs already
    return {**rates(t1 - t0), "mean_tokens_per_item": round(counted / len(lengths), 1),
            "flops_per_token": flops / counted,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
            "load_s": None if loaded is None else round(loaded - t0, 3),
            "first_batch_s": round(marks["first"] - loaded, 3) if "first" in marks else None,
            "after_load": None if loaded is None else rates(t1 - loaded)}


def item_lengths(table, mode: str) -> list[tuple[int, ...]]:
    """Per item of a shard table: (prompt, chosen, rejected) token counts for DPO, (row length,) for SFT."""
    import pyarrow.compute as pc

    columns = ("prompt_ids", "chosen_ids", "rejected_ids") if mode == "dpo" else ("input_ids",)
    return list(zip(*(pc.list_value_length(table.column(k)).to_numpy().tolist() for k in columns)))


def data_counts(config, mode: str, lengths: list[tuple[int, ...]], policy: bool, reference: bool) -> tuple[int, float]:
    """(tokens the table counts, useful FLOPs) of the items of `lengths`. The tokens counted are the non-pad
    tokens each item forwards in TRL's layout too (prompt+chosen and prompt+rejected for a pair); the FLOPs
    are aligntrain.flops' useful ones, a pair's prompt counted once, for training the policy (`policy`)
    and forwarding the reference (`reference`)."""
    counted, flops = 0, 0.0
    for item in lengths:
        tokens, pairs = item_counts(tuple(item))
        counted += tokens + (item[0] if mode == "dpo" else 0)  # TRL's layout forwards the prompt twice
        flops += training_flops(config, tokens if policy else 0, pairs if policy else 0,
                                tokens if reference else 0, pairs if reference else 0)
    return counted, flops


@dataclass(frozen=True)
class Row:
    """One comparison: our run of `mode` on `shape` at `bs` items a step against TRL's runs `trl` (anchor
    modes: dpo, sft, sft_packed; each at `bs` items a step unless `trl_bs` names another), the reference
    log-probs precomputed on both sides or neither."""
    name: str
    mode: str
    shape: str
    bs: int
    trl: tuple[str, ...]
    precompute: bool = False
    trl_bs: tuple[tuple[str, int], ...] = ()

    def bs_of(self, trl_mode: str) -> int:
        return dict(self.trl_bs).get(trl_mode, self.bs)


# Issue 12's rows: 3x TRL's DPO and SFT throughput on one GPU (SFT against TRL's best). TRL's packed SFT
# counts a step's items as packed sequences of max_length (1,024) tokens, so its 8 (16) a step are
# 8,192 (16,384) tokens: the SFT rows compare at equal tokens per optimizer step, our rows (about 430
# tokens each) at 18 (36) a step, and TRL's padded SFT at the same rows as ours.
SUITES = {"issue12": (
    Row("DPO qwen0.5b, 16 pairs/step", "dpo", "qwen0.5b", 16, ("dpo",)),
    Row("DPO llama1b, 16 pairs/step", "dpo", "llama1b", 16, ("dpo",)),
    Row("SFT qwen0.5b, 18 rows/step (TRL packed: 8 x 1,024 tokens)", "sft", "qwen0.5b", 18, ("sft", "sft_packed"),
        trl_bs=(("sft_packed", 8),)),
    Row("SFT llama1b, 36 rows/step (TRL packed: 16 x 1,024 tokens)", "sft", "llama1b", 36, ("sft", "sft_packed"),
        trl_bs=(("sft_packed", 16),)),
    Row("DPO qwen0.5b, 16 pairs/step, reference precomputed", "dpo", "qwen0.5b", 16, ("dpo",), precompute=True),
)}
TRL_LABEL = {"dpo": "DPO", "sft": "SFT padded", "sft_packed": "SFT packed (bfd)"}


def row_jobs(row: Row, args: argparse.Namespace) -> list[tuple[str, str, Job]]:
    """The processes of `row`: ("ours", name, job) for our run with the repository's defaults (name "") and
    each --also (run_names), then ("trl", mode, job) for each TRL run (none with --skip-trl or without the
    anchor)."""
    shared = ["--shape", row.shape, "--steps", str(args.steps), "--warm", str(args.warm), "--gc", str(args.gc)]
    profiling = (["--profile-step", str(args.profile_step)] if args.profile_step else []) + \
        (["--cprofile-step", str(args.cprofile_step)] if args.cprofile_step else [])
    lora = ["--lora", args.lora] if args.lora else []
    ours_cmd = [sys.executable, __file__, "--child", "--mode", row.mode, "--max-length", str(args.max_length),
                "--bs", str(row.bs), "--cache", args.cache] + shared + lora + profiling + \
        (["--precompute"] if row.precompute else [])
    jobs = []
    for spec, name in zip(["", *args.also], run_names(["", *args.also])):
        jobs.append(("ours", name, Job(ours_cmd + (["--overrides", *spec.split(",")] if spec else []),
                                       f"aligntrain {row.name}" + (f" ({name})" if name else ""), f"ours {row.shape}")))
    if args.skip_trl:
        return jobs
    if not Path(args.anchor).is_file():
        print(f"no anchor at {args.anchor}: pass --anchor PATH or --skip-trl", file=sys.stderr)
        return jobs
    for mode in row.trl:
        script = [str(TRL_LORA), "--anchor", args.anchor] + lora if args.lora else [args.anchor]
        command = [sys.executable, str(GATED_TRL)] + script + ["--mode", mode, "--max_length", str(args.max_length),
                                                             "--bs", str(row.bs_of(mode))] + shared + \
            (["--precompute", "1"] if row.precompute else [])
        # every anchor process of a shape writes the same model directory (/tmp/anchor_model_<shape>)
        jobs.append(("trl", mode, Job(command, f"TRL {row.name} ({mode})", f"trl {row.shape}")))
    return jobs


def run_names(specs: list[str]) -> list[str]:
    """The name of each of our runs in the tables: its --also text, and where that text repeats (runs
    interleaved to compare a setting with itself over time), its occurrence: "x=1", "x=1 #2"."""
    seen: dict[str, int] = {}
    names = []
    for spec in specs:
        seen[spec] = seen.get(spec, 0) + 1
        names.append(spec if seen[spec] == 1 else f"{spec} #{seen[spec]}".strip())
    return names


def measure_rows(rows: list[Row], args: argparse.Namespace, row_done=None) -> list[tuple[dict[str, dict], dict[str, dict]]]:
    """Run every process of `rows` through pipeline.run_jobs (one at a time on the GPU, the next ones
    preparing meanwhile; --overlap 0: one process at a time): per row ({our run's spec: result},
    {TRL mode: result}); a run that failed is left out (its stderr printed). `row_done(number, ours, trl)`
    is called as each row's last process ends."""
    planned = [(number, side, name, job) for number, row in enumerate(rows) for side, name, job in row_jobs(row, args)]
    measured: list[tuple[dict, dict]] = [({}, {}) for _ in rows]
    ended = iter(range(len(planned)))

    def done(outcome: Outcome) -> None:
        position = next(ended)  # outcomes come in the jobs' order
        number, side, name, _ = planned[position]
        result = result_line(outcome.stdout) if side == "ours" else trl_result(args, rows[number], name, outcome.stdout)
        report(outcome, result)
        if result is not None:
            measured[number][0 if side == "ours" else 1][name] = result
        if row_done is not None and all(later[0] != number for later in planned[position + 1:]):
            row_done(number, *measured[number])

    overlap = overlap_for(rows, args.overlap)
    run_jobs([job for *_, job in planned], preparing=max(1, overlap), alive=1 if overlap == 0 else overlap + 2,
             on_done=done)
    return measured


def overlap_for(rows: list[Row], asked: int | None) -> int:
    """--overlap, or by default 2, and 0 where a row's model is large (LARGE_SHAPES): a process waiting for
    its turn holds its models on the GPU (an 8B policy in float32 and its reference: 48 GB), which beside
    a running 8B process would not fit a 80 GB card."""
    if asked is not None:
        return asked
    return 0 if any(row.shape in LARGE_SHAPES for row in rows) else 2


def report(outcome: Outcome, result: dict | None) -> None:
    """Say how a process went as it ends (`result`: its RESULT, None if it printed none): its time in all and
    its parts (the suite's own cost), its rate, or why it failed; our profiles are printed (and taken out of
    the result) here."""
    if result is None:
        print(f"{outcome.job.label} failed (exit {outcome.returncode}):\n{outcome.stderr[-3000:]}", file=sys.stderr, flush=True)
        return
    if "profile" in result:
        print(f"{outcome.job.label}: " + result.pop("profile"), file=sys.stderr, flush=True)
    before = "" if outcome.prepare_s is None else \
        f"prepared {outcome.prepare_s:.1f} s, waited for the GPU {outcome.wait_s:.1f} s"
    parts = "" if "prepare_s" not in result else \
        f"; model and shards {result['prepare_s']} s, load + compile + first step {result['first_step_s']} s"
    pass_ = result.get(PASS)
    if pass_:
        parts += f"; precompute pass {pass_['secs']} s" + ("" if "load_s" not in pass_ else
                                                            f" (loading the reference {pass_['load_s']} s, "
                                                            f"first batch {pass_['first_batch_s']} s)")
    compiled = "" if not result.get("graphs_compiled_timed") else \
        f"; {result['graphs_compiled_timed']} graph(s) compiled during the timed steps"
    collections = f"; garbage collections in the timed steps: {result['gc']}" if result.get("gc") else ""
    print(f"{outcome.job.label}: {outcome.seconds:.1f} s in all ({before}{parts}); {result['items_per_s']} items/s, "
          f"{result['tokens_per_s']:,.0f} tokens/s, peak {result.get('peak_gib')} GiB{compiled}{collections}",
          file=sys.stderr, flush=True)


def mfu_cell(result: dict | None, device: str) -> str:
    """`result`'s MFU in percent: its tokens/s times the useful FLOPs per counted token of its data."""
    if result is None or result.get("flops_per_token") is None:
        return "-"
    share = mfu(result["tokens_per_s"] * result["flops_per_token"], 1.0, device)
    return "-" if share is None else f"{100 * share:.1f}%"


def suite_lines(row: Row, ours: dict[str, dict], trl: dict[str, dict]) -> list[dict]:
    """The table lines of one row: each of our runs against each TRL run, TRL's best (most tokens/s) marked
    where there are several, then the precompute passes (precompute_lines)."""
    best = max(trl, key=lambda m: trl[m]["tokens_per_s"]) if trl else None
    lines = []
    for spec, result in (ours or {"": None}).items():
        for mode in trl or [None]:
            name = row.name + (f" ({spec})" if spec else "")
            if mode is not None and len(row.trl) > 1:
                name += f", vs TRL {TRL_LABEL[mode]}" + (" (TRL's best)" if mode == best else "")
            lines.append({"run": name, "ours": result, "trl": trl.get(mode), "trl_items": mode != "sft_packed"})
    return lines + precompute_lines(row, (ours.get("") or {}).get(PASS),
                                    next((r[PASS] for r in trl.values() if r.get(PASS)), None))


def after_load(pass_: dict | None) -> dict | None:
    """Our precompute pass's result with the rates from its reference loaded in place of the whole pass's
    (timed_precompute's `after_load`); None where it has none."""
    return {**pass_, **pass_["after_load"]} if pass_ and pass_.get("after_load") else None


def precompute_lines(row: Row, ours: dict | None, trl: dict | None) -> list[dict]:
    """The precompute passes of `row` (ours with the repository's defaults, TRL's), where either was timed:
    ours from its reference loaded against TRL's, which loads its reference before its pass (like with
    like), then ours whole, loading the reference included."""
    if not ours and not trl:
        return []
    loaded = after_load(ours)
    against = "as TRL, which loads it before its pass" if trl else "ours; TRL's pass is not timed"
    lines = [{"run": f"{row.name}: the precompute pass, loading the reference left out ({against})",
              "ours": loaded, "trl": trl, "trl_items": True}]
    if ours:
        load = "" if ours.get("load_s") is None else f": {ours['load_s']:.1f} s of {ours['secs']:.1f} s"
        lines.append({"run": f"{row.name}: our precompute pass whole, loading the reference included{load}",
                      "ours": ours, "trl": None, "trl_items": False})
    return lines


def suite_table(lines: list[dict], device: str) -> str:
    """Markdown table of `suite_lines`: items/s, the tokens/s ratio, tokens/s, MFU and peak GiB of each side."""
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    out = ["| run | ours items/s | TRL items/s | ratio | ours tokens/s | TRL tokens/s | MFU ours | MFU TRL | "
           "peak GiB ours/TRL |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for line in lines:
        ours, trl = line["ours"] or {}, line["trl"] or {}
        ratio = ours["tokens_per_s"] / trl["tokens_per_s"] if ours and trl else None
        out.append(f"| {line['run']} | {num(ours.get('items_per_s'), '.2f')} | "
                   f"{num(trl.get('items_per_s') if line['trl_items'] else None, '.2f')} | {num(ratio, '.2f')}"
                   f"{'x' if ratio is not None else ''} | {num(ours.get('tokens_per_s'), ',.0f')} | "
                   f"{num(trl.get('tokens_per_s'), ',.0f')} | {mfu_cell(line['ours'], device)} | "
                   f"{mfu_cell(line['trl'], device)} | {num(ours.get('peak_gib'), '')}/{num(trl.get('peak_gib'), '')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), help="every row of the suite in one call (--mode, --shape "
                    "and --bs are the suite's; default --steps 12 --warm 4)")
    ap.add_argument("--shape-override", choices=sorted(SHAPES), help="run every suite row on this shape (tiny: on CPU)")
    ap.add_argument("--only", default=None, metavar="N[,N]", help="only these rows of the suite (from 1, in its order)")
    ap.add_argument("--mode", default="dpo", choices=["dpo", "sft"])
    ap.add_argument("--shape", default="qwen0.5b", choices=sorted(SHAPES))
    ap.add_argument("--bs", type=int, default=16, help="pairs (dpo) or rows (sft) per optimizer step")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20; 12 with --suite)")
    ap.add_argument("--warm", type=int, default=None, help="first steps not timed (default 5; 4 with --suite)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--gc", type=int, default=0, help="activation checkpointing, both sides")
    ap.add_argument("--precompute", action="store_true",
                    help="DPO with reference log-probs precomputed, both sides (each side's pass timed on its own)")
    ap.add_argument("--lora", default=None, metavar="SPEC",
                    help="LoRA on both sides, e.g. r=16,alpha=32,targets=all-linear (targets: q_proj+v_proj, ...)")
    ap.add_argument("--also", action="append", default=[], metavar="K=V[,K=V]",
                    help="one more aligntrain run with these config overrides (repeatable), e.g. model.cudnn_attention=false; "
                         "inductor.NAME=VALUE sets torch._inductor.config.NAME in that run, aligntrain.MODULE.NAME=VALUE a "
                         "module attribute (aligntrain.compiling.FUSE_LINEARS=false)")
    ap.add_argument("--profile-step", type=int, default=None, metavar="N",
                    help="profile our step N (after --warm; its time is left out of the rate): phases and top kernels")
    ap.add_argument("--cprofile-step", type=int, default=None, metavar="N",
                    help="profile our step N's host (Python) time under cProfile (not timed either)")
    ap.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)  # models and shards shared by our runs
    ap.add_argument("--anchor", default=str(ANCHOR), help="path of trl_anchor.py")
    ap.add_argument("--overlap", type=int, default=None, metavar="N",
                    help="processes preparing on the host while one runs on the GPU (pipeline.py; their work "
                         "stops during its timed steps); 0: one process at a time (default 2; 0 for llama8b)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (12 if args.suite else 20)
    args.warm = args.warm or (4 if args.suite else 5)
    if args.warm < 1 or args.warm >= args.steps:
        ap.error("--warm must be at least 1 and below --steps")
    for flag, value in (("--profile-step", args.profile_step), ("--cprofile-step", args.cprofile_step)):
        if value is not None and not args.warm < value <= args.steps:
            ap.error(f"{flag} must be a timed step: above --warm, at most --steps")
    if args.profile_step is not None and args.profile_step == args.cprofile_step:
        ap.error("--profile-step and --cprofile-step must be different steps")
    if args.lora:
        parse_lora(args.lora)  # refuse a bad spec before anything runs
    if args.overlap is not None and args.overlap < 0:
        ap.error(f"--overlap must be 0 or more, got {args.overlap}")
    for spec in args.also:
        for item in spec.split(","):
            problem = setting_problem(item)
            if problem:
                ap.error(f"--also {spec}: {problem}")
    if args.child:
        print("RESULT " + json.dumps(run_ours(args)), flush=True)
        return
    if args.lora and (args.suite or args.mode != "dpo" or args.precompute) and not args.skip_trl:
        ap.error("--lora compares DPO without precomputed reference only (trl_lora.py runs TRL's DPOTrainer); "
                 "add --skip-trl for the others")
    if args.precompute and args.mode != "dpo":
        ap.error("--precompute is for --mode dpo")
    if args.only and not (args.suite and all(n.isdigit() and 1 <= int(n) <= len(SUITES[args.suite])
                                             for n in args.only.split(","))):
        ap.error(f"--only takes row numbers of --suite, from 1 to {len(SUITES[args.suite or 'issue12'])}")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-train-cache-") as cache:
        args.cache = cache
        if args.suite:
            run_suite(args, device)
        else:
            run_single(args, device)
    print(f"\n{time.perf_counter() - started:.0f} s for the whole command")


def run_suite(args: argparse.Namespace, device: str) -> None:
    suite = SUITES[args.suite]
    picked = [int(n) for n in args.only.split(",")] if args.only else range(1, len(suite) + 1)
    rows = [replace(suite[n - 1], shape=args.shape_override or suite[n - 1].shape) for n in picked]
    print("running " + "; ".join(f"{row.name} ({row.shape})" for row in rows), file=sys.stderr, flush=True)

    def row_done(number: int, ours: dict, trl: dict) -> None:  # kept should a time limit stop the call
        print(suite_table(suite_lines(rows[number], ours, trl), device), file=sys.stderr, flush=True)

    lines = [line for row, measured in zip(rows, measure_rows(rows, args, row_done)) for line in suite_lines(row, *measured)]
    print(f"\nsuite {args.suite}, {args.steps} steps a run ({args.warm} not timed), max_length {args.max_length}, "
          f"activation checkpointing {'on' if args.gc else 'off'}{', LoRA ' + args.lora if args.lora else ''}, {device}"
          f"{', every shape ' + args.shape_override if args.shape_override else ''}\n")
    print(suite_table(lines, device))


def run_single(args: argparse.Namespace, device: str) -> None:
    what = args.mode + (" LoRA" if args.lora else "") + (", reference precomputed" if args.precompute else "")
    row = Row(what, args.mode, args.shape, args.bs, (args.mode,), args.precompute)
    [(ours, trl)] = measure_rows([row], args)
    results = {f"aligntrain {what}" + (f" ({spec})" if spec else ""): r for spec, r in ours.items()}
    passes = {}  # the precompute passes, compared like with like: ours from its reference loaded, TRL's
    pass_ = (ours.get("") or {}).get(PASS)
    if after_load(pass_):
        passes["aligntrain precompute pass, loading the reference left out"] = after_load(pass_)
    if pass_:
        passes["aligntrain precompute pass whole (loading the reference included)"] = pass_
    for r in trl.values():
        if r.get(PASS):
            passes["TRL 1.16 precompute pass (its reference loaded before)"] = r[PASS]
    results.update(passes)
    results.update({f"TRL 1.16 {what}": r for r in trl.values()})
    print(f"\n{what}, shape {args.shape}, {args.bs} per step, {args.steps} steps ({args.warm} not timed), "
          f"max_length {args.max_length}, activation checkpointing {'on' if args.gc else 'off'}, {device}\n")
    print("| run | items/s | tokens/s | mean tokens/item | MFU | peak GiB | timed s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['items_per_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['mean_tokens_per_item']:.0f} | "
              f"{mfu_cell(r, device)} | "
              f"{r.get('peak_gib') if r.get('peak_gib') is not None else '-'} | {r['secs']:.2f} |")
    for r in trl.values():
        for name, mine in results.items():
            if name.startswith("aligntrain") and name not in passes:
                print(f"{name} / TRL: {mine['tokens_per_s'] / r['tokens_per_s']:.2f}x tokens/s, "
                      f"{mine['items_per_s'] / r['items_per_s']:.2f}x items/s")
        mine = passes.get("aligntrain precompute pass, loading the reference left out")
        if mine and r.get(PASS):
            print(f"aligntrain precompute pass, loading the reference left out / TRL's pass: "
                  f"{mine['tokens_per_s'] / r[PASS]['tokens_per_s']:.2f}x tokens/s, "
                  f"{mine['items_per_s'] / r[PASS]['items_per_s']:.2f}x items/s")


if __name__ == "__main__":
    main()
