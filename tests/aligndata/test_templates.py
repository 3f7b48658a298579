"""Tokenizer loading, chat-template resolution, the built-in templates, and tokenizer identity."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from aligndata.encode import tokenizer as tokenizer_module
from aligndata.encode.template import BUILTIN_TEMPLATES, resolve_chat_template
from aligndata.encode.tokenizer import TemplateError, load_tokenizer, tokenizer_identity
from tiny_tokenizer import CHATML_TEMPLATE, make_tiny_tokenizer

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function",
          "function": {"name": "get_weather", "description": "Weather of a city", "parameters": CITY}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "21 C"},
    {"role": "assistant", "content": "It is 21 C."},
]


PARIS_IDS = [334, 268, 294, 380, 280, 329, 37]  # "What is the weather in Paris?" in the tiny tokenizer


def render(tok, name: str, messages: list[dict], **kwargs) -> str:
    """Render a built-in through transformers itself, as inference would."""
    return tok.apply_chat_template(messages, chat_template=BUILTIN_TEMPLATES[name], tokenize=False, **kwargs)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---- built-in templates -------------------------------------------------------------------------


def tokenizer_without_markers():
    """A byte-level BPE like the tiny tokenizer's, without its special tokens (as GPT-2's vocabulary is)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from tiny_tokenizer import CORPUS

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize("name, missing", [("chatml", "<|im_start|>, <|im_end|>"),
                                           ("llama3", "<|start_header_id|>, <|end_header_id|>, <|eot_id|>")])
def test_a_builtin_whose_markers_are_not_single_tokens_is_refused_naming_them(name, missing):
    with pytest.raises(TemplateError) as err:
        resolve_chat_template(tokenizer_without_markers(), name)

    assert str(err.value) == (
        f"the built-in chat template {name!r} needs {missing} to be single tokens, but this tokenizer has no such "
        "tokens (it splits them into text pieces); pass --chat-template with a template written for this "
        "tokenizer (a .jinja file)"
    )


def test_convert_with_such_a_builtin_exits_2_naming_the_missing_markers(tmp_path):
    from typer.testing import CliRunner

    from aligndata.cli import app

    tokenizer_without_markers().save_pretrained(str(tmp_path / "tok"))
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello"}]}) + "\n")

    result = CliRunner().invoke(app, ["convert", str(chats), "--to", "sft", "-t", str(tmp_path / "tok"),
                                      "--chat-template", "chatml", "--out", str(tmp_path / "out")])

    assert result.exit_code == 2
    assert "needs <|im_start|>, <|im_end|> to be single tokens" in result.output
    assert not (tmp_path / "out").exists()


def test_a_builtin_without_markers_and_a_file_template_are_taken_as_written(tmp_path):
    tok = tokenizer_without_markers()
    tok.eos_token = "!"
    (tmp_path / "chatml.jinja").write_text(BUILTIN_TEMPLATES["chatml"], encoding="utf-8")

    assert resolve_chat_template(tok, "hh").source == "builtin:hh"
    assert resolve_chat_template(tok, str(tmp_path / "chatml.jinja")).source == "file:chatml.jinja"


def test_builtin_templates_are_chatml_hh_and_llama3():
    assert sorted(BUILTIN_TEMPLATES) == ["chatml", "hh", "llama3"]


def test_chatml_builtin_renders_turns_and_generation_prompt(tiny_tokenizer):
    assert render(tiny_tokenizer, "chatml", TOOL_CHAT[:2], add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chatml_builtin_renders_tools_tool_calls_and_tool_results(tiny_tokenizer):
    assert render(tiny_tokenizer, "chatml", TOOL_CHAT, tools=TOOLS) == (
        "<|im_start|>system\nBe brief.\n\nYou can call the functions described below in <tools></tools>. To call one, "
        'write a JSON object with its "name" and "arguments" inside <tool_call></tool_call> tags.\n<tools>\n'
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": '
        '{"type": "object", "properties": {"city": {"type": "string"}}}}}\n</tools><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>tool\n21 C<|im_end|>\n"
        "<|im_start|>assistant\nIt is 21 C.<|im_end|>\n"
    )


def test_chatml_builtin_separates_content_and_several_tool_calls_by_newlines(tiny_tokenizer):
    chat = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [CALL, CALL]},
    ]
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

    assert render(tiny_tokenizer, "chatml", chat).endswith(
        f"<|im_start|>assistant\nChecking.\n{call_text}\n{call_text}<|im_end|>\n"
    )


