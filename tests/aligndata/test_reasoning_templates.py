"""Reasoning templates: every assistant turn of Qwen3's template trained (item 7), and templates whose
generation prompt opens a reasoning block converted by the rule of encode/reasoning.py (item 8).

The expected ids are derived independently: the template's own rendering of the prompt with its generation
prompt, plus the continuation the rule writes, spelled out here by hand, through the tokenizer.
"""

from __future__ import annotations

import pytest

from aligndata.encode.encoder import Encoder
from aligndata.encode.results import EncodeError
from aligndata.encode.template import TemplateInfo, resolve_chat_template
from aligndata.records import Conversation, Message, PreferencePair
from paths import SHARED_DATA
from tiny_tokenizer import trained_runs, trained_text

TEMPLATES = SHARED_DATA / "chat_templates" / "llama.cpp"
QWEN_VOCAB = SHARED_DATA / "tokenizers" / "qwen2.5"
QWEN3_CONFIG = SHARED_DATA / "chat_templates" / "onnxruntime-extensions" / "qwen3_tokenizer_config.json"

HI, BYE = Message("user", "Hi"), Message("user", "Bye")
CHAT = Conversation([HI, Message("assistant", "Hello there."), BYE, Message("assistant", "Bye!")])


def encoder(tok, template: TemplateInfo | str | None = None, **settings) -> Encoder:
    if not isinstance(template, TemplateInfo):
        template = resolve_chat_template(tok, template)
    return Encoder(tok, template, max_length=None, max_prompt_length=None, **settings)


def tiny_template(text: str) -> TemplateInfo:
    return TemplateInfo("test", text, "0")


# ---- minimal in-repo cases (tiny tokenizer) ----------------------------------------------------------------

