"""A tiny byte-level BPE tokenizer, trained in-process: offline, deterministic, a few milliseconds.

    tok = make_tiny_tokenizer()            # in memory
    tok = make_tiny_tokenizer(tmp_path)    # also saved there, so `load_tokenizer(str(tmp_path))` works

Ids 0-6 are the special tokens below (in that order), then the 256 byte symbols, then the merges
learnt from CORPUS. The tokenizer's own chat template is ChatML; `bos_token` is `<|begin_of_text|>`
and `eos_token`/`pad_token` are `<|endoftext|>`. With `add_bos=True` the tokenizer also prepends BOS
when called with `add_special_tokens=True` (like Llama tokenizers), to test BOS handling.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Words the tests use, so that they become single tokens and expected id lists stay short.
CORPUS = [
    "system user assistant tool",
    "You are a helpful assistant.",
    "Hello! How can I help you today?",
    "What is the weather in Paris?",
    "It is sunny in Paris today.",
    "Thanks, and in London?",
    "It is raining in London.",
    "Tell me a joke.",
    "Why did the chicken cross the road?",
    "What is two plus two? Two plus two is four.",
    "get_weather city location arguments name function",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '{"temperature": 21, "unit": "C"}',
    "Human: Assistant: The answer is yes. The answer is no.",
]


def make_tiny_tokenizer(tmp_dir: str | Path | None = None, *, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """Train the tiny tokenizer; with `tmp_dir`, also `save_pretrained` it there."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so that merge counts are clearly ordered (fewer ties to break).
    backend.train_from_iterator(CORPUS * 3, trainer=trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", SPECIAL_TOKENS.index("<|begin_of_text|>"))],
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:3] + SPECIAL_TOKENS[4:],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_TEMPLATE
    if tmp_dir is not None:
        tok.save_pretrained(str(tmp_dir))
    return tok


def trained_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The runs of trained token ids, in order."""
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def trained_text(tok, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    return [tok.decode(run) for run in trained_runs(ids, mask)]
