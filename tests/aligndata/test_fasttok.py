"""The piece cache (aligndata/encode/fasttok.py) gives exactly the tokenizers library's ids and offsets, and its
guards send to the library what it cannot vouch for."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Regex

import aligndata.encode.fasttok as fasttok
from aligndata.encode.fasttok import PieceTokenizer, TokenizerMismatch, piece_tokenizer
from aligndata.encode.encoder import Encoder
from aligndata.encode.template import resolve_chat_template
from aligndata.encode.tokenizer import offsets_backend
from tiny_tokenizer import SPECIAL_TOKENS, make_tiny_tokenizer

# Letters, digits, every kind of space and line break the expressions treat specially, apostrophes and
# contractions, punctuation, combining marks (decomposed text), non-Latin scripts, emoji, and the
# tokenizer's special tokens.
ALPHABET = list("aZéß中ع7١٣ '’.,!?-_\"<|>") + ["\n", "\r", "\t", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\u00a0",
                                                "\u2028", "\u3000", "\u0301", "\u0338", "🙂", "🏾", "\x00"]
PIECES = ALPHABET + ["'s", "'LL", "'ve", " the", "  ", "\r\n", "e\u0301", "assistant"] + SPECIAL_TOKENS[:3]
texts = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


def _backend(tok):
    return offsets_backend(tok)


def assert_same(fast: PieceTokenizer, library, batch: list[str]) -> None:
    ours = fast.encode_batch(batch, add_special_tokens=False)
    theirs = library.encode_batch(batch, add_special_tokens=False)
    for text, a, b in zip(batch, ours, theirs):
        assert a.ids == b.ids, text
        assert list(a.offsets) == list(b.offsets), text
        for pos in range(len(text) + 1):
            assert a.char_to_token(pos) == b.char_to_token(pos), (text, pos)
        for index in range(len(b.ids)):
            assert tuple(a.token_to_chars(index)) == tuple(b.token_to_chars(index)), (text, index)


@pytest.fixture(scope="module")
def tiny():
    backend = _backend(make_tiny_tokenizer())
    fast = piece_tokenizer(backend)
    assert fast is not None
    return fast, backend


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(texts, min_size=1, max_size=4))
def test_tiny_tokenizer_matches_the_library(tiny, batch):
    fast, backend = tiny
    assert_same(fast, backend, batch)


def test_chat_text_takes_the_cache_path_and_is_spot_checked(tiny):
    fast, backend = tiny
    before_texts, before_fallbacks = fast.texts, fast.fallbacks
    batch = [f"<|im_start|>user\nWhat is the weather in Paris, {i}?<|im_end|>\n<|im_start|>assistant\nIt is sunny."
             f"<|im_end|>\n" for i in range(200)]
    assert_same(fast, backend, batch)
    assert fast.texts == before_texts + 200
    assert fast.fallbacks == before_fallbacks  # all ASCII: nothing went to the library
    assert fast.checked > 0


def test_uncertain_characters_and_unnormalized_text_go_to_the_library(tiny_tokenizer):
    backend = _backend(tiny_tokenizer)
    state = json.loads(backend.to_str())
    state["normalizer"] = {"type": "NFC"}
    nfc = Tokenizer.from_str(json.dumps(state))
    fast = piece_tokenizer(nfc)
    assert fast is not None
    decomposed = "Cafe\u0301 au lait"  # NFC would compose e + U+0301: the library's offsets differ
    assert_same(fast, nfc, [decomposed])
    assert fast.fallbacks == 1
    fast._unsafe.add("ŋ")  # as if the two expression engines disagreed on this character
    try:
        assert_same(fast, nfc, ["Eŋlish", "plain"])
        assert fast.fallbacks == 2
    finally:
        fast._unsafe.discard("ŋ")


def _lookahead_tokenizer() -> Tokenizer:
    """A Split expression with a negative lookahead: "ab" before "c" is one piece in context, but the
    piece "ab" alone splits into "a", "b" (the lookahead sees the end of the text)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"a(?!bc)|ab|\s+|[^\sab]+|b"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(["abc ab a b cab abab"] * 5, trainer=trainer)
    return backend


def test_a_piece_the_library_splits_when_alone_is_never_cached():
    backend = _lookahead_tokenizer()
    fast = piece_tokenizer(backend)
    assert fast is not None
    assert_same(fast, backend, ["abc", "xabcx ab", "<s>abc<s>"])
    assert "ab" in fast._bad_pieces
    assert fast.fallbacks >= 1


