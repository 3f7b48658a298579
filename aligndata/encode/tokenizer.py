"""Loading the tokenizer, what the manifest records about it, and the tokenizer the encoder calls.

`load_tokenizer` turns the `--tokenizer` spec into a tokenizer; `tokenizer_identity` is what the manifest
records so that training can refuse a different tokenizer. The encoder does not call the `transformers`
tokenizer: it calls the Rust tokenizer underneath (`offsets_backend`), through the small `TokenizerBackend`
interface that fasttok's piece cache also implements, and adds the BOS itself (`bos_to_prepend`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from aligndata.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TemplateError(InputError):
    """The tokenizer or chat template cannot be loaded or used (a usage error, not a data error)."""


def load_tokenizer(spec: str, *, trust_remote_code: bool = False, eos_token: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory, a `.gguf` file, a `tokenizer.json`, or a hub name.

    Hub names are looked up in the local cache first; the hub itself is only asked when it is reachable,
    so that an offline machine gets an immediate TemplateError instead of a minute of retries.
    `eos_token` names the end-of-sequence token where the tokenizer defines none (a bare tokenizer.json);
    it must be one token of the vocabulary.
    """
    tokenizer = _load(spec, trust_remote_code)
    if eos_token is not None:
        if eos_token not in tokenizer.get_vocab():
            raise TemplateError(f"--eos-token {eos_token!r}: not a token of the tokenizer {spec!r}")
        tokenizer.eos_token = eos_token
    return tokenizer


def _load(spec: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if path.is_file() and path.suffix == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(
                str(path.parent), gguf_file=path.name, trust_remote_code=trust_remote_code
            )
        elif path.is_file() and path.name.endswith(".json"):
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        else:
            tokenizer = None
    except Exception as exc:  # transformers raises many types; the user needs one line naming the spec
        raise TemplateError(f"cannot load tokenizer {spec!r}: {_what_was_expected(path, exc)}") from exc
    if tokenizer is not None:
        tokenizer.name_or_path = spec  # messages name the file given, not its directory or the tokenizer's class
        return tokenizer
    if path.is_file():
        raise TemplateError(
            f"cannot load tokenizer {spec!r}: a file must be a .gguf or a tokenizer.json; "
            "otherwise pass the directory that holds the tokenizer files"
        )
    if spec.startswith((".", "/", "~")) or spec.endswith((".gguf", ".json")) or spec.count("/") > 1:
        raise TemplateError(f"cannot load tokenizer {spec!r}: no such file or directory")
    return _load_from_hub(spec, trust_remote_code)


def _what_was_expected(path: Path, exc: BaseException) -> str:
    """Why `path` is no tokenizer, said as what was expected there (transformers' own message is about its
    internals, and cut to its first line it can end in mid-sentence)."""
    if path.is_dir() and not any((path / name).exists() for name in TOKENIZER_FILES):
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        found = f"; it holds {ggufs[0]}: pass that file" if ggufs else ""
        return f"the directory holds no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}){found}"
    if path.is_file() and path.suffix == ".json":
        return (f"not a tokenizer.json of the tokenizers library ({first_line(exc)}); for vocab.json + merges.txt "
                "or tokenizer_config.json pass the directory that holds them")
    return first_line(exc)


# The files of a tokenizer directory that AutoTokenizer reads (one is enough to start from).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


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
        raise TemplateError(f"cannot load tokenizer {name!r} from the hub: {first_line(exc)}") from exc


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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: what a one-line usage error shows of it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


# ---- the tokenizer the encoder calls --------------------------------------------------------------------


class Encoding(Protocol):
    """The parts of a `tokenizers.Encoding` the encoder reads (fasttok's PieceEncoding has just these)."""

    ids: list[int]
    offsets: list[tuple[int, int]]

    def char_to_token(self, pos: int) -> int | None: ...

    def token_to_chars(self, index: int) -> tuple[int, int]: ...


class TokenizerBackend(Protocol):
    """What the encoder calls on its tokenizer: a `tokenizers.Tokenizer` from `offsets_backend`, or
    fasttok's PieceTokenizer in front of one. Nothing else of either is used."""

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[Encoding]: ...

    def get_added_tokens_decoder(self) -> dict[int, Any]: ...


def offsets_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer to call directly: untrimmed offsets, no truncation or padding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        raise TemplateError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer; aligndata needs a fast one "
            "(the `tokenizers` library) for character offsets"
        )
    split_special = bool(getattr(tokenizer, "split_special_tokens", False))
    post = backend.post_processor
    trims = post is not None and '"trim_offsets":true' in post.__getstate__().decode("utf-8").replace(" ", "")
    if not trims and backend.truncation is None and backend.padding is None:
        if backend.encode_special_tokens == split_special:
            return backend
    from tokenizers import Tokenizer

    state = json.loads(backend.to_str())
    state["truncation"] = None
    state["padding"] = None
    _untrim(state.get("post_processor"))
    copy = Tokenizer.from_str(json.dumps(state))
    copy.encode_special_tokens = split_special
    return copy


def _untrim(node: Any) -> None:
    # ByteLevel (and RoBERTa) post-processors trim the leading space off offsets by default, which would
    # hide a token that straddles a boundary; ids do not change.
    if isinstance(node, dict):
        if "trim_offsets" in node:
            node["trim_offsets"] = False
        for value in node.values():
            _untrim(value)
    elif isinstance(node, list):
        for value in node:
            _untrim(value)


def bos_to_prepend(tokenizer: Any) -> tuple[int | None, str | None]:
    """The BOS the tokenizer adds with add_special_tokens=True; we add it only where the template did not."""
    bos_id = tokenizer.bos_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if bos_id is None or backend is None:
        return None, None
    with_specials = backend.encode("a", add_special_tokens=True).ids
    without = backend.encode("a", add_special_tokens=False).ids
    if with_specials[:1] == [bos_id] and without[:1] != [bos_id]:
        return bos_id, tokenizer.bos_token
    return None, None


def prompt_split_ids(backend: TokenizerBackend) -> frozenset[int] | None:
    """Ids of added tokens the input is split on; None when sharing prompt tokens would not be exact."""
    added = backend.get_added_tokens_decoder()
    if not added or any(getattr(tok, "single_word", False) for tok in added.values()):
        return None
    return frozenset(added)
