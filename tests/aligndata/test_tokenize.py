"""Encoding records into ids and loss masks, with the tiny in-process tokenizer (tests/tiny_tokenizer.py).

Token ids below are those of the tiny tokenizer: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>,
3 <|begin_of_text|>, 4 <|start_header_id|>, 5 <|end_header_id|>, 6 <|eot_id|>, 205 "\\n".
"""

from __future__ import annotations

import hashlib
import pickle

import pytest
from tokenizers import processors

from aligndata.errors import InputError
from aligndata.records import Conversation, Message, PreferencePair
from aligndata.encode.template import TemplateInfo, resolve_chat_template
from aligndata.encode.encoder import Encoder
from aligndata.encode.results import EncodedDPO, EncodeError
from tiny_tokenizer import make_tiny_tokenizer, trained_text

EOT, IM_START, IM_END, BOS, EOT_ID, NL = 0, 1, 2, 3, 6, 205

# Rendered ChatML turns of the conversation below, tokenized.
SYSTEM_TURN = [IM_START, 372, 374, NL, 352, 413, 278, 415, 82, 333, 20, IM_END, NL]  # system: You are a helpful ...
USER_PARIS = [IM_START, 287, 310, NL, 334, 268, 294, 380, 280, 329, 37, IM_END, NL]  # user: What is the weather in ...
ASSISTANT_HEADER = [IM_START, 71, 300, NL]  # <|im_start|>assistant\n
SUNNY = [302, 268, 391, 367, 280, 329, 338, 20]  # It is sunny in Paris today.
USER_LONDON = [IM_START, 287, 310, NL, 418, 18, 405, 280, 341, 37, IM_END, NL]  # user: Thanks, and in London?
RAINING = [302, 268, 390, 395, 280, 341, 20]  # It is raining in London.
JOKE = [419, 377, 278, 388, 315, 20]  # Tell me a joke.

SYSTEM = Message("system", "You are a helpful assistant.")
PARIS = Message("user", "What is the weather in Paris?")
LONDON = Message("user", "Thanks, and in London?")


def sunny() -> Message:
    return Message("assistant", "It is sunny in Paris today.")


def raining() -> Message:
    return Message("assistant", "It is raining in London.")


def joke() -> Message:
    return Message("assistant", "Tell me a joke.")


def two_turns() -> Conversation:
    return Conversation([SYSTEM, PARIS, sunny(), LONDON, raining()])


def template(text: str) -> TemplateInfo:
    return TemplateInfo("file:test.jinja", text, hashlib.sha256(text.encode()).hexdigest())


def encoder(tok, chat_template: str | TemplateInfo | None = None, **settings) -> Encoder:
    settings.setdefault("max_length", None)
    settings.setdefault("max_prompt_length", None)
    info = chat_template if isinstance(chat_template, TemplateInfo) else resolve_chat_template(tok, chat_template)
    return Encoder(tok, info, **settings)


def test_the_token_constants_above_are_the_tiny_tokenizers_ids(tiny_tokenizer):
    assert [tiny_tokenizer.decode(ids) for ids in (SYSTEM_TURN, USER_PARIS, ASSISTANT_HEADER, SUNNY, JOKE)] == [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n",
        "<|im_start|>assistant\n",
        "It is sunny in Paris today.",
        "Tell me a joke.",
    ]
    assert tiny_tokenizer.decode(USER_LONDON + RAINING) == (
        "<|im_start|>user\nThanks, and in London?<|im_end|>\nIt is raining in London."
    )


# ---- SFT ----------------------------------------------------------------------------------------


def test_sft_trains_every_assistant_turn_with_its_end_of_turn_token(tiny_tokenizer):
    enc = encoder(tiny_tokenizer).encode_sft(two_turns())

    assert enc.input_ids == (
        SYSTEM_TURN + USER_PARIS + ASSISTANT_HEADER + SUNNY + [IM_END, NL]
        + USER_LONDON + ASSISTANT_HEADER + RAINING + [IM_END, NL]
    )
    assert enc.loss_mask == (
        [0] * 30 + [1] * 9 + [0] * 1  # header untrained; content + <|im_end|> trained; "\n" not
        + [0] * 16 + [1] * 8 + [0] * 1
    )
    assert enc.truncated is None


