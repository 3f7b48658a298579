"""The options of `aligndata convert --to sft|dpo`: one frozen object, checked once when it is built.

The CLI builds it from its flags, `aligntrain train` from its config, Python callers from keywords;
`convert` takes it whole. `settings()` is what the manifest records (and what decides whether an
earlier output can stand); `encoder_arguments()` is what every encoding process needs.
Messages name the command-line flag to change: the CLI is where most options come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from aligndata.errors import InputError
from aligndata.read.formats import check_format_option

Task = Literal["sft", "dpo"]
LengthPolicy = Literal["drop", "truncate"]  # drop: records over max_length are dropped (counted); truncate: cut them
TrainOn = Literal["all", "last"]  # sft: train every assistant turn, or only the last one
Reasoning = Literal["keep", "empty"]  # after a generation prompt that opens <think>: the data's reasoning, or none
# A special token's text inside a message: reject the record, keep the text as text, or encode it as the token.
ControlStrings = Literal["refuse", "text", "allow"]
OnError = Literal["fail", "skip"]  # fail: stop at the first invalid record; skip: write it to the rejects file
# Which rules turned records into tokens: raised by a release that changes which records are kept or the
# ids a kept record gets (2: reasoning templates, control strings refused, every Qwen3 turn trained, the
# work bounded per record). It is part of the settings, so an output of older rules is not taken as current.
ENCODING_RULES = 2


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """Everything `convert` is told besides its inputs and output directory (see docs/SHARDS.md)."""

    task: Task
    tokenizer: str  # a tokenizer directory, .gguf file or hub name
    max_length: int | None = None  # longest sequence in tokens (prompt + completion)
    max_prompt_length: int | None = None  # dpo: the prompt's budget when truncating
    length_policy: LengthPolicy = "drop"
    train_on: TrainOn = "all"
    reasoning: Reasoning = "keep"  # see encode/reasoning.py
    control_strings: ControlStrings = "refuse"  # see encode/control.py
    chat_template: str | None = None  # a Jinja file or a built-in name; None: the tokenizer's own
    eval_fraction: float = 0.0  # share of records held out as the eval split (seeded, per record)
    eval_file: str | None = None  # a raw file converted as the eval split instead
    seed: int = 0  # of the eval split
    shard_rows: int = 50_000  # rows per Arrow shard file
    input_format: str = "auto"  # auto (decided per file from all records) or a format name
    on_error: OnError = "fail"
    rejects: str | None = None  # rejects file for on_error skip (default: OUT/rejects.jsonl)
    num_proc: int = 1  # processes that validate and tokenize, this one included
    overwrite: bool = False  # replace an existing output made with different settings
    progress: bool = False
    trust_remote_code: bool = False
    eos_token: str | None = None  # the end-of-sequence token, where the tokenizer defines none
    fast_tokenize: bool = True  # byte-level BPE through the piece cache (same tokens, faster)

    def __post_init__(self) -> None:
        _choose("--to", self.task, Task)
        if not self.tokenizer:
            raise InputError(f"--to {self.task} needs --tokenizer (a tokenizer directory, .gguf file or hub name)")
        check_on_error(self.on_error)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise InputError(f"--eval-fraction {self.eval_fraction}: must be at least 0 and below 1")
        if self.eval_file and self.eval_fraction:
            raise InputError("--eval-fraction and --eval-file exclude each other: pick one way to make the eval split")
        if self.num_proc < 1 or self.shard_rows < 1:
            raise InputError("--num-proc and --shard-rows must be at least 1")
        check_encoding(self.max_length, self.max_prompt_length, self.length_policy, self.train_on, self.reasoning,
                       self.control_strings)
        if self.max_prompt_length is not None and self.task != "dpo":
            raise InputError("--max-prompt-length applies to --to dpo only")
        if self.max_prompt_length is not None and self.length_policy != "truncate":
            raise InputError("--max-prompt-length applies with --length-policy truncate only (drop keeps or drops "
                             "whole pairs, it never cuts a prompt); add --length-policy truncate or leave it out")
        if self.train_on != "all" and self.task != "sft":
            raise InputError(f"--train-on {self.train_on} applies to --to sft only (DPO trains the chosen and rejected "
                             "replies, never the prompt's turns)")
        if self.length_policy == "truncate" and self.max_length is None:
            raise InputError("--length-policy truncate needs --max-length")
        check_format_option(self.input_format)

    def settings(self) -> dict[str, Any]:
        """The manifest's `settings`: what the shards depend on besides the tokenizer, template and inputs.
        (How the work is done, e.g. num_proc or fast_tokenize, changes no byte and is left out.)"""
        return {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "length_policy": self.length_policy, "train_on": self.train_on if self.task == "sft" else None,
                "eval_fraction": self.eval_fraction, "eval_file": self.eval_file is not None, "seed": self.seed,
                "shard_rows": self.shard_rows, "input_format": self.input_format, **self._changed_defaults(),
                "encoding_rules": ENCODING_RULES}

    def _changed_defaults(self) -> dict[str, Any]:
        """Settings added after the manifest's first version, recorded only where they differ from their
        default: an output made with the defaults keeps the manifest (and settings hash) it had before."""
        changed = {"reasoning": (self.reasoning, "keep"), "control_strings": (self.control_strings, "refuse")}
        return {key: value for key, (value, default) in changed.items() if value != default}

    def encoder_arguments(self) -> dict[str, Any]:
        """Keyword arguments of `Encoder` beside the tokenizer and template."""
        return {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "length_policy": self.length_policy, "train_on": self.train_on, "reasoning": self.reasoning,
                "control_strings": self.control_strings, "fast_tokenize": self.fast_tokenize}


def check_encoding(max_length: int | None, max_prompt_length: int | None, length_policy: str, train_on: str,
                   reasoning: str = "keep", control_strings: str = "refuse") -> None:
    """The options the encoder itself takes: the one check behind ConvertOptions and `Encoder`."""
    _choose("--length-policy", length_policy, LengthPolicy)
    _choose("--train-on", train_on, TrainOn)
    _choose("--reasoning", reasoning, Reasoning)
    _choose("--control-strings", control_strings, ControlStrings)
    if max_length is not None and max_length < 2:
        raise InputError(f"--max-length {max_length}: must be at least 2")
    if max_prompt_length is not None:
        if max_prompt_length < 1:
            raise InputError(f"--max-prompt-length {max_prompt_length}: must be at least 1")
        if max_length is not None and max_prompt_length >= max_length:
            raise InputError(f"--max-prompt-length {max_prompt_length} must be below --max-length {max_length}")


def check_on_error(on_error: str) -> None:
    """`--on-error` of every convert target (shards and canonical JSONL alike)."""
    _choose("--on-error", on_error, OnError)


def _choose(flag: str, value: str, allowed: Any) -> None:
    choices = get_args(allowed)
    if value not in choices:
        raise InputError(f"{flag} {value!r}: choose {' or '.join(choices)}")
