"""How fast does `aligndata` validate, and how much memory does it need?

Default mode: generate N multi-turn records (one format per file), then time three ways of
reading them, each in a fresh child process so that its peak RSS is its own:

  anchor        json.loads of every line + one Draft 2020-12 jsonschema validator: the floor any
                schema-checking tool pays (no semantic rules, no line tracking, no reports)
  anchor (rs)   the same with jsonschema-rs, the compiled validator FileCheck asks first; the
                gap between it and FileCheck is the cost of our adapters, rules and reports
  FileCheck     aligndata with --format given: reader + schema + adapter + semantic rules
  FileCheck     aligndata with --format auto: the format taken from the first record, every record's
                shape checked against it on the way (a mixed file alone is read a second time)
  (auto)

`--array-gb G` mode: stream a ~G GB JSON array to disk (never held in memory) and run
`aligndata validate` on it in a subprocess, reporting the child's wall time and peak RSS.

    python benchmarks/bench_validate.py                       # 200,000 records, openai JSONL
    python benchmarks/bench_validate.py --records 20000 --format sharegpt
    python benchmarks/bench_validate.py --array-gb 2 --workdir /var/tmp/bench
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FORMATS = ("openai", "sharegpt", "openai-preference")

# Plain words for filler text; the validator never looks at meaning, only at lengths and shapes.
WORDS = """
the a of to and in is it you that he was for on are with as his they be at one have this from or
had by hot word but what some we can out other were all there when up use your how said an each she
which do their time if will way about many then them write would like so these her long make thing see
him two has look more day could go come did number sound no most people my over know water than call
first who may down side been now find any new work part take get place made live where after back
little only round man year came show every good me give our under name very through just form sentence
great think say help low line differ turn cause much mean before move right boy old too same tell does
set three want air well also play small end put home read hand port large spell add even land here must
big high such follow act why ask men change went light kind off need house picture try us again animal
point mother world near build self earth father head stand own page should country found answer school
grow study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
""".split()


# -- data generation ---------------------------------------------------------------------------

def text_pool(rng: random.Random, size: int = 4096) -> list[str]:
    """Turn texts of 20-200 words in sentences; records draw from this pool to keep generation quick."""
    pool = []
    for _ in range(size):
        words = rng.choices(WORDS, k=rng.randint(20, 200))
        sentences, i = [], 0
        while i < len(words):
            n = rng.randint(6, 18)
            chunk = words[i:i + n]
            sentences.append(chunk[0].capitalize() + " " + " ".join(chunk[1:]) + rng.choice(".?!."))
            i += n
        pool.append(" ".join(sentences))
    return pool


def make_record(fmt: str, rng: random.Random, pool: list[str], invalid: bool) -> Any:
    """One record of 4-10 turns (user/assistant alternating, sometimes a system prompt first).

    `invalid` records break one semantic rule (the schema still passes), so the error path runs too.
    """
    turns = rng.choice((4, 6, 8, 10))
    texts = [rng.choice(pool) for _ in range(turns)]
    system = rng.choice(pool)[:300] if rng.random() < 0.3 else None
    if invalid:
        texts[rng.randrange(turns)] = "   "  # empty-content rule
    if fmt == "sharegpt":
        conv = [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]
        return {"conversations": conv, **({"system": system} if system else {})}
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]
    if fmt == "openai":
        return {"messages": msgs}
    # openai-preference: the last assistant turn becomes chosen; rejected is another pool text.
    return {"prompt": msgs[:-1], "chosen": [msgs[-1]], "rejected": [{"role": "assistant", "content": rng.choice(pool)}]}


def generate_jsonl(path: Path, fmt: str, records: int, invalid_share: float, seed: int) -> int:
    rng = random.Random(seed)
    pool = text_pool(rng)
    invalid = 0
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as f:
        for _ in range(records):
            bad = rng.random() < invalid_share
            invalid += bad
            f.write(json.dumps(make_record(fmt, rng, pool, bad), ensure_ascii=False))
            f.write("\n")
    return invalid


def generate_array(path: Path, fmt: str, target_bytes: int, seed: int) -> int:
    """A JSON array of valid records, written record by record until the file reaches target_bytes."""
    rng = random.Random(seed)
    pool = text_pool(rng)
    written = n = 0
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as f:
        f.write("[\n")
        while written < target_bytes:
            line = ("" if n == 0 else ",\n") + json.dumps(make_record(fmt, rng, pool, False), ensure_ascii=False)
            f.write(line)
            written += len(line.encode("utf-8"))
            n += 1
        f.write("\n]\n")
    return n


# -- measured phases (each runs in its own child process) ----------------------------------------

def _anchor(path: str, is_valid) -> dict:
    """json.loads per line plus a schema check, nothing else: what any schema validation costs."""
    records = invalid = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            records += 1
            invalid += not is_valid(json.loads(line))
    return {"records": records, "invalid": invalid}


def phase_anchor(path: str, fmt: str) -> dict:
    from aligndata.read.formats import FORMATS

    return _anchor(path, FORMATS[fmt].validator.is_valid)  # Python jsonschema, Draft 2020-12


def phase_anchor_rs(path: str, fmt: str) -> dict:
    from aligndata.read.formats import FORMATS

    return _anchor(path, FORMATS[fmt].is_valid)  # the compiled jsonschema-rs check FileCheck asks first


def phase_filecheck(path: str, fmt: str) -> dict:
    from aligndata.read.validate import FileCheck

    records = invalid = 0
    for checked in FileCheck(path, fmt).records():
        records += 1
        invalid += not checked.ok
    return {"records": records, "invalid": invalid}


PHASES = {
    "anchor": ("anchor: json.loads + jsonschema", phase_anchor, None),
    "anchor-rs": ("anchor: json.loads + jsonschema-rs", phase_anchor_rs, None),
    "given": ("aligndata FileCheck, --format given", phase_filecheck, None),
    "auto": ("aligndata FileCheck, --format auto", phase_filecheck, "auto"),
}


def measure_child(cmd: list[str]) -> tuple[str, int, float, float]:
    """Run a command; (stdout+stderr, exit code, wall seconds, peak RSS MB of that child alone).

    The rusage of os.wait4 is the child's own `ru_maxrss` (what resource.getrusage(RUSAGE_CHILDREN)
    reports, but not mixed with earlier children).
    """
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return output, proc.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024  # Linux: KiB


def run_phase_in_child(name: str, path: Path, fmt: str) -> dict:
    """Run one phase in a fresh interpreter, so its peak RSS is its own."""
    output, code, wall, peak = measure_child([sys.executable, __file__, "--phase", name, "--file", str(path),
                                              "--format", fmt])
    if code != 0:
        raise SystemExit(f"phase {name} failed with exit code {code}:\n{output}")
    return {**json.loads(output), "wall_s": wall, "peak_rss_mb": peak}


# -- reporting -----------------------------------------------------------------------------------

def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def run_records_benchmark(args: argparse.Namespace, workdir: Path) -> None:
    path = workdir / f"bench-{args.format}-{args.records}.jsonl"
    t0 = time.perf_counter()
    planted = generate_jsonl(path, args.format, args.records, args.invalid_share, args.seed)
    size_mb = path.stat().st_size / 1e6
    print(f"generated {args.records:,} {args.format} records ({planted} with a planted rule violation), "
          f"{size_mb:,.1f} MB in {time.perf_counter() - t0:.1f} s: {path}")
    results = {}
    for key in ("anchor", "anchor-rs", "given", "auto"):
        if key == "anchor-rs" and importlib.util.find_spec("jsonschema_rs") is None:
            continue
        label, _, _ = PHASES[key]
        results[key] = run_phase_in_child(key, path, args.format)
        print(f"  {label}: {results[key]['wall_s']:.1f} s", flush=True)
    anchors = [k for k in ("anchor", "anchor-rs") if k in results]
    rows = []
    for key, r in results.items():
        s = r["wall_s"]
        rows.append([PHASES[key][0], f"{r['records']:,}", f"{r['invalid']:,}", f"{size_mb:,.0f}", f"{s:.1f}",
                     f"{r['records'] / s:,.0f}", f"{size_mb / s:.1f}", f"{r['peak_rss_mb']:.0f}"]
                    + [f"{s / results[a]['wall_s']:.2f}x" for a in anchors])
    print()
    print_table(rows, ["run", "records", "invalid", "MB", "seconds", "records/s", "MB/s", "peak RSS MB"]
                + [f"time vs {PHASES[a][0].split(' + ')[1]}" for a in anchors])
    if not args.keep:
        path.unlink()


def run_array_benchmark(args: argparse.Namespace, workdir: Path) -> None:
    path = workdir / f"bench-{args.format}-{args.array_gb:g}gb.json"
    t0 = time.perf_counter()
    n = generate_array(path, args.format, int(args.array_gb * 1e9), args.seed)
    size_mb = path.stat().st_size / 1e6
    print(f"generated a JSON array of {n:,} {args.format} records, {size_mb:,.0f} MB in "
          f"{time.perf_counter() - t0:.0f} s: {path}", flush=True)
    aligndata = Path(sys.executable).with_name("aligndata")
    cmd = [str(aligndata) if aligndata.exists() else "aligndata", "validate", str(path), "--quiet", "--max-errors", "5"]
    output, code, wall, peak = measure_child(cmd)
    print(output.rstrip())
    print()
    print_table([[f"aligndata validate {path.name}", f"{n:,}", f"{size_mb:,.0f}", f"{wall:.0f}",
                  f"{n / wall:,.0f}", f"{size_mb / wall:.1f}", f"{peak:.0f}", str(code)]],
                ["run", "records", "MB", "seconds", "records/s", "MB/s", "peak RSS MB", "exit"])
    if not args.keep:
        path.unlink()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000, help="records to generate (default 200,000)")
    ap.add_argument("--format", choices=FORMATS, default="openai", help="format of the generated file")
    ap.add_argument("--invalid-share", type=float, default=0.01,
                    help="share of records with a planted empty-content violation (default 0.01)")
    ap.add_argument("--array-gb", type=float, default=None,
                    help="instead: write a JSON array of about this many GB and run `aligndata validate` on it")
    ap.add_argument("--workdir", type=Path, default=None, help="where the generated file goes (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated file (with --workdir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phase", choices=tuple(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.phase:  # child process: measure one phase, print its counts as JSON
        _, fn, fmt_override = PHASES[args.phase]
        print(json.dumps(fn(args.file, fmt_override or args.format)))
        return

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    run = run_records_benchmark if args.array_gb is None else run_array_benchmark
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="aligndata-bench-") as tmp:
            run(args, Path(tmp))


if __name__ == "__main__":
    main()