# R1's way: reasoning stripped from every assistant turn, a generation prompt that opens a block.
OPENS_BLOCK = (
    "{% for m in messages %}{% set c = m.content.split('</think>')[-1] %}"
    "<|im_start|>{{ m.role }}\n{{ c }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
# QwQ's as llama.cpp ships it (enable_thinking unset): the generation prompt closes an empty block itself.
CLOSES_BLOCK = OPENS_BLOCK.replace("<think>\n{% endif %}", "<think>\n</think>{% endif %}")


def test_last_turn_after_an_opened_block_gets_an_explicit_empty_block(tiny_tokenizer):
    enc = encoder(tiny_tokenizer, tiny_template(OPENS_BLOCK)).encode_sft(CHAT)

    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    text = prompt + "<|im_start|>assistant\n<think>\n</think>\n\nBye!<|im_end|>\n"
    assert enc.input_ids == tiny_tokenizer.encode(text, add_special_tokens=False)
    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == [
        "Hello there.<|im_end|>", "</think>\n\nBye!<|im_end|>"]


def test_reasoning_keep_writes_the_datas_reasoning_and_empty_drops_it(tiny_tokenizer):
    reply = Message("assistant", "<think>\nsay bye\n</think>\n\nBye!")
    pair = PreferencePair([BYE], [reply], [Message("assistant", "No.")])

    kept = encoder(tiny_tokenizer, tiny_template(OPENS_BLOCK)).encode_dpo(pair)
    field = encoder(tiny_tokenizer, tiny_template(OPENS_BLOCK)).encode_dpo(
        PreferencePair([BYE], [Message("assistant", "Bye!", reasoning="say bye")], [Message("assistant", "No.")]))
    empty = encoder(tiny_tokenizer, tiny_template(OPENS_BLOCK), reasoning="empty").encode_dpo(pair)

    assert tiny_tokenizer.decode(kept.prompt_ids) == "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert tiny_tokenizer.decode(kept.chosen_ids) == "say bye\n</think>\n\nBye!<|im_end|>"
    assert field.chosen_ids == kept.chosen_ids
    assert tiny_tokenizer.decode(empty.chosen_ids) == "</think>\n\nBye!<|im_end|>"
    assert tiny_tokenizer.decode(kept.rejected_ids) == "</think>\n\nNo.<|im_end|>"


def test_a_prompt_that_closes_the_block_is_followed_by_the_reply_and_refuses_reasoning_to_keep(tiny_tokenizer):
    coder = encoder(tiny_tokenizer, tiny_template(CLOSES_BLOCK))

    enc = coder.encode_sft(CHAT)
    with pytest.raises(EncodeError) as err:
        coder.encode_sft(Conversation([BYE, Message("assistant", "Bye!", reasoning="say bye")]))

    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == ["Hello there.<|im_end|>", "Bye!<|im_end|>"]
    assert tiny_tokenizer.decode(enc.input_ids).endswith("<|im_start|>assistant\n<think>\n</think>Bye!<|im_end|>\n")
    assert err.value.reason == "template-drops-content"
    assert "pass --reasoning empty" in str(err.value)


# ---- real templates with the Qwen vocabulary (Qwen3's config: <think> and </think> are tokens) -------------

def needs_qwen3(test):
    absent = not (QWEN_VOCAB.is_dir() and QWEN3_CONFIG.is_file())
    return pytest.mark.shared_data(pytest.mark.skipif(absent, reason=f"no Qwen3 tokenizer in {SHARED_DATA}")(test))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from aligndata.encode.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("qwen3")  # SOURCES.md: Qwen3's config over the Qwen2 vocabulary
    for name in ("vocab.json", "merges.txt"):
        (folder / name).symlink_to(QWEN_VOCAB / name)
    (folder / "tokenizer_config.json").symlink_to(QWEN3_CONFIG)
    return load_tokenizer(str(folder))


def reference(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def prompt_text(tok, template: str, messages: list[Message]) -> str:
    return tok.apply_chat_template([m.to_json() for m in messages], chat_template=template, tokenize=False,
                                   add_generation_prompt=True)


@needs_qwen3
def test_qwen3_trains_every_turn_and_matches_its_own_rendering(qwen3):
    convs = [CHAT] + _fastchat(20)
    coder = encoder(qwen3)
    for conv in convs:
        enc = coder.encode_sft(conv)
        full = qwen3.apply_chat_template([m.to_json() for m in conv.messages], tokenize=False)
        assert enc.input_ids == reference(qwen3, full)
        replies = [m.content for m in conv.messages if m.role == "assistant"]
        expected = [r + "<|im_end|>" for r in replies[:-1]] + ["<think>\n\n</think>\n\n" + replies[-1] + "<|im_end|>"]
        assert trained_text(qwen3, enc.input_ids, enc.loss_mask) == expected


REASONING_TEMPLATES = {
    # file: (what the rule writes after the generation prompt for an empty block, the end of turn)
    "Qwen3.5-4B.jinja": ("</think>\n\n", "<|im_end|>\n"),
    "stepfun-ai-Step-3.5-Flash.jinja": ("</think>\n", "<|im_end|>\n"),
    "Qwen-QwQ-32B.jinja": ("", "<|im_end|>\n"),  # its prompt closes the block: <think>\n</think>
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": ("", "<｜end▁of▁sentence｜>"),
    "llama-cpp-deepseek-r1.jinja": ("</think>\n\n", "<｜end▁of▁sentence｜>"),
}


@needs_qwen3
@pytest.mark.parametrize("name", sorted(REASONING_TEMPLATES))
def test_reasoning_template_sft_and_dpo_continue_the_generation_prompt(qwen3, name):
    path = TEMPLATES / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    template = path.read_text(encoding="utf-8")
    block, end = REASONING_TEMPLATES[name]
    coder = encoder(qwen3, str(path))
    single = Conversation([HI, Message("assistant", "Hello there.")])

    enc = coder.encode_sft(single)
    dpo = coder.encode_dpo(PreferencePair([HI], [Message("assistant", "Go away!")], [Message("assistant", "Hello.")]))

    prompt = prompt_text(qwen3, template, [HI])
    assert enc.input_ids == reference(qwen3, prompt + block + "Hello there." + end)
    assert qwen3.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m]) == block + "Hello there." + end.strip()
    assert dpo.prompt_ids == reference(qwen3, prompt)
    assert dpo.prompt_ids + dpo.chosen_ids == reference(qwen3, prompt + block + "Go away!" + end.strip())
    assert qwen3.decode(dpo.rejected_ids) == block + "Hello." + end.strip()


@needs_qwen3
def test_qwen35_keeps_reasoning_given_in_a_field_as_its_template_renders_it(qwen3):
    path = TEMPLATES / "Qwen3.5-4B.jinja"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    reply = Message("assistant", "Hello there.", reasoning="A greeting.")

    enc = encoder(qwen3, str(path)).encode_sft(Conversation([HI, reply]))

    rendered = qwen3.apply_chat_template([HI.to_json(), reply.to_json()], chat_template=path.read_text(encoding="utf-8"),
                                         tokenize=False)
    assert rendered.endswith("<think>\nA greeting.\n</think>\n\nHello there.<|im_end|>\n")
    assert enc.input_ids == reference(qwen3, rendered)


def _fastchat(limit: int) -> list[Conversation]:
    import json

    records = json.loads((SHARED_DATA / "fastchat" / "dummy_conversation.json").read_text(encoding="utf-8"))
    roles = {"human": "user", "gpt": "assistant"}
    return [Conversation([Message(roles[t["from"]], t["value"]) for t in r["conversations"]]) for r in records[:limit]]


# ---- templates that move the system prompt (item 9) ---------------------------------------------------------

