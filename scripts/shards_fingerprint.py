"""Fingerprint what `aligndata convert` writes for the real datasets in ../shared/data.

Refactors of aligndata must not change a byte of its output. Run this before and after:

    python scripts/shards_fingerprint.py --save before.json      # on the old code
    python scripts/shards_fingerprint.py --compare before.json   # on the new code

Every case converts one real file with one tokenizer and one set of options (SFT and DPO,
drop and truncate, one and two processes, skip mode with rejects, the canonical JSONL
targets, a failing run) and records the sha256 of every file written, the exit code and
the command's output. Paths of the temporary directory are replaced by a placeholder so
two runs compare equal. Cases whose input or tokenizer is missing are skipped and named.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
TOK = DATA / "tokenizers"
LF = DATA / "llamafactory"

# (name, input files, arguments). Tokenizer paths are relative to TOK.
CASES: list[tuple[str, list[Path], list[str]]] = []


def _add(name, files, *args):
    CASES.append((name, files, list(args)))


for tok in ("qwen2.5", "phi-3-mini", "gpt-neox-20b", "minimind"):
    # GPT-NeoX ships no chat template, and ChatML's markers are not tokens of its vocabulary, which the
    # built-in refuses: it gets the ChatML text as a template file, which is taken as written.
    template = ("--chat-template", "{chatml}") if tok == "gpt-neox-20b" else ()
    _add(f"dpo_en-{tok}", [LF / "dpo_en_demo.json"], *template, "--to", "dpo", "-t", tok,
         "--max-length", "512", "--eval-fraction", "0.1")
    _add(f"glaive_en-{tok}", [LF / "glaive_toolcall_en_demo.json"], *template, "--to", "sft", "-t", tok,
         "--max-length", "1024")
    _add(f"fastchat-{tok}", [DATA / "fastchat" / "dummy_conversation.json"], *template, "--to", "sft",
         "-t", tok, "--max-length", "256", "--length-policy", "truncate", "--train-on", "last")
    _add(f"hh-{tok}", [DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"], *template, "--to", "dpo", "-t", tok,
         "--max-length", "384", "--max-prompt-length", "256", "--length-policy", "truncate",
         "--on-error", "skip")

_add("dpo_zh-qwen-2proc", [LF / "dpo_zh_demo.json"], "--to", "dpo", "-t", "qwen2.5",
     "--max-length", "1024", "--num-proc", "2", "--shard-rows", "100")
_add("glaive_zh-qwen-skip", [LF / "glaive_toolcall_zh_demo.json"], "--to", "sft", "-t", "qwen2.5",
     "--max-length", "2048", "--on-error", "skip")
_add("glaive_zh-qwen-fail", [LF / "glaive_toolcall_zh_demo.json"], "--to", "sft", "-t", "qwen2.5",
     "--max-length", "2048")
_add("helpful-neox-nofast", [DATA / "hh-rlhf" / "helpful-base-test.jsonl.gz"], "--to", "dpo",
     "--chat-template", "{chatml}",
     "-t", "gpt-neox-20b", "--max-length", "512", "--on-error", "skip", "--no-fast-tokenize",
     "--eval-file", str(LF / "dpo_en_demo.json"))
_add("xtuner-qwen-chatml", [DATA / "xtuner" / "mllm_sft_text_example_data.jsonl"], "--to", "sft",
     "-t", "qwen2.5", "--max-length", "1024", "--chat-template", "chatml", "--eval-fraction", "0.2",
     "--seed", "3")
_add("xtuner-openai-sft-neox", [DATA / "xtuner" / "openai_sft.jsonl"], "--to", "sft",
     "-t", "gpt-neox-20b", "--max-length", "512", "--chat-template", "hh")
_add("neox-no-template", [LF / "dpo_en_demo.json"], "--to", "dpo", "-t", "gpt-neox-20b")
_add("pref-xtuner-dpo", [DATA / "xtuner" / "preference_data_doc_excerpt.jsonl"], "--to", "dpo",
     "-t", "qwen2.5", "--max-length", "1024")
_add("to-openai", [DATA / "fastchat" / "dummy_conversation.json", LF / "kto_en_demo.json"],
     "--to", "openai")
_add("to-preference-skip", [DATA / "hh-rlhf" / "helpful-base-test.jsonl.gz"], "--to", "preference",
     "--on-error", "skip")
_add("cookbook-openai-skip", [DATA / "openai-cookbook" / "toy_chat_fine_tuning.jsonl"],
     "--to", "openai", "--on-error", "skip")


def chatml_file(work: Path) -> Path:
    """The built-in ChatML template as a file (where the code being fingerprinted keeps it)."""
    path = work / "chatml.jinja"
    if not path.exists():
        package = Path(__import__("aligndata").__file__).parent
        found = [p for p in (package / "encode" / "builtin_templates" / "chatml.jinja",
                             package / "builtin_templates" / "chatml.jinja") if p.exists()]
        path.write_text(found[0].read_text(encoding="utf-8"), encoding="utf-8")
    return path


def run_case(name, files, args, work: Path) -> dict:
    args = [str(chatml_file(work)) if a == "{chatml}" else a for a in args]
    missing = [str(f) for f in files if not f.exists()]
    if "-t" in args:
        tok = TOK / args[args.index("-t") + 1]
        args = list(args)
        args[args.index("-t") + 1] = str(tok)
        if not tok.exists():
            missing.append(str(tok))
    if missing:
        return {"skipped": missing}
    task = args[args.index("--to") + 1]
    out = work / name / ("shards" if task in ("sft", "dpo") else "out.jsonl")
    out.parent.mkdir(parents=True)
    cmd = [sys.executable, "-m", "aligndata", "convert", *map(str, files), "--out", str(out),
           "--quiet", *args]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", COLUMNS="200", NO_COLOR="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    files_out = {}
    for path in sorted(p for p in (work / name).rglob("*") if p.is_file()):
        rel = str(path.relative_to(work / name))
        data = path.read_bytes()
        if path.name == "manifest.json":
            # The manifest names its input files and tokenizer by path; those differ only by
            # the temporary directory, which the placeholder hides.
            data = data.replace(str(work).encode(), b"<work>")
        files_out[rel] = hashlib.sha256(data).hexdigest()
    output = (proc.stdout + proc.stderr).replace(str(work), "<work>")
    return {"rc": proc.returncode, "files": files_out, "output": output}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path, help="write the fingerprints here")
    group.add_argument("--compare", type=Path, help="compare with fingerprints saved earlier")
    ap.add_argument("--only", help="run only cases whose name contains this")
    opts = ap.parse_args()
    if not DATA.exists():
        print(f"{DATA} is absent: nothing to fingerprint", file=sys.stderr)
        return 2
    results = {}
    with tempfile.TemporaryDirectory(prefix="fingerprint-") as tmp:
        for name, files, args in CASES:
            if opts.only and opts.only not in name:
                continue
            results[name] = run_case(name, files, args, Path(tmp))
            r = results[name]
            state = "skipped" if "skipped" in r else f"exit {r['rc']}, {len(r['files'])} files"
            print(f"{name:28s} {state}", flush=True)
    if opts.save:
        opts.save.write_text(json.dumps(results, indent=1, sort_keys=True))
        return 0
    before = json.loads(opts.compare.read_text())
    differ = 0
    for name, now in results.items():
        then = before.get(name)
        if then is None:
            print(f"{name}: not in {opts.compare}")
            differ += 1
        elif then != now:
            differ += 1
            print(f"DIFFERENT {name}")
            for key in ("rc", "output"):
                if then.get(key) != now.get(key):
                    print(f"  {key}: before {then.get(key)!r}\n  {key}: now    {now.get(key)!r}")
            for f in sorted(set(then.get("files", {})) | set(now.get("files", {}))):
                if then.get("files", {}).get(f) != now.get("files", {}).get(f):
                    print(f"  {f}: differs")
    print(f"{len(results)} cases, {differ} different")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