def test_sft_train_on_last_trains_only_the_last_assistant_turn(tiny_tokenizer):
    enc = encoder(tiny_tokenizer, train_on="last").encode_sft(two_turns())

    assert enc.loss_mask == [0] * 56 + [1] * 8 + [0]
    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == ["It is raining in London.<|im_end|>"]


def test_sft_input_ids_equal_apply_chat_template(tiny_tokenizer):
    conv = two_turns()
    expected = tiny_tokenizer.apply_chat_template([m.to_json() for m in conv.messages], return_dict=False)

    assert encoder(tiny_tokenizer).encode_sft(conv).input_ids == expected


def test_sft_with_tools_trains_the_tool_call_and_renders_tools_in_the_system_turn(tiny_tokenizer):
    city = {"type": "object", "properties": {"city": {"type": "string"}}}
    weather = {"name": "get_weather", "description": "Weather of a city", "parameters": city}
    tools = [{"type": "function", "function": weather}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    conv = Conversation(
        [PARIS, Message("assistant", "", tool_calls=[call]), Message("tool", '{"temperature": 21, "unit": "C"}'),
         sunny()],
        tools=tools,
    )
    coder = encoder(tiny_tokenizer, "chatml")
    enc = coder.encode_sft(conv)

    text = tiny_tokenizer.decode(enc.input_ids)
    assert text.startswith(
        "<|im_start|>system\nYou can call the functions described below in <tools></tools>. To call one, write a JSON "
        'object with its "name" and "arguments" inside <tool_call></tool_call> tags.\n<tools>\n{"type": "function", '
        '"function": {"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", '
        '"properties": {"city": {"type": "string"}}}}}\n</tools><|im_end|>\n'
    )
    assert text.endswith(
        '<|im_start|>tool\n{"temperature": 21, "unit": "C"}<|im_end|>\n<|im_start|>assistant\n'
        "It is sunny in Paris today.<|im_end|>\n"
    )
    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is sunny in Paris today.<|im_end|>",
    ]


def test_sft_hh_template_trains_eos_after_each_assistant_turn_and_prepends_system(tiny_tokenizer):
    enc = encoder(tiny_tokenizer, "hh").encode_sft(two_turns())

    assert tiny_tokenizer.decode(enc.input_ids) == (
        "You are a helpful assistant.\n\nHuman: What is the weather in Paris?\n\nAssistant: It is sunny in Paris "
        "today.<|endoftext|>\n\nHuman: Thanks, and in London?\n\nAssistant: It is raining in London.<|endoftext|>"
    )
    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == [
        " It is sunny in Paris today.<|endoftext|>",
        " It is raining in London.<|endoftext|>",
    ]


def test_sft_llama3_template_trains_content_and_eot_id(tiny_tokenizer):
    enc = encoder(tiny_tokenizer, "llama3").encode_sft(two_turns())

    assert tiny_tokenizer.decode(enc.input_ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the weather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is sunny in Paris today.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nThanks, and in London?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is raining in London.<|eot_id|>"
    )
    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == [
        "It is sunny in Paris today.<|eot_id|>",
        "It is raining in London.<|eot_id|>",
    ]


# A template that writes EOS only at the very end of a conversation without a generation prompt (as Phi-3 does).
TRAILER_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}{{ eos_token }}{% endif %}"
)


def test_sft_does_not_train_a_trailer_written_only_at_the_end_of_the_conversation(tiny_tokenizer):
    enc = encoder(tiny_tokenizer, template(TRAILER_TEMPLATE)).encode_sft(two_turns())

    assert enc.input_ids[-3:] == [IM_END, NL, EOT]
    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == [
        "It is sunny in Paris today.<|im_end|>",
        "It is raining in London.<|im_end|>",
    ]


def test_dpo_completion_ends_at_end_of_turn_before_a_trailer(tiny_tokenizer):
    pair = PreferencePair([PARIS], [sunny()], [joke()])

    enc = encoder(tiny_tokenizer, template(TRAILER_TEMPLATE)).encode_dpo(pair)

    assert enc == EncodedDPO(USER_PARIS + ASSISTANT_HEADER, SUNNY + [IM_END], JOKE + [IM_END])