# Mistral-Nemo's way: the system prompt goes into the last user turn, only while that turn ends the conversation.
MOVES_SYSTEM = (
    "{% set sys = messages[0].content if messages[0].role == 'system' else '' %}"
    "{% for m in messages if m.role != 'system' %}{% if m.role == 'user' %}"
    "{% if loop.last and sys %}[INST]{{ sys }}\n\n{{ m.content }}[/INST]{% else %}[INST]{{ m.content }}[/INST]{% endif %}"
    "{% else %}{{ m.content }}<|endoftext|>{% endif %}{% endfor %}"
)
SYSTEM_PAIR = PreferencePair([Message("system", "Be brief."), HI], [Message("assistant", "Hello.")],
                             [Message("assistant", "No.")])


def test_dpo_with_a_template_that_moves_the_system_prompt_says_so(tiny_tokenizer):
    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer, tiny_template(MOVES_SYSTEM)).encode_dpo(SYSTEM_PAIR)

    assert err.value.reason == "template-moves-prompt"
    assert str(err.value) == (
        "the chat template renders part of the prompt only while the prompt ends the conversation: in the "
        "prompt+chosen rendering message 0 (system) is missing; no split of that rendering is the prompt the "
        "model sees at generation time")


@pytest.mark.slow
@pytest.mark.shared_data
def test_mistral_nemo_refuses_exactly_the_dpo_en_pairs_with_a_system_prompt_as_moved(tmp_path):
    import json

    from aligndata.encode.tokenizer import load_tokenizer

    vocab = SHARED_DATA / "tokenizers" / "gguf-llama-spm" / "ggml-vocab-llama-spm.gguf"
    path = TEMPLATES / "mistralai-Mistral-Nemo-Instruct-2407.jinja"
    if not (vocab.is_file() and path.is_file()):
        pytest.skip("no Mistral-Nemo template or Llama SPM vocabulary")
    records = json.loads((SHARED_DATA / "llamafactory" / "dpo_en_demo.json").read_text(encoding="utf-8"))[:60]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    pairs = [PreferencePair([Message(roles[t["from"]], t["value"]) for t in r["conversations"]],
                            [Message("assistant", r["chosen"]["value"])], [Message("assistant", r["rejected"]["value"])])
             for r in records]

    results = encoder(load_tokenizer(str(vocab)), str(path)).encode_dpo_batch(pairs)

    moved = [getattr(r, "reason", None) == "template-moves-prompt" for r in results]
    assert sum(moved) >= 10 and moved == [p.prompt[0].role == "system" for p in pairs]


# ---- a history rendered otherwise once the conversation goes on (Qwen3.5, StepFun-3.5) ----------------------

# Every assistant turn after the last user message gets a block: with the conversation cut before B, turn A
# is one of them; in the whole conversation it is not.
THINKS_AFTER_LAST_QUERY = (
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.index0 > ns.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_turn_whose_history_renders_otherwise_is_found_in_the_full_rendering(tiny_tokenizer):
    conv = Conversation([HI, Message("assistant", "Hello there."), Message("tool", "Paris"),
                         Message("assistant", "It is sunny."), BYE, Message("assistant", "Bye!")])

    enc = encoder(tiny_tokenizer, tiny_template(THINKS_AFTER_LAST_QUERY)).encode_sft(conv)

    assert tiny_tokenizer.decode(enc.input_ids).count("<think>") == 1
    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == [
        "Hello there.<|im_end|>", "It is sunny.<|im_end|>", "<think>\n\n</think>\n\nBye!<|im_end|>"]


@needs_qwen3
@pytest.mark.parametrize("name", ["Qwen3.5-4B.jinja", "stepfun-ai-Step-3.5-Flash.jinja"])
def test_qwen35_and_stepfun_keep_every_glaive_conversation_token_exactly(qwen3, name):
    import json

    path = TEMPLATES / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    template = path.read_text(encoding="utf-8")
    records = json.loads((SHARED_DATA / "llamafactory" / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
    roles = {"human": "user", "gpt": "assistant", "observation": "tool"}
    convs = []
    for record in records[:60]:
        messages = [Message("assistant", "", tool_calls=[{"type": "function", "function": json.loads(t["value"])}])
                    if t["from"] == "function_call" else Message(roles[t["from"]], t["value"])
                    for t in record["conversations"]]
        tools = [{"type": "function", "function": f} for f in json.loads(record["tools"] or "[]")] or None
        convs.append(Conversation(messages, tools=tools))

    results = encoder(qwen3, str(path)).encode_sft_batch(convs)

    im_end = qwen3.convert_tokens_to_ids("<|im_end|>")
    for conv, enc in zip(convs, results):
        full = qwen3.apply_chat_template([m.to_json() for m in conv.messages], tools=conv.tools,
                                         chat_template=template, tokenize=False)
        at = full.rindex("<think>\n\n</think>")  # the rule's empty block after the generation prompt
        assert enc.input_ids == reference(qwen3, full[:at] + "<think>\n</think>" + full[at + len("<think>\n\n</think>"):])
        runs = [r for r in trained_runs(enc.input_ids, enc.loss_mask)]
        assert len(runs) == sum(m.role == "assistant" for m in conv.messages)
        assert all(run[-1] == im_end for run in runs)