def test_llama3_builtin_renders_bos_headers_and_trimmed_content(tiny_tokenizer):
    chat = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " Weather in Paris?\n"}]

    assert render(tiny_tokenizer, "llama3", chat, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama3_builtin_renders_tools_calls_as_json_and_results_as_ipython(tiny_tokenizer):
    text = render(tiny_tokenizer, "llama3", TOOL_CHAT, tools=TOOLS)

    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.\n\nYou can call the functions "
        'below. To call one, reply with only a JSON object of the form {"name": function name, "parameters": '
        'arguments}.\n\n{\n    "type": "function",\n'
    )
    assert text.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n21 C<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 21 C.<|eot_id|>"
    )


def test_hh_builtin_renders_human_assistant_with_eos_and_plain_system(tiny_tokenizer):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "And London?"},
    ]

    assert render(tiny_tokenizer, "hh", chat, add_generation_prompt=True) == (
        "Be brief.\n\nHuman: Weather in Paris?\n\nAssistant: Sunny.<|endoftext|>\n\nHuman: And London?\n\nAssistant:"
    )


# ---- resolve_chat_template ----------------------------------------------------------------------


def test_resolve_none_takes_the_tokenizers_own_template(tiny_tokenizer):
    info = resolve_chat_template(tiny_tokenizer, None)

    assert (info.source, info.text, info.sha256) == ("tokenizer", CHATML_TEMPLATE, sha(CHATML_TEMPLATE))


def test_resolve_a_builtin_name(tiny_tokenizer):
    info = resolve_chat_template(tiny_tokenizer, "llama3")

    assert (info.source, info.text, info.sha256) == (
        "builtin:llama3", BUILTIN_TEMPLATES["llama3"], sha(BUILTIN_TEMPLATES["llama3"])
    )


def test_resolve_a_jinja_file(tiny_tokenizer, tmp_path):
    path = tmp_path / "vicuna.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")

    info = resolve_chat_template(tiny_tokenizer, str(path))

    assert (info.source, info.text) == ("file:vicuna.jinja", "{% for m in messages %}{{ m.content }}{% endfor %}")


def test_resolve_a_tokenizer_config_json_takes_its_chat_template(tiny_tokenizer, tmp_path):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"eos_token": "</s>", "chat_template": "{{ messages[0].content }}"}), encoding="utf-8")

    info = resolve_chat_template(tiny_tokenizer, str(path))

    assert (info.source, info.text) == ("file:tokenizer_config.json", "{{ messages[0].content }}")


def test_resolve_a_json_file_without_chat_template_is_refused(tiny_tokenizer, tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}", encoding="utf-8")

    with pytest.raises(TemplateError) as err:
        resolve_chat_template(tiny_tokenizer, str(path))

    assert str(err.value) == f'{path}: no "chat_template" string in this JSON file'


def test_resolve_an_unknown_name_lists_the_builtins(tiny_tokenizer):
    with pytest.raises(TemplateError) as err:
        resolve_chat_template(tiny_tokenizer, "vicuna")

    assert str(err.value) == "unknown chat template 'vicuna': not a built-in (chatml, hh, llama3) and not a file"