# Closes a last assistant turn with another end-of-turn token than a turn that more follows, as gpt-oss does
# (<|return|> at the very end, <|end|> otherwise); here <|eot_id|> and <|im_end|>.
LAST_TURN_CLOSED_OTHERWISE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.role == 'assistant' and loop.last and not add_generation_prompt %}<|eot_id|>"
    "{% else %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_sft_trains_the_end_of_turn_a_template_writes_only_after_the_last_turn(tiny_tokenizer):
    enc = encoder(tiny_tokenizer, template(LAST_TURN_CLOSED_OTHERWISE)).encode_sft(two_turns())

    assert enc.input_ids[-2:] == [RAINING[-1], EOT_ID]
    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == [
        "It is sunny in Paris today.<|im_end|>",
        "It is raining in London.<|eot_id|>",
    ]


def test_dpo_completions_end_with_the_end_of_turn_a_template_writes_only_after_the_last_turn(tiny_tokenizer):
    pair = PreferencePair([PARIS], [sunny()], [joke()])

    enc = encoder(tiny_tokenizer, template(LAST_TURN_CLOSED_OTHERWISE)).encode_dpo(pair)

    assert enc == EncodedDPO(USER_PARIS + ASSISTANT_HEADER, SUNNY + [EOT_ID], JOKE + [EOT_ID])


# Closes a last assistant turn with plain text whose first characters merge with the end of the content into
# one token ('"}}' is one token of the tiny tokenizer).
LAST_TURN_CLOSED_WITH_TEXT = LAST_TURN_CLOSED_OTHERWISE.replace("<|eot_id|>", "}}")


def test_content_that_shares_a_token_with_the_last_turns_closing_is_trained_whole(tiny_tokenizer):
    quote = Message("assistant", 'It is "Paris"')
    coder = encoder(tiny_tokenizer, template(LAST_TURN_CLOSED_WITH_TEXT))

    sft = coder.encode_sft(Conversation([PARIS, quote]))
    dpo = coder.encode_dpo(PreferencePair([PARIS], [quote], [joke()]))

    assert trained_text(tiny_tokenizer, sft.input_ids, sft.loss_mask) == ['It is "Paris"}}']
    assert tiny_tokenizer.decode(dpo.chosen_ids) == 'It is "Paris"}}'


# Strips reasoning from assistant turns that are not last, as several reasoning-model templates do.
STRIPS_REASONING = (
    "{% for m in messages %}{% set c = m.content %}"
    "{% if m.role == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ c }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_sft_trains_an_earlier_turn_as_the_full_rendering_shows_it_without_its_reasoning(tiny_tokenizer):
    conv = Conversation([PARIS, Message("assistant", "<think>hmm</think>It is sunny."), LONDON, raining()])

    enc = encoder(tiny_tokenizer, template(STRIPS_REASONING)).encode_sft(conv)

    assert enc.input_ids == tiny_tokenizer.encode(STRIPPED_RENDERING, add_special_tokens=False)
    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == [
        "It is sunny.<|im_end|>", "It is raining in London.<|im_end|>"]


STRIPPED_RENDERING = (
    "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\nIt is sunny.<|im_end|>\n"
    "<|im_start|>user\nThanks, and in London?<|im_end|>\n<|im_start|>assistant\nIt is raining in London.<|im_end|>\n"
)

# Qwen3's way: only the last assistant turn gets an (empty) reasoning block in front of its reply.
THINKS_LAST = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_sft_trains_every_turn_of_a_template_that_gives_only_the_last_turn_a_reasoning_block(tiny_tokenizer):
    conv = Conversation([PARIS, Message("assistant", "It is sunny."), LONDON, raining()])

    enc = encoder(tiny_tokenizer, template(THINKS_LAST)).encode_sft(conv)

    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == [
        "It is sunny.<|im_end|>", "<think>\n\n</think>\n\nIt is raining in London.<|im_end|>"]


# Writes a marker after the reply of the last turn only: an earlier turn then has no tail in common.
MARKS_LAST = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.role == 'assistant' and loop.last %} (end){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_sft_refuses_a_template_that_renders_an_earlier_turns_reply_differently(tiny_tokenizer):
    conv = Conversation([PARIS, Message("assistant", "It is sunny."), LONDON, raining()])

    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer, template(MARKS_LAST)).encode_sft(conv)

    assert err.value.reason == "template-mask"
    assert str(err.value) == (
        "assistant message 1: rendered as the last message it differs from its rendering inside the full "
        "conversation (first difference at char 91: ' (end)<|im_end|>\\n' vs '<|im_end|>\\n<|im_start|>user\\nThanks, and '); "
        "the template renders a turn differently once later turns exist, so the trained span cannot be located"
    )


