"""Conversion throughput: aligndata convert --to dpo vs TRL 1.16's DPO tokenization vs raw encode_batch.

All run in this one invocation on the same generated preference data (messages cut from real
dialogue text, see word_source) and the same real tokenizer, single-threaded tokenizers
(TOKENIZERS_PARALLELISM=false) so "one process" means one core:

  ours-1p   aligndata.write.convert.convert(num_proc=1): read + validate + render + tokenize + write shards
  ours-2p   the same with num_proc=2
  library   ours-1p with --no-fast-tokenize: every text through the tokenizers library, no piece cache
  trl       from the same JSONL file: datasets.load_dataset("json") into a fresh cache, then
            DPOTrainer._prepare_dataset from TRL 1.16 (3 chat-template renderings + tokenizations
            per row, through datasets.map); the JSON loading share is printed separately
  raw       tokenizers' encode_batch on the two pre-rendered full texts of each row (prompt+chosen,
            prompt+rejected): what tokenizing each row's two conversations with the library costs

TRL is installed only for this benchmark, into a separate --target directory, and runs in a
subprocess. Usage:

  python benchmarks/bench_convert.py [--rows 12000] [--repeats 3] [--tokenizer DIR] [--trl-site DIR]

Targets (issue 3): ours-1p >= 2.5x trl; ours-1p >= 85% of raw; ours-2p >= 1.8x ours-1p.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from childrun import child_result

os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "qwen2.5"
HH_RLHF = REPO.parent / "shared" / "data" / "hh-rlhf"


def word_source(seed: int = 0) -> tuple[list[str], str]:
    """Running text to cut messages from: the words of real dialogues (the HH-RLHF test splits in
    ../shared/data, curly quotes, typos, numbers and all) or, where those are absent, a synthetic text
    with a Zipf-distributed vocabulary of 30,000 made-up words and punctuation."""
    files = sorted(HH_RLHF.glob("*-test.jsonl.gz")) if HH_RLHF.is_dir() else []
    if files:
        import gzip

        words: list[str] = []
        for path in files:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line)["chosen"]
                    words += text.replace("\n\nHuman:", " ").replace("\n\nAssistant:", " ").split()
        return words, f"words of {', '.join(p.name for p in files)}"
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ou", "ea")]
    vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.choice((1, 1, 2, 2, 3, 4)))) for _ in range(40_000)})
    rng.shuffle(vocab)
    vocab = vocab[:30_000]
    weights = [1 / (rank + 1) for rank in range(len(vocab))]
    words = rng.choices(vocab, weights, k=600_000)
    for i in range(0, len(words), 11):
        words[i] += rng.choice(".,?!:;")
    return words, "a synthetic Zipf text (30,000 made-up words; ../shared/data/hh-rlhf is absent)"


def lognormal_words(rng: random.Random, words: list[str], median: int, sigma: float = 0.6, lo: int = 5,
                    hi: int = 700) -> str:
    """A run of about `median` consecutive words (log-normal length) from a random place in `words`."""
    n = int(min(hi, max(lo, rng.lognormvariate(0, sigma) * median)))
    start = rng.randrange(len(words) - n)
    return " ".join(words[start:start + n])


def generate(path: Path, rows: int, seed: int = 0) -> str:
    """Multi-turn preference pairs: 0-2 earlier exchanges, prompts ~90 words, replies ~160 words (medians).
    Returns where the text came from."""
    rng = random.Random(seed)
    words, origin = word_source(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            prompt = []
            if rng.random() < 0.3:
                prompt.append({"role": "system", "content": lognormal_words(rng, words, 15)})
            for _ in range(rng.choice((0, 0, 1, 2))):
                prompt.append({"role": "user", "content": lognormal_words(rng, words, 40)})
                prompt.append({"role": "assistant", "content": lognormal_words(rng, words, 80)})
            prompt.append({"role": "user", "content": lognormal_words(rng, words, 60)})
            pair = {"prompt": prompt,
                    "chosen": [{"role": "assistant", "content": lognormal_words(rng, words, 160)}],
                    "rejected": [{"role": "assistant", "content": lognormal_words(rng, words, 140)}]}
            f.write(json.dumps(pair) + "\n")
    return origin


def time_ours(data: Path, tokenizer: str, num_proc: int, workdir: Path, fast_tokenize: bool = True) -> dict:
    from aligndata.write.convert import convert

    out = workdir / f"ours-{num_proc}p{'' if fast_tokenize else '-library'}"
    t0 = time.perf_counter()
    result = convert([str(data)], out, "dpo", tokenizer, num_proc=num_proc, overwrite=True,
                     fast_tokenize=fast_tokenize)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "rows": result.manifest["counts"]["kept"],
            "tokens": result.manifest["splits"]["train"]["tokens"]}


def time_raw(data: Path, tokenizer: str) -> dict:
    from aligndata.encode.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    texts = []
    with open(data, encoding="utf-8") as f:
        for line in f:
            pair = json.loads(line)
            for side in ("chosen", "rejected"):
                texts.append(tok.apply_chat_template(pair["prompt"] + pair[side], tokenize=False))
    backend = tok._tokenizer
    t0 = time.perf_counter()
    n_tokens = 0
    for i in range(0, len(texts), 1000):
        n_tokens += sum(len(e.ids) for e in backend.encode_batch(texts[i:i + 1000], add_special_tokens=False))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "rows": len(texts) // 2, "tokens": n_tokens}


TRL_CHILD = r"""
import json, os, sys, time, types
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import datasets
datasets.disable_progress_bars()
from transformers import AutoTokenizer
import trl
from trl.trainer.dpo_trainer import DPOTrainer
data, tokenizer = sys.argv[1], sys.argv[2]
import tempfile
tok = AutoTokenizer.from_pretrained(tokenizer)
args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
stub = types.SimpleNamespace(_tokenizer=tok)
# From the same JSONL file as ours: datasets' JSON loader (into a fresh cache, as a first run would),
# then TRL's own preparation. The tokenizer is loaded before the clock starts.
with tempfile.TemporaryDirectory() as cache:
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache)
    loaded = time.perf_counter() - t0
    out = DPOTrainer._prepare_dataset(stub, ds, tok, args, "train")
    dt = time.perf_counter() - t0
tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(out["prompt_ids"], out["chosen_ids"], out["rejected_ids"]))
print("RESULT " + json.dumps({"seconds": dt, "load_seconds": loaded, "rows": len(out), "tokens": tokens, "trl": trl.__version__}))
"""


def time_trl(data: Path, tokenizer: str, site: Path) -> dict | None:
    if not (site / "trl").is_dir():
        print(f"installing trl==1.16.0 into {site} (benchmark only)", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                            "trl==1.16.0"], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"could not install trl: {r.stderr.strip()[-500:]}", file=sys.stderr)
            return None
    env = dict(os.environ, PYTHONPATH=str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return child_result([sys.executable, "-c", TRL_CHILD, str(data), tokenizer], "trl run", env)


def _child(kind: str, data: Path, tokenizer: str, workdir: Path) -> None:
    """One measurement in this (fresh) process; prints RESULT {json}.

    Libraries are imported before the clock starts, as the TRL child does: the runs time work on the
    data (ours includes loading the tokenizer and writing the shards), not interpreter start-up."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import aligndata.write.convert  # noqa: F401
    import aligndata.encode.tokenizer  # noqa: F401
    import aligndata.encode.encoder  # noqa: F401
    # Load the tokenizer once before the clock, as the TRL child does: that imports the transformers
    # modules it needs. Ours still loads it again inside the timed convert() (about 0.3 s for Qwen2.5).
    aligndata.encode.tokenizer.load_tokenizer(tokenizer)
    if kind == "raw":
        r = time_raw(data, tokenizer)
    elif kind == "library-1p":
        r = time_ours(data, tokenizer, 1, workdir, fast_tokenize=False)
    else:
        r = time_ours(data, tokenizer, int(kind[-2]), workdir)
    print("RESULT " + json.dumps(r))


SPIN = r"""
import sys, time
t0 = time.perf_counter()
d = {}
for i in range(int(sys.argv[1])):
    d[i & 65535] = i * 3
print(time.perf_counter() - t0)
"""


def time_ceiling(loops: int = 12_000_000) -> dict:
    """What this machine allows 2 processes: a pure-Python busy loop alone, then two copies at once.
    2 x alone / slower-of-the-two is the speed-up two fully parallel processes would get (2.0 on two
    idle cores of their own; less where the cores are shared, throttled or hyper-threads)."""
    def run(copies: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", SPIN, str(loops)], stdout=subprocess.PIPE, text=True)
                 for _ in range(copies)]
        return max(float(p.communicate()[0]) for p in procs)
    alone, together = run(1), run(2)
    return {"alone": alone, "together": together, "ceiling": 2 * alone / together}