def test_tokenizers_it_cannot_vouch_for_are_left_to_the_library(tiny_tokenizer):
    base = json.loads(_backend(tiny_tokenizer).to_str())

    def variant(**changes):
        state = json.loads(json.dumps(base))
        state.update(changes)
        return Tokenizer.from_str(json.dumps(state))

    assert piece_tokenizer(variant(normalizer={"type": "Lowercase"})) is None
    assert piece_tokenizer(variant(pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                                                  "split": True})) is None
    assert piece_tokenizer(variant(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                  "use_regex": True})) is None
    assert piece_tokenizer(variant(pre_tokenizer={"type": "Whitespace"})) is None
    lstrip = json.loads(json.dumps(base))
    lstrip["added_tokens"][1]["lstrip"] = True
    assert piece_tokenizer(Tokenizer.from_str(json.dumps(lstrip))) is None
    dropout = json.loads(json.dumps(base))
    dropout["model"]["dropout"] = 0.1
    assert piece_tokenizer(Tokenizer.from_str(json.dumps(dropout))) is None
    split_specials = variant()
    split_specials.encode_special_tokens = True
    assert piece_tokenizer(split_specials) is None
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.NFC()
    assert piece_tokenizer(wordpiece) is None


def test_a_wrong_cache_entry_is_caught_by_the_spot_check(tiny_tokenizer):
    fast = piece_tokenizer(_backend(tiny_tokenizer))
    fast._ids[" Paris"] = (5, 5)  # a corrupted entry (the first texts are always checked)
    fast._spans[" Paris"] = ((0, 3), (3, 6))
    with pytest.raises(TokenizerMismatch, match="text 1 differently.*--no-fast-tokenize"):
        fast.encode_batch(["It is sunny in Paris today."], add_special_tokens=False)


def test_encodings_survive_the_cache_being_emptied(tiny_tokenizer, monkeypatch):
    backend = _backend(tiny_tokenizer)
    fast = piece_tokenizer(backend)
    monkeypatch.setattr(fasttok, "CACHE_LIMIT", 12)
    first = fast.encode_batch(["Tell me a joke, please."], add_special_tokens=False)[0]
    fast.encode_batch(["Why did the chicken cross the road? Nobody knows."], add_special_tokens=False)
    reference = backend.encode("Tell me a joke, please.", add_special_tokens=False)
    assert first.ids == reference.ids and first.offsets == reference.offsets
    assert [first.char_to_token(i) for i in range(23)] == [reference.char_to_token(i) for i in range(23)]


def test_a_text_found_whole_survives_the_cache_being_emptied_in_its_own_batch(tiny_tokenizer, monkeypatch):
    backend = _backend(tiny_tokenizer)
    fast = piece_tokenizer(backend)
    known = "Tell me a joke, please."
    fast.encode_batch([known], add_special_tokens=False)  # every piece of it is now cached
    monkeypatch.setattr(fasttok, "CACHE_LIMIT", len(fast._ids) + 2)  # the next new pieces empty the cache
    monkeypatch.setattr(fasttok, "CHECK_FIRST", 0)  # no spot check: read the encodings as a caller would
    batch = [known, "Why did the chicken cross the road? Nobody knows."]
    out = fast.encode_batch(batch, add_special_tokens=False)
    for text, ours in zip(batch, out):
        reference = backend.encode(text, add_special_tokens=False)
        assert ours.ids == reference.ids
        assert [ours.char_to_token(i) for i in range(len(text))] == [reference.char_to_token(i) for i in range(len(text))]
        assert [tuple(ours.token_to_chars(t)) for t in range(len(ours.ids))] == reference.offsets


def test_pieces_learnt_in_one_process_serve_another_unchanged(tiny_tokenizer):
    backend = _backend(tiny_tokenizer)
    learner, user = piece_tokenizer(backend), piece_tokenizer(_backend(tiny_tokenizer))
    batch = ["Tell me a joke, please.", "Why did the chicken cross the road? Nobody knows, café."]
    learner.encode_batch(batch, add_special_tokens=False)
    exported = learner.export_learnt()
    assert {" chicken", " joke", "Tell"} <= set(exported) and learner.export_learnt() == {}  # each piece once
    assert not set(exported) & set(SPECIAL_TOKENS)  # the added tokens are in every cache from the start
    user.import_learnt(exported)
    assert set(exported) <= set(user._ids) and user.export_learnt() == {}  # imported pieces are not re-exported
    calls = []
    user._learn = lambda missing: calls.append(missing)  # nothing left to learn for these texts
    assert_same(user, backend, batch)
    assert calls == []


def test_importing_into_a_full_cache_keeps_it_as_it_is(tiny_tokenizer, monkeypatch):
    learner, user = piece_tokenizer(_backend(tiny_tokenizer)), piece_tokenizer(_backend(tiny_tokenizer))
    learner.encode_batch(["Tell me a joke, please, about the chicken and the road."], add_special_tokens=False)
    monkeypatch.setattr(fasttok, "CACHE_LIMIT", len(user._ids) + 2)
    before = dict(user._ids)
    user.import_learnt(learner.export_learnt())
    assert user._ids == before