def test_sft_with_that_template_still_encodes_when_only_the_last_turn_is_trained(tiny_tokenizer):
    conv = Conversation([PARIS, Message("assistant", "<think>hmm</think>It is sunny."), LONDON, raining()])

    enc = encoder(tiny_tokenizer, template(STRIPS_REASONING), train_on="last").encode_sft(conv)

    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == ["It is raining in London.<|im_end|>"]


# The generation prompt ends with a space that BPE merges into the first word of the answer.
SPACE_PROMPT = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_sft_refuses_a_span_start_inside_a_merged_token(tiny_tokenizer):
    conv = Conversation([PARIS, joke()])

    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer, template(SPACE_PROMPT)).encode_sft(conv)

    assert err.value.reason == "boundary-mismatch"
    assert str(err.value) == (
        "the start of assistant message 1 is not a token boundary: token 15 ' T' (chars 46-48) straddles "
        "char 47 (' weather in Paris?\\nassistant: ' | 'Tell me a joke.\\n'); the generation prompt and the "
        "text after it merge into one token, so the prompt tokenized alone would differ"
    )


def test_a_tokenizer_that_drops_the_start_of_a_reply_is_named_as_the_cause(tiny_tokenizer):
    from tokenizers import Regex, normalizers

    tiny_tokenizer.backend_tokenizer.normalizer = normalizers.Replace(Regex("Q+"), "")
    conv = Conversation([PARIS, Message("assistant", "QQQ It is sunny.")])

    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer).encode_sft(conv)

    assert err.value.reason == "boundary-mismatch"
    assert "char" in str(err.value) and "belongs to no token; the tokenizer turns this text into no tokens" in str(err.value)


def test_sft_without_assistant_message_has_no_trained_tokens(tiny_tokenizer):
    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer).encode_sft(Conversation([SYSTEM, PARIS]))

    assert (err.value.reason, str(err.value)) == (
        "no-trained-tokens", "the conversation has no assistant message to train on"
    )


def test_template_errors_become_encode_errors(tiny_tokenizer):
    conv = Conversation([PARIS, sunny(), Message("tool", "{}"), raining()])

    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer, "hh").encode_sft(conv)

    assert err.value.reason == "template-error"
    assert str(err.value) == (
        "the chat template failed on this record: the hh template has no tool role; use chatml or llama3"
    )


def test_hh_template_without_an_eos_token_is_refused_once_before_any_record(tiny_tokenizer):
    tiny_tokenizer.eos_token = None

    with pytest.raises(InputError) as err:
        resolve_chat_template(tiny_tokenizer, "hh")

    assert str(err.value).startswith("the built-in chat template 'hh' ends assistant turns with the end-of-sequence "
                                     "token, and the tokenizer ")
    assert str(err.value).endswith(" defines none; name it with --eos-token (e.g. --eos-token '<|endoftext|>')")


# ---- BOS ----------------------------------------------------------------------------------------


def test_bos_is_prepended_when_the_tokenizer_adds_one_and_the_template_does_not():
    tok = make_tiny_tokenizer(add_bos=True)

    enc = encoder(tok).encode_sft(two_turns())

    assert enc.input_ids[:2] == [BOS, IM_START]
    assert enc.input_ids.count(BOS) == 1
    assert enc.input_ids[1:] == encoder(make_tiny_tokenizer()).encode_sft(two_turns()).input_ids
    assert enc.loss_mask[0] == 0