def _measure(kind: str, data: Path, tokenizer: str, workdir: Path) -> dict | None:
    return child_result([sys.executable, __file__, "--child", kind, "--tokenizer", tokenizer, "--workdir", str(workdir)],
                        kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--repeats", type=int, default=3, help="each run this many times, interleaved; the best counts")
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--trl-site", default=str(Path(tempfile.gettempdir()) / "aligntools-bench-trl"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--runs", default="raw,ours-1p,ours-2p,library-1p",
                    help="which of raw, ours-1p, ours-2p, library-1p to run (comma-separated)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "pairs.jsonl"
    if args.child:
        _child(args.child, data, args.tokenizer, work)
        return
    unknown = set(args.runs.split(",")) - {"raw", "ours-1p", "ours-2p", "library-1p"}
    if unknown:
        ap.error(f"--runs: unknown run(s) {', '.join(sorted(unknown))}; choose from raw, ours-1p, ours-2p, library-1p")
    origin = generate(data, args.rows)
    names = {"raw": "raw encode_batch", "ours-1p": "ours, 1 process", "ours-2p": "ours, 2 processes",
             "library-1p": "ours, 1 process, --no-fast-tokenize"}
    runs: dict[str, list[dict]] = {}
    ceilings: list[dict] = []
    for _ in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits every run alike
        for kind, name in names.items():
            if kind not in args.runs.split(","):
                continue
            r = _measure(kind, data, args.tokenizer, work)
            if r is not None:
                runs.setdefault(name, []).append(r)
        if "ours-2p" in args.runs.split(","):
            ceilings.append(time_ceiling())
        if not args.skip_trl:
            trl = time_trl(data, args.tokenizer, Path(args.trl_site))
            if trl is not None:
                runs.setdefault(f"TRL {trl.pop('trl')} DPO tokenization", []).append(trl)
    results = {name: min(rs, key=lambda r: r["seconds"]) for name, rs in runs.items()}

    print(f"\n{args.rows} multi-turn preference rows cut from {origin}, tokenizer {args.tokenizer}, {os.cpu_count()} CPU cores, "
          f"TOKENIZERS_PARALLELISM=false, best of {args.repeats} interleaved runs, each in a fresh process\n")
    print("| run | seconds (best) | all runs | rows/s | tokens/s |")
    print("|---|---:|---|---:|---:|")
    for name, r in results.items():
        every = ", ".join(f"{x['seconds']:.1f}" for x in runs[name])
        label = f"{name} (JSON loading {r['load_seconds']:.2f} s)" if "load_seconds" in r else name
        print(f"| {label} | {r['seconds']:.2f} | {every} | {r['rows'] / r['seconds']:.0f} | {r['tokens'] / r['seconds']:.0f} |")
    rate = {k: v["rows"] / v["seconds"] for k, v in results.items()}
    ours1, ours2, raw, library = (rate.get(names[k]) for k in ("ours-1p", "ours-2p", "raw", "library-1p"))
    print()
    trl_key = next((k for k in rate if k.startswith("TRL")), None)
    if trl_key and ours1:
        print(f"ours-1p / TRL        = {ours1 / rate[trl_key]:.2f}x   (target >= 2.5x)")
    if raw and ours1:
        print(f"ours-1p / raw encode = {ours1 / raw:.2%}   (target >= 85%)")
    if ours1 and ours2:
        print(f"ours-2p / ours-1p    = {ours2 / ours1:.2f}x   (target >= 1.8x)")
        one, two = runs[names["ours-1p"]], runs[names["ours-2p"]]
        if len(one) == len(two) > 1:
            rounds = sorted(a["seconds"] / b["seconds"] for a, b in zip(one, two))
            print(f"  within each round: {', '.join(f'{r:.2f}x' for r in rounds)} (median {rounds[len(rounds) // 2]:.2f}x)")
    if ceilings:
        ceiling = sorted(c["ceiling"] for c in ceilings)[len(ceilings) // 2]
        print(f"2-process ceiling    = {ceiling:.2f}x median   (a busy loop alone vs two at once: "
              + ", ".join(f"{c['alone']:.2f}/{c['together']:.2f} s" for c in ceilings) + ")")
    if ours1 and library:
        print(f"piece cache speed-up = {ours1 / library:.2f}x   (ours-1p vs --no-fast-tokenize)")


if __name__ == "__main__":
    main()
