"""The supported input formats: one JSON Schema and one small adapter each.

An adapter turns a schema-valid record into a canonical Conversation or PreferencePair
(aligndata.records); it reports what it cannot map through `Issues` instead of raising.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from jsonschema import Draft202012Validator

from aligndata.errors import InputError
from aligndata.records import Record
from aligndata.read.formats.common import Issues
from aligndata.read.formats.openai import adapt_openai, adapt_openai_preference
from aligndata.read.formats.sharegpt import adapt_sharegpt, adapt_sharegpt_preference
from aligndata.read.formats.text import adapt_hh, adapt_text_preference


def schema_dir() -> Path:
    """schemas/ at the repository root (source checkout) or aligndata/_schemas (installed wheel)."""
    packaged = Path(str(resources.files("aligndata"))) / "_schemas"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "schemas"


@dataclass(frozen=True)
class Format:
    name: str
    task: str  # "sft" (conversations) or "dpo" (preference pairs)
    adapt: Callable[[Any, Issues], Record | None]
    summary: str

    @cached_property
    def schema(self) -> dict[str, Any]:
        return json.loads((schema_dir() / f"{self.name}.schema.json").read_text(encoding="utf-8"))

    @cached_property
    def validator(self) -> Draft202012Validator:
        return Draft202012Validator(self.schema)

    @cached_property
    def is_valid(self) -> Callable[[Any], bool]:
        """A fast yes/no check against the same schema (jsonschema-rs, compiled); the Python
        `jsonschema` validator above produces the messages for records that fail it."""
        try:
            import jsonschema_rs
        except ImportError:  # pragma: no cover - the dependency is declared; keep working without it
            return self.validator.is_valid
        return jsonschema_rs.validator_for(self.schema).is_valid


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("sharegpt", "sft", adapt_sharegpt, '{"conversations": [{"from", "value"}], "system"?, "tools"?}'),
        Format("openai", "sft", adapt_openai, '{"messages": [{"role", "content", ...}], "tools"?} or a bare list of messages'),
        Format("sharegpt-preference", "dpo", adapt_sharegpt_preference,
               '{"conversations": [...], "chosen": {"from", "value"}, "rejected": {"from", "value"}}'),
        Format("openai-preference", "dpo", adapt_openai_preference,
               '{"prompt"?: [messages], "chosen": [messages], "rejected": [messages]}'),
        Format("text-preference", "dpo", adapt_text_preference, '{"prompt": str, "chosen": str, "rejected": str}'),
        Format("hh", "dpo", adapt_hh, '{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}'),
    )
}


def check_format_option(name: str) -> None:
    """`--format` takes auto or a format name; anything else is a usage error (exit 2)."""
    if name != "auto" and name not in FORMATS:
        raise InputError(f"unknown format {name!r}; choose one of: auto, {', '.join(FORMATS)}")


def detect_shape(value: Any) -> str | None:
    """Which format a record looks like, from its top-level keys alone (None: none of them)."""
    if isinstance(value, list):
        return "openai" if value and all(isinstance(m, dict) and "role" in m for m in value) else None
    if not isinstance(value, dict):
        return None
    if "conversations" in value:
        return "sharegpt-preference" if ("chosen" in value or "rejected" in value) else "sharegpt"
    if "messages" in value:
        return "openai"
    if "chosen" in value or "rejected" in value:
        chosen = value.get("chosen", value.get("rejected"))
        if "prompt" in value:
            return "text-preference" if isinstance(value["prompt"], str) else "openai-preference"
        return "hh" if isinstance(chosen, str) else "openai-preference"
    return None