def test_bos_is_not_doubled_when_the_template_renders_it_and_the_tokenizer_adds_it():
    tok = make_tiny_tokenizer(add_bos=True)

    enc = encoder(tok, "llama3").encode_sft(two_turns())

    assert enc.input_ids[:2] == [BOS, 4]
    assert enc.input_ids.count(BOS) == 1


def test_bos_comes_from_the_template_alone_when_the_tokenizer_adds_none(tiny_tokenizer):
    assert encoder(tiny_tokenizer, "llama3").encode_sft(two_turns()).input_ids[:2] == [BOS, 4]
    assert BOS not in encoder(tiny_tokenizer, "chatml").encode_sft(two_turns()).input_ids


def test_dpo_bos_belongs_to_the_prompt_only():
    tok = make_tiny_tokenizer(add_bos=True)

    enc = encoder(tok).encode_dpo(PreferencePair([PARIS], [sunny()], [joke()]))

    assert enc == EncodedDPO([BOS] + USER_PARIS + ASSISTANT_HEADER, SUNNY + [IM_END], JOKE + [IM_END])


# ---- DPO ----------------------------------------------------------------------------------------


def test_dpo_splits_prompt_and_completions_at_the_generation_prompt(tiny_tokenizer):
    pair = PreferencePair([SYSTEM, PARIS], [sunny()], [joke()])

    enc = encoder(tiny_tokenizer).encode_dpo(pair)

    assert enc == EncodedDPO(SYSTEM_TURN + USER_PARIS + ASSISTANT_HEADER, SUNNY + [IM_END], JOKE + [IM_END])


def test_dpo_prompt_plus_completion_equals_the_tokenized_full_conversation(tiny_tokenizer):
    pair = PreferencePair([SYSTEM, PARIS, sunny(), LONDON], [raining()], [joke()])
    enc = encoder(tiny_tokenizer).encode_dpo(pair)

    for completion, ids in ((pair.chosen, enc.chosen_ids), (pair.rejected, enc.rejected_ids)):
        full = tiny_tokenizer.apply_chat_template([m.to_json() for m in pair.prompt + completion], return_dict=False)
        assert full == enc.prompt_ids + ids + [NL]  # everything up to the end-of-turn token; the newline is not trained


def test_dpo_refuses_a_boundary_inside_a_merged_token(tiny_tokenizer):
    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer, template(SPACE_PROMPT)).encode_dpo(PreferencePair([PARIS], [joke()], [sunny()]))

    assert err.value.reason == "boundary-mismatch"
    assert str(err.value).startswith(
        "the start of the chosen completion is not a token boundary: token 15 ' T' (chars 46-48) straddles char 47"
    )


def test_dpo_boundary_check_sees_through_trimmed_offsets():
    # gpt-neox style: ByteLevel post-processor with trim_offsets, which hides the space inside ' It'.
    tok = make_tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    pair = PreferencePair([PARIS], [sunny()], [joke()])

    with pytest.raises(EncodeError) as err:
        encoder(tok, template(SPACE_PROMPT)).encode_dpo(pair)  # ' Tell' of the rejected completion
    assert err.value.reason == "boundary-mismatch"
    assert encoder(tok).encode_dpo(pair) == EncodedDPO(USER_PARIS + ASSISTANT_HEADER, SUNNY + [IM_END], JOKE + [IM_END])


def test_dpo_refuses_a_template_that_renders_the_prompt_differently_before_a_completion(tiny_tokenizer):
    hint_with_prompt = (
        "{% if add_generation_prompt %}Be brief.\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer, template(hint_with_prompt)).encode_dpo(PreferencePair([PARIS], [sunny()], [joke()]))

    assert err.value.reason == "boundary-mismatch"
    assert str(err.value) == (
        "the rendered prompt is not a prefix of the rendered prompt+chosen conversation (first difference at char 0: "
        "'Be brief.\\n<|im_start|>user\\nWhat is the w' vs '<|im_start|>user\\nWhat is the weather in '); the "
        "template renders the prompt differently once a completion follows"
    )


@pytest.mark.parametrize(
    ("chosen", "reason", "message"),
    [
        ([Message("assistant", "a"), Message("assistant", "b")], "multi-message-completion",
         "the chosen completion has 2 messages; DPO needs exactly one assistant message"),
        ([], "empty-completion", "the chosen completion has 0 messages; DPO needs exactly one assistant message"),
        ([Message("user", "a")], "completion-role", "the chosen completion is a 'user' message, not 'assistant'"),
    ],
)
def test_dpo_needs_exactly_one_assistant_message_per_completion(tiny_tokenizer, chosen, reason, message):
    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer).encode_dpo(PreferencePair([PARIS], chosen, [joke()]))

    assert (err.value.reason, str(err.value)) == (reason, message)


