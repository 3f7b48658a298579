"""Chat templates: which one renders the records, and rendering messages with it.

`resolve_chat_template` picks the Jinja text (the tokenizer's own, a built-in, or a file) and
`ChatRenderer` renders messages with it exactly as `tokenizer.apply_chat_template(..., tokenize=False)`
does, compiled by `compile_template` in the same sandboxed Jinja environment that `transformers` uses.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2.runtime import new_context

from aligndata.encode.limits import join_bounded
from aligndata.encode.results import EncodeError
from aligndata.encode.tokenizer import TemplateError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_BUILTIN_DIR = Path(__file__).parent / "builtin_templates"
_MARKER = re.compile(r"<\|[a-z_]+\|>")  # a control string of a built-in template: <|im_start|>, <|eot_id|>

# name -> Jinja text; the files live in aligndata/encode/builtin_templates/ and ship inside the wheel.
BUILTIN_TEMPLATES: dict[str, str] = {
    path.stem: path.read_text(encoding="utf-8") for path in sorted(_BUILTIN_DIR.glob("*.jinja"))
}


@dataclass
class TemplateInfo:
    """The chat template a conversion renders with, and where it came from."""

    source: str  # "tokenizer" | "builtin:NAME" | "file:BASENAME"
    text: str
    sha256: str


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
        _require_single_token_markers(tokenizer, chat_template, text)
        _require_eos_token(tokenizer, chat_template, text)
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
        raise TemplateError(f"chat template {source} does not compile{where}: {first_line(exc)}") from exc
    return TemplateInfo(source=source, text=text, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def _require_single_token_markers(tokenizer: PreTrainedTokenizerBase, name: str, text: str) -> None:
    """TemplateError unless each marker of a built-in template (``<|im_start|>``...) is one token here.

    A tokenizer without them splits each into text pieces: the model would learn a format written in
    ordinary characters and the end of its turns would be a ``>``. The tokenizer's own template, or a file,
    is taken as its author wrote it."""
    markers = sorted(set(_MARKER.findall(text)), key=text.index)
    unknown = getattr(tokenizer, "unk_token_id", None)
    missing = [m for m in markers if len(ids := tokenizer.encode(m, add_special_tokens=False)) != 1 or ids[0] == unknown]
    if missing:
        raise TemplateError(
            f"the built-in chat template {name!r} needs {', '.join(missing)} to be single tokens, but this "
            f"tokenizer has no such tokens (it splits them into text pieces); pass --chat-template with a "
            "template written for this tokenizer (a .jinja file)"
        )


def _require_eos_token(tokenizer: PreTrainedTokenizerBase, name: str, text: str) -> None:
    """TemplateError, once, when a built-in template ends turns with eos_token and the tokenizer has none
    (a tokenizer.json without its tokenizer_config.json): every record would fail the same way."""
    if "eos_token" in text and not getattr(tokenizer, "eos_token", None):
        raise TemplateError(
            f"the built-in chat template {name!r} ends assistant turns with the end-of-sequence token, and the "
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} defines none; "
            "name it with --eos-token (e.g. --eos-token '<|endoftext|>')"
        )


def _tokenizer_template(tokenizer: PreTrainedTokenizerBase) -> str:
    text = getattr(tokenizer, "chat_template", None)
    if isinstance(text, dict):  # several named templates: the default one renders plain conversations
        text = text.get("default")
    if not text:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        # A tokenizer.json never holds the template: tokenizer_config.json beside it does.
        alone = " (a tokenizer.json file alone has none: pass the directory with its tokenizer_config.json)"
        raise TemplateError(
            f"the tokenizer {name!r} has no chat template{alone if name.endswith('.json') else ''}; pass "
            f"--chat-template with a built-in name ({', '.join(sorted(BUILTIN_TEMPLATES))}) or a .jinja file"
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



class ChatRenderer:
    """Renders messages with one chat template, to the text `apply_chat_template(..., tokenize=False)` gives."""

    def __init__(self, tokenizer: Any, template: TemplateInfo):
        self.tokenizer = tokenizer
        self.template = template
        self._compiled = compile_template(template.text)
        # True when the rendering without the generation prompt is always a prefix of the one with it:
        # a conversation then has no trailer and its comparison rendering can be skipped.
        self.prompt_only_appends = False
        if self._compiled is not None:
            # The variables apply_chat_template passes, over the template's globals.
            self._globals = dict(self._compiled.globals)
            self._context = {**self._globals, **tokenizer.special_tokens_map, "documents": None}
            self.prompt_only_appends = _generation_prompt_only_appends(self._compiled, template.text)

    def render(self, messages: list[dict], tools: list | None, add_generation_prompt: bool) -> str:
        """The rendered text; EncodeError("template-error") when the template fails on these messages."""
        try:
            if self._compiled is not None:
                # What Template.render does, minus re-merging the template's globals on every call.
                context = dict(self._context)
                context["messages"] = messages
                context["tools"] = tools
                context["add_generation_prompt"] = add_generation_prompt
                template = self._compiled
                state = new_context(template.environment, template.name, template.blocks, context, True, self._globals)
                return join_bounded(template.root_render_func(state), self.template.source)
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.template.text,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except EncodeError:
            raise
        except Exception as exc:  # the template is a program: anything it raises is about this record
            raise EncodeError("template-error", f"the chat template failed on this record: {exc}") from exc


def _generation_prompt_only_appends(compiled: Any, text: str) -> bool:
    """True when the template's last statement is `{% if add_generation_prompt %}...{% endif %}` (no else)
    and nothing else reads the flag: the rendering without the prompt is then always a prefix of the one
    with it, so there is no trailer and the comparison rendering can be skipped."""
    from jinja2 import nodes

    body = compiled.environment.parse(text).body
    while body and isinstance(body[-1], nodes.Output) and not any(
        not isinstance(n, nodes.TemplateData) or n.data for n in body[-1].nodes
    ):
        body = body[:-1]  # empty output nodes render nothing
    if not body or not isinstance(body[-1], nodes.If):
        return False
    last = body[-1]
    test = last.test
    if last.elif_ or last.else_ or not (isinstance(test, nodes.Name) and test.name == "add_generation_prompt"):
        return False
    uses = [n for stmt in body for n in stmt.find_all(nodes.Name) if n.name == "add_generation_prompt"]
    return len(uses) == 1