def test_encoder_output_is_identical_with_and_without_the_cache(tiny_tokenizer):
    from aligndata.records import Message, PreferencePair, Conversation

    template = resolve_chat_template(tiny_tokenizer, None)
    kwargs = dict(max_length=None, max_prompt_length=None)
    fast, slow = Encoder(tiny_tokenizer, template, **kwargs), Encoder(tiny_tokenizer, template, fast_tokenize=False, **kwargs)
    assert isinstance(fast._backend, PieceTokenizer) and not isinstance(slow._backend, PieceTokenizer)
    conv = Conversation([Message("system", "You are a helpful assistant."), Message("user", "Tell me a joke, café?"),
                         Message("assistant", "Why did the chicken cross the road?"), Message("user", "Thanks 🙂"),
                         Message("assistant", "It is raining in London.")])
    assert fast.encode_sft(conv) == slow.encode_sft(conv)
    pair = PreferencePair([Message("user", "What is two plus two?")], [Message("assistant", "Two plus two is four.")],
                          [Message("assistant", "Five, ’obviously’.")])
    assert fast.encode_dpo(pair) == slow.encode_dpo(pair)


REAL = ["qwen2.5", "gpt-neox-20b", "minimind"]


@pytest.mark.parametrize("name", REAL)
def test_real_byte_level_tokenizers_match_the_library(shared_data, name):
    from aligndata.encode.tokenizer import load_tokenizer

    path = shared_data / "tokenizers" / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    backend = _backend(load_tokenizer(str(path)))
    fast = piece_tokenizer(backend)
    assert fast is not None
    specials = [t.content for t in backend.get_added_tokens_decoder().values()][:6]
    pieces = PIECES[: -3] + specials + ["Hello", " world", "1234567", "’s", "It's", "IT'S", "   \n\n  x"]
    sample = st.lists(st.sampled_from(pieces), max_size=60).map("".join)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(sample, min_size=1, max_size=4))
    def check(batch):
        assert_same(fast, backend, batch)

    check()
    hh = shared_data / "hh-rlhf" / "helpful-base-test.jsonl.gz"
    if hh.exists():  # real dialogue text: curly quotes, emoji, other scripts
        import gzip

        with gzip.open(hh, "rt", encoding="utf-8") as f:
            batch = [json.loads(line)["chosen"] for _, line in zip(range(300), f)]
        assert_same(fast, backend, batch)


@pytest.mark.slow
@pytest.mark.parametrize("files,task", [
    (["llamafactory/dpo_en_demo.json", "llamafactory/dpo_zh_demo.json"], "dpo"),
    (["llamafactory/glaive_toolcall_en_demo.json", "llamafactory/glaive_toolcall_zh_demo.json",
      "fastchat/dummy_conversation.json", "xtuner/openai_sft.jsonl"], "sft"),
])
def test_real_datasets_convert_to_the_same_shards_with_and_without_the_cache(shared_data, tmp_path, files, task):
    """English, Chinese and tool calls through Qwen2.5's template: byte-identical shards."""
    from aligndata.write.convert import convert

    tokenizer = shared_data / "tokenizers" / "qwen2.5"
    paths = [str(shared_data / f) for f in files]
    if not tokenizer.is_dir() or not all(map(lambda p: __import__("os").path.exists(p), paths)):
        pytest.skip("real tokenizer or datasets absent")
    outs = []
    for fast in (True, False):
        out = tmp_path / f"out-{fast}"
        result = convert(paths, out, task, str(tokenizer), on_error="skip", fast_tokenize=fast)
        outs.append((out, result.manifest))
    (a, ma), (b, mb) = outs
    assert ma["counts"] == mb["counts"] and ma["counts"]["kept"] > 0
    assert [s["sha256"] for split in ma["splits"].values() for s in split["files"]] == \
           [s["sha256"] for split in mb["splits"].values() for s in split["files"]]


def test_text_that_never_repeats_a_piece_goes_to_the_library_and_comes_back(tiny_tokenizer):
    import random

    backend = _backend(tiny_tokenizer)
    fast = piece_tokenizer(backend)
    rng = random.Random(0)

    def unique_words(n):  # every word new: the cache only costs here
        return " ".join("".join(rng.choice("bcdfghklmnpqrstvwxz") for _ in range(8)) for _ in range(n))

    for _ in range(fasttok.MISSED_BATCHES + 2):
        assert_same(fast, backend, [unique_words(60) for _ in range(4)])
    assert fast.bypassed > 0 and fast._bypass > 0
    while fast._bypass:
        assert_same(fast, backend, ["It is sunny in Paris today."])
    before = fast.bypassed
    assert_same(fast, backend, ["It is sunny in Paris today."] * 4)  # a repetitive batch: the cache again
    assert fast.bypassed == before and fast._misses == 0