# ---- length policy: SFT -------------------------------------------------------------------------


def test_sft_drop_policy_refuses_records_over_max_length(tiny_tokenizer):
    coder = encoder(tiny_tokenizer, max_length=64)

    with pytest.raises(EncodeError) as err:
        coder.encode_sft(two_turns())

    assert (err.value.reason, str(err.value)) == ("too-long", "65 tokens > max_length 64")
    assert len(encoder(tiny_tokenizer, max_length=65).encode_sft(two_turns()).input_ids) == 65


def test_sft_truncate_drops_the_oldest_turns_and_keeps_the_system_message(tiny_tokenizer):
    enc = encoder(tiny_tokenizer, max_length=64, length_policy="truncate").encode_sft(two_turns())

    assert enc.input_ids == SYSTEM_TURN + USER_LONDON + ASSISTANT_HEADER + RAINING + [IM_END, NL]
    assert enc.loss_mask == [0] * 29 + [1] * 8 + [0]
    assert enc.truncated == "prompt"


def test_sft_truncate_cuts_at_the_right_when_the_last_exchange_alone_is_too_long(tiny_tokenizer):
    enc = encoder(tiny_tokenizer, max_length=33, length_policy="truncate").encode_sft(two_turns())

    assert enc.input_ids == SYSTEM_TURN + USER_LONDON + ASSISTANT_HEADER + RAINING[:4]
    assert enc.loss_mask == [0] * 29 + [1] * 4
    assert enc.truncated == "completion"


def test_sft_truncate_without_trained_tokens_left_is_refused(tiny_tokenizer):
    coder = encoder(tiny_tokenizer, max_length=29, length_policy="truncate")

    with pytest.raises(EncodeError) as err:
        coder.encode_sft(two_turns())

    assert (err.value.reason, str(err.value)) == ("no-trained-tokens", "no token of this conversation is trained")


# ---- length policy: DPO -------------------------------------------------------------------------


def long_prompt_pair() -> PreferencePair:
    """Prompt 13 + 13 + 14 + 12 + 4 = 56 tokens; chosen 9, rejected 7."""
    return PreferencePair([SYSTEM, PARIS, sunny(), LONDON], [sunny()], [joke()])


def test_dpo_drop_policy_counts_prompt_plus_longest_completion(tiny_tokenizer):
    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer, max_length=64).encode_dpo(long_prompt_pair())

    assert (err.value.reason, str(err.value)) == (
        "too-long", "prompt 56 + longest completion 9 tokens > max_length 64"
    )
    assert encoder(tiny_tokenizer, max_length=65).encode_dpo(long_prompt_pair()).truncated is None


def test_dpo_truncate_drops_the_oldest_prompt_turns_first_and_keeps_the_system_message(tiny_tokenizer):
    coder = encoder(tiny_tokenizer, max_length=60, max_prompt_length=40, length_policy="truncate")

    enc = coder.encode_dpo(long_prompt_pair())

    assert enc == EncodedDPO(
        SYSTEM_TURN + USER_LONDON + ASSISTANT_HEADER, SUNNY + [IM_END], JOKE + [IM_END], truncated="prompt"
    )


def test_dpo_truncate_drops_the_system_message_before_cutting_tokens(tiny_tokenizer):
    coder = encoder(tiny_tokenizer, max_length=40, max_prompt_length=16, length_policy="truncate")

    enc = coder.encode_dpo(long_prompt_pair())

    assert enc == EncodedDPO(USER_LONDON + ASSISTANT_HEADER, SUNNY + [IM_END], JOKE + [IM_END], truncated="prompt")


