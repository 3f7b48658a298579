"""DPO encoding tokenizes prompt+rejected from the prompt's last added token on, re-using the chosen
side's prompt tokens. It must give exactly what tokenizing the whole prompt+rejected text gives."""

from __future__ import annotations

import random

import pytest

from aligndata.records import Message, PreferencePair
from aligndata.encode.tokenizer import load_tokenizer
from aligndata.encode.template import resolve_chat_template
from aligndata.encode.encoder import Encoder
from aligndata.encode.results import EncodeError
from tiny_tokenizer import make_tiny_tokenizer

PIECES = ["Hello", " world", "\n", "\n\n", "  ", "\t", "é", "e\u0301", "日本語", "🙂", "<|im_end|>", "</s>",
          "Human:", " Assistant:", "1234", ".", "?", " the", "ünïcode", "\u00a0", "[INST]", "<|end|>", "x"]


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(n))


def random_pairs(seed: int, count: int) -> list[PreferencePair]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        prompt = []
        if rng.random() < 0.4:
            prompt.append(Message("system", random_text(rng, 4) or "s"))
        for _ in range(rng.randint(0, 2)):
            prompt += [Message("user", random_text(rng, 6) or "u"), Message("assistant", random_text(rng, 6) or "a")]
        prompt.append(Message("user", random_text(rng, 8) or "q"))
        pairs.append(PreferencePair(prompt, [Message("assistant", random_text(rng, 10) or "c")],
                                    [Message("assistant", random_text(rng, 10) or "r")]))
    return pairs


def outcome(result):
    if isinstance(result, EncodeError):
        return ("error", result.reason)
    return (result.prompt_ids, result.chosen_ids, result.rejected_ids)


def check_equivalence(tokenizer, template_name=None, count=150):
    template = resolve_chat_template(tokenizer, template_name)
    # The texts hold special tokens on purpose (where the prompt split is): encode them as tokens.
    fast = Encoder(tokenizer, template, max_length=None, max_prompt_length=None, control_strings="allow")
    full = Encoder(tokenizer, template, max_length=None, max_prompt_length=None, control_strings="allow")
    full._split_ids = None
    pairs = random_pairs(7, count)
    got = [outcome(r) for r in fast.encode_dpo_batch(pairs)]
    want = [outcome(r) for r in full.encode_dpo_batch(pairs)]
    assert got == want
    assert sum(1 for g in got if g[0] != "error") > count // 5  # a good share encodes (the texts are adversarial on purpose)
    return fast


def test_shared_prompt_tokens_equal_full_tokenization_tiny():
    enc = check_equivalence(make_tiny_tokenizer())
    assert enc._split_ids  # the fast path is on for this tokenizer


def test_shared_prompt_tokens_equal_full_tokenization_with_bos():
    check_equivalence(make_tiny_tokenizer(add_bos=True), "llama3")


@pytest.mark.shared_data
@pytest.mark.parametrize("name, template", [("qwen2.5", None), ("phi-3-mini", None), ("minimind", None),
                                            ("gpt-neox-20b", "hh")])
def test_shared_prompt_tokens_equal_full_tokenization_real(shared_data, name, template):
    tokenizer = load_tokenizer(str(shared_data / "tokenizers" / name))
    if tokenizer.eos_token is None:  # gpt-neox ships tokenizer.json alone (see shared/data/SOURCES.md)
        tokenizer.eos_token = "<|endoftext|>"
    check_equivalence(tokenizer, template, count=80)
