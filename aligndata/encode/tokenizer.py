"""Tokenizer loading and chat-template resolution.

`load_tokenizer` turns the `--tokenizer` spec into a tokenizer, `resolve_chat_template` picks the
Jinja text that renders records (the tokenizer's own, a built-in, or a file), and
`tokenizer_identity` is what the manifest records so that training can refuse a different tokenizer.
Rendering itself happens in `aligndata.encode.encoder`, with the template compiled by `compile_template`
in the same sandboxed Jinja environment that `transformers` uses for `apply_chat_template`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_BUILTIN_DIR = Path(__file__).parent / "builtin_templates"

# name -> Jinja text; the files live in aligndata/builtin_templates/ and ship inside the wheel.
BUILTIN_TEMPLATES: dict[str, str] = {
    path.stem: path.read_text(encoding="utf-8") for path in sorted(_BUILTIN_DIR.glob("*.jinja"))
}


class TemplateError(Exception):
    """The tokenizer or chat template cannot be loaded or used (a usage error, not a data error)."""


@dataclass
class TemplateInfo:
    """The chat template a conversion renders with, and where it came from."""

    source: str  # "tokenizer" | "builtin:NAME" | "file:BASENAME"
    text: str
    sha256: str


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory, a `.gguf` file, a `tokenizer.json`, or a hub name.

    Hub names are looked up in the local cache first; the hub itself is only asked when it is reachable,
    so that an offline machine gets an immediate TemplateError instead of a minute of retries.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(
                str(path.parent), gguf_file=path.name, trust_remote_code=trust_remote_code
            )
        if path.is_file() and path.name.endswith(".json"):
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as exc:  # transformers raises many types; the user needs one line naming the spec
        raise TemplateError(f"cannot load tokenizer {spec!r}: {_first_line(exc)}") from exc
    if path.is_file():
        raise TemplateError(
            f"cannot load tokenizer {spec!r}: a file must be a .gguf or a tokenizer.json; "
            "otherwise pass the directory that holds the tokenizer files"
        )
    if spec.startswith((".", "/", "~")) or spec.endswith((".gguf", ".json")) or spec.count("/") > 1:
        raise TemplateError(f"cannot load tokenizer {spec!r}: no such file or directory")
    return _load_from_hub(spec, trust_remote_code)


def _load_from_hub(name: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception:
        pass  # not in the local cache: ask the hub below
    if not hub_reachable():
        raise TemplateError(
            f"cannot load tokenizer {name!r}: it is not a local directory or .gguf file, it is not in the "
            "Hugging Face cache, and the hub is not reachable from here (offline?). "
            "Pass a local directory that holds the tokenizer files, or a .gguf file."
        )
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise TemplateError(f"cannot load tokenizer {name!r} from the hub: {_first_line(exc)}") from exc


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face endpoint accepts a TCP connection (and offline mode is not set)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> TemplateInfo:
    """Pick the template: None -> the tokenizer's own; a built-in name; or a path.

    A path is a Jinja file, or a JSON file (such as a tokenizer_config.json) with a "chat_template" key.
    The template is compiled here so that a syntax error is reported before any record is read.
    """
    if chat_template is None:
        text = _tokenizer_template(tokenizer)
        source = "tokenizer"
    elif chat_template in BUILTIN_TEMPLATES:
        text = BUILTIN_TEMPLATES[chat_template]
        source = f"builtin:{chat_template}"
    else:
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise TemplateError(
                f"unknown chat template {chat_template!r}: not a built-in ({', '.join(sorted(BUILTIN_TEMPLATES))}) "
                "and not a file"
            )
        text = _template_from_file(path)
        source = f"file:{path.name}"
    try:
        compile_template(text)
    except Exception as exc:
        lineno = getattr(exc, "lineno", None)
        where = f" (line {lineno})" if lineno else ""
        raise TemplateError(f"chat template {source} does not compile{where}: {_first_line(exc)}") from exc
    return TemplateInfo(source=source, text=text, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def _tokenizer_template(tokenizer: PreTrainedTokenizerBase) -> str:
    text = getattr(tokenizer, "chat_template", None)
    if isinstance(text, dict):  # several named templates: the default one renders plain conversations
        text = text.get("default")
    if not text:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TemplateError(
            f"the tokenizer {name!r} has no chat template; pass --chat-template with a built-in name "
            f"({', '.join(sorted(BUILTIN_TEMPLATES))}) or a .jinja file"
        )
    return text


def _template_from_file(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        return text
    try:
        value = json.loads(text).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise TemplateError(f"{path}: not a JSON object with a \"chat_template\" key") from exc
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...] as in some tokenizer_config.json
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(value, str) or not value:
        raise TemplateError(f"{path}: no \"chat_template\" string in this JSON file")
    return value


def compile_template(text: str) -> Any:
    """Compile in the sandboxed environment `transformers` uses for `apply_chat_template` (cached there).

    Falls back to None when this transformers version has no such helper; callers then render through
    `tokenizer.apply_chat_template(..., tokenize=False)`, which gives the same text more slowly.
    """
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)  # syntax check only
        return None
    return _compile_jinja_template(text)


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase, spec: str) -> dict[str, Any]:
    """What the manifest records about the tokenizer; `sha256` changes exactly when tokenization can."""
    return {
        "name_or_path": spec,
        "sha256": _tokenizer_sha256(tokenizer),
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer's own serialization (vocabulary, merges, normalizer, pre-tokenizer, post-processor,
        # added tokens) is deterministic; hashing it as is avoids re-encoding a 150k-entry vocabulary in Python.
        # Truncation and padding are call-time state that transformers sets and resets, so they are cleared
        # for the serialization and put back.
        truncation, padding = backend.truncation, backend.padding
        backend.no_truncation()
        backend.no_padding()
        try:
            digest.update(backend.to_str().encode("utf-8"))
        finally:
            if truncation is not None:
                backend.enable_truncation(**truncation)
            if padding is not None:
                backend.enable_padding(**padding)
    else:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        digest.update(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    special = json.dumps(_plain(tokenizer.special_tokens_map), sort_keys=True, ensure_ascii=False)
    digest.update(b"\0" + special.encode("utf-8"))
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