def test_dpo_truncate_cuts_the_prompt_from_the_left_when_turns_are_not_enough(tiny_tokenizer):
    coder = encoder(tiny_tokenizer, max_length=40, max_prompt_length=10, length_policy="truncate")

    enc = coder.encode_dpo(long_prompt_pair())

    assert enc == EncodedDPO(
        (USER_LONDON + ASSISTANT_HEADER)[-10:], SUNNY + [IM_END], JOKE + [IM_END], truncated="prompt"
    )


def test_dpo_truncate_cuts_completions_at_the_right_after_the_prompt(tiny_tokenizer):
    coder = encoder(tiny_tokenizer, max_length=21, max_prompt_length=20, length_policy="truncate")

    enc = coder.encode_dpo(PreferencePair([PARIS], [sunny()], [joke()]))

    assert enc == EncodedDPO(USER_PARIS + ASSISTANT_HEADER, SUNNY[:4], JOKE[:4], truncated="completion")


def test_dpo_truncate_cuts_both_prompt_and_completions_when_needed(tiny_tokenizer):
    coder = encoder(tiny_tokenizer, max_length=14, max_prompt_length=10, length_policy="truncate")

    enc = coder.encode_dpo(PreferencePair([PARIS], [sunny()], [joke()]))

    assert enc == EncodedDPO((USER_PARIS + ASSISTANT_HEADER)[-10:], SUNNY[:4], JOKE[:4], truncated="completion")


def test_dpo_truncate_without_max_prompt_length_refuses_a_prompt_that_leaves_no_room(tiny_tokenizer):
    coder = encoder(tiny_tokenizer, max_length=17, length_policy="truncate")

    with pytest.raises(EncodeError) as err:
        coder.encode_dpo(PreferencePair([PARIS], [sunny()], [joke()]))

    assert (err.value.reason, str(err.value)) == (
        "too-long", "the prompt alone has 17 tokens >= max_length 17; set max_prompt_length to truncate it"
    )


@pytest.mark.parametrize(
    ("max_length", "max_prompt_length", "policy"), [(60, 40, "truncate"), (21, 20, "truncate"), (40, 10, "truncate")]
)
def test_nothing_longer_than_max_length_comes_out(tiny_tokenizer, max_length, max_prompt_length, policy):
    coder = encoder(tiny_tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, length_policy=policy)

    for pair in (long_prompt_pair(), PreferencePair([PARIS], [sunny()], [joke()])):
        enc = coder.encode_dpo(pair)
        assert len(enc.prompt_ids) + max(len(enc.chosen_ids), len(enc.rejected_ids)) <= max_length
    for result in coder.encode_sft_batch([two_turns(), Conversation([PARIS, sunny()])]):
        assert isinstance(result, EncodeError) or len(result.input_ids) <= max_length


# ---- batches, errors, settings ------------------------------------------------------------------


def test_batch_encoding_equals_one_by_one_and_returns_errors_in_place(tiny_tokenizer):
    coder = encoder(tiny_tokenizer, max_length=64)
    convs = [two_turns(), Conversation([SYSTEM, PARIS, sunny()]), Conversation([PARIS])]

    results = coder.encode_sft_batch(convs)

    assert results[1] == coder.encode_sft(convs[1])
    assert [type(r).__name__ for r in results] == ["EncodeError", "EncodedSFT", "EncodeError"]
    assert [r.reason for r in results if isinstance(r, EncodeError)] == ["too-long", "no-trained-tokens"]

    pairs = [
        long_prompt_pair(),
        PreferencePair([PARIS], [sunny(), joke()], [joke()]),
        PreferencePair([PARIS], [sunny()], [joke()]),
    ]
    dpo = coder.encode_dpo_batch(pairs)
    assert [getattr(r, "reason", None) for r in dpo] == ["too-long", "multi-message-completion", None]
    assert dpo[2] == coder.encode_dpo(pairs[2])