def test_resolve_none_without_a_tokenizer_template_says_to_pass_one(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    tok.chat_template = None

    with pytest.raises(TemplateError) as err:
        resolve_chat_template(tok, None)

    assert str(err.value) == (
        f"the tokenizer {str(tiny_tokenizer_dir)!r} has no chat template; pass --chat-template with a built-in name "
        "(chatml, hh, llama3) or a .jinja file"
    )


def test_resolve_reports_a_template_syntax_error_with_its_line(tiny_tokenizer, tmp_path):
    path = tmp_path / "broken.jinja"
    path.write_text("{% for m in messages %}\n{{ m.content }}\n", encoding="utf-8")

    with pytest.raises(TemplateError) as err:
        resolve_chat_template(tiny_tokenizer, str(path))

    assert str(err.value) == (
        "chat template file:broken.jinja does not compile (line 2): Unexpected end of template. Jinja was looking "
        "for the following tags: 'endfor' or 'else'. The innermost block that needs to be closed is 'for'."
    )


# ---- load_tokenizer -----------------------------------------------------------------------------


def test_load_tokenizer_from_a_directory(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))

    assert tok("What is the weather in Paris?", add_special_tokens=False).input_ids == PARIS_IDS
    assert tok.chat_template == CHATML_TEMPLATE


def test_load_tokenizer_from_a_tokenizer_json_file(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir / "tokenizer.json"))

    assert tok("What is the weather in Paris?", add_special_tokens=False).input_ids == PARIS_IDS


def test_load_tokenizer_refuses_a_missing_path(tmp_path):
    with pytest.raises(TemplateError) as err:
        load_tokenizer(str(tmp_path / "nope"))

    assert str(err.value) == f"cannot load tokenizer {str(tmp_path / 'nope')!r}: no such file or directory"


def test_load_tokenizer_refuses_a_directory_without_tokenizer_files(tmp_path):
    with pytest.raises(TemplateError) as err:
        load_tokenizer(str(tmp_path))

    assert str(err.value).startswith(f"cannot load tokenizer {str(tmp_path)!r}: ")


def test_load_tokenizer_with_an_unreachable_hub_fails_at_once_naming_the_spec(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()

    with pytest.raises(TemplateError) as err:
        load_tokenizer("someone/not-cached-anywhere")

    assert time.monotonic() - start < 5
    assert str(err.value) == (
        "cannot load tokenizer 'someone/not-cached-anywhere': it is not a local directory or .gguf file, it is not "
        "in the Hugging Face cache, and the hub is not reachable from here (offline?). Pass a local directory that "
        "holds the tokenizer files, or a .gguf file."
    )


def test_hub_is_unreachable_in_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert tokenizer_module.hub_reachable() is False


# ---- tokenizer_identity -------------------------------------------------------------------------


def test_tokenizer_identity_is_the_same_for_the_same_tokenizer_loaded_twice(tiny_tokenizer_dir):
    first = tokenizer_identity(load_tokenizer(str(tiny_tokenizer_dir)), "tiny")
    second = tokenizer_identity(load_tokenizer(str(tiny_tokenizer_dir)), "tiny")

    assert first == second
    assert {k: v for k, v in first.items() if k != "sha256"} == {
        "name_or_path": "tiny", "vocab_size": 420, "bos_token_id": 3, "eos_token_id": 0, "pad_token_id": 0,
    }


def test_tokenizer_identity_changes_with_the_vocabulary_or_special_tokens(tiny_tokenizer):
    base = tokenizer_identity(tiny_tokenizer, "tiny")["sha256"]

    other_vocab = make_tiny_tokenizer()
    other_vocab.add_tokens(["<extra>"])
    other_eos = make_tiny_tokenizer()
    other_eos.eos_token = "<|im_end|>"

    assert tokenizer_identity(make_tiny_tokenizer(), "tiny")["sha256"] == base
    assert tokenizer_identity(other_vocab, "tiny")["sha256"] != base
    assert tokenizer_identity(other_eos, "tiny")["sha256"] != base


def test_tokenizer_identity_ignores_padding_and_truncation_state(tiny_tokenizer):
    base = tokenizer_identity(tiny_tokenizer, "tiny")["sha256"]

    tiny_tokenizer.backend_tokenizer.enable_truncation(8)

    assert tokenizer_identity(tiny_tokenizer, "tiny")["sha256"] == base