def test_encode_error_survives_pickling_with_its_reason():
    err = pickle.loads(pickle.dumps(EncodeError("too-long", "65 tokens > max_length 64")))

    assert (err.reason, str(err)) == ("too-long", "65 tokens > max_length 64")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"length_policy": "cut"}, "--length-policy 'cut': choose drop or truncate"),
        ({"train_on": "first"}, "--train-on 'first': choose all or last"),
        ({"max_length": 0}, "--max-length 0: must be at least 2"),
        ({"max_length": 10, "max_prompt_length": 0}, "--max-prompt-length 0: must be at least 1"),
        ({"max_length": 10, "max_prompt_length": 10}, "--max-prompt-length 10 must be below --max-length 10"),
    ],
)
def test_encoder_refuses_bad_settings_with_the_same_check_as_convert(tiny_tokenizer, settings, message):
    with pytest.raises(InputError) as err:
        encoder(tiny_tokenizer, **settings)

    assert str(err.value) == message


# ---- a template that leaves part of the record out of the rendering ---------------------------------------

WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
TOOL_RESULT = Message("tool", '{"temperature": 21, "unit": "C"}')


def tool_conversation() -> Conversation:
    return Conversation([PARIS, Message("assistant", "", tool_calls=[WEATHER_CALL]), TOOL_RESULT, sunny()])


def test_sft_refuses_a_tool_call_the_template_cannot_render(tiny_tokenizer):
    # The tiny tokenizer's own ChatML template renders each message's content and nothing else.
    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer).encode_sft(tool_conversation())

    assert err.value.reason == "template-drops-content"
    assert str(err.value) == (
        "message 1 (assistant): the chat template leaves its tool call 0 (get_weather) out of the rendered text "
        "(it cannot render it), so this record would be trained without it"
    )


SKIPS_TOOL_TURNS = (
    "{% for m in messages %}{% if m.role != 'tool' %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for call in m.tool_calls or [] %}{{ call.function | tojson }}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_sft_refuses_a_tool_result_the_template_leaves_out(tiny_tokenizer):
    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer, template(SKIPS_TOOL_TURNS)).encode_sft(tool_conversation())

    assert err.value.reason == "template-drops-content"
    assert str(err.value) == (
        "message 2 (tool): the chat template leaves its content '{\"temperature\": 21, \"unit\": \"C\"}' out of "
        "the rendered text (it cannot render it), so this record would be trained without it"
    )


def test_sft_refuses_a_tool_list_the_template_leaves_out(tiny_tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]

    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer).encode_sft(Conversation([PARIS, sunny()], tools=tools))

    assert err.value.reason == "template-drops-content"
    assert str(err.value).startswith("tool 'get_weather': the chat template leaves this tool's definition out")


# Writes calls as name(key=value) and tool results and content as JSON strings, trimmed: none of it verbatim.
REWRITES_CALLS = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'tool' %}{{ m.content | trim | tojson }}{% else %}{{ m.content | trim }}{% endif %}"
    "{% for call in m.tool_calls or [] %}{{ call.function.name }}("
    "{% for key, value in call.function.arguments | dictsort %}{{ key }}={{ value }}{% if not loop.last %}, "
    "{% endif %}{% endfor %}){% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tool_calls_and_results_rewritten_by_the_template_are_kept(tiny_tokenizer):
    conv = tool_conversation()
    conv.messages[0] = Message("user", '  Is it "sunny"\nin Paris?  ')

    enc = encoder(tiny_tokenizer, template(REWRITES_CALLS)).encode_sft(conv)

    assert trained_text(tiny_tokenizer, enc.input_ids, enc.loss_mask) == [
        "get_weather(city=Paris, days=2)<|im_end|>", "It is sunny in Paris today.<|im_end|>",
    ]


def test_dpo_refuses_a_completion_whose_tool_call_the_template_cannot_render(tiny_tokenizer):
    pair = PreferencePair([PARIS], [Message("assistant", "", tool_calls=[WEATHER_CALL])], [joke()])

    with pytest.raises(EncodeError) as err:
        encoder(tiny_tokenizer).encode_dpo(pair)

    assert err.value.reason == "template-drops-content"
    assert str(err.value).startswith("message 1 (assistant): the chat template leaves its tool call 0 (get_weather)")
