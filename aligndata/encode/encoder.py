"""Encode canonical records into token ids and loss masks, many records at a time.

Data path, one module per step:

    record -> messages as dicts
      -> rendered with the chat template; trained character spans located     template.py, spans.py
      -> all texts of a batch tokenized ONCE, with character offsets          tokens.py (tokenizer.py, fasttok.py)
      -> trained character spans mapped onto tokens: loss mask / DPO split    mask.py
      -> length policy: drop, or truncate and encode again                    length.py

The Encoder holds what one tokenizer and template need (the renderer, the tokenizer with its piece cache,
the BOS to prepend) and runs these steps over a batch with one tokenizer call per side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aligndata.encode.length import fit_dpo, fit_sft
from aligndata.encode.control import ControlStringCheck
from aligndata.encode.mask import dpo_split, sft_mask
from aligndata.encode.reasoning import reasoning_prompt
from aligndata.encode.results import EncodedDPO, EncodedSFT, EncodeError
from aligndata.encode.spans import RenderedDPO, RenderedSFT, render_dpo, render_sft
from aligndata.encode.template import ChatRenderer, TemplateInfo
from aligndata.encode.tokenizer import TokenizerBackend, bos_to_prepend, offsets_backend, prompt_split_ids
from aligndata.encode.tokens import Tokens, tokenize, tokenize_sharing_prompt
from aligndata.options import check_encoding
from aligndata.records import Conversation, Message, PreferencePair

if TYPE_CHECKING:
    from aligndata.encode.fasttok import PieceTokenizer

class Encoder:
    """Renders and tokenizes records for one tokenizer and template. Build one per worker process."""

    def __init__(
        self,
        tokenizer: Any,
        template: TemplateInfo,
        *,
        max_length: int | None,
        max_prompt_length: int | None,
        length_policy: str = "drop",
        train_on: str = "all",
        reasoning: str = "keep",
        control_strings: str = "refuse",
        fast_tokenize: bool = True,
    ):
        check_encoding(max_length, max_prompt_length, length_policy, train_on, reasoning, control_strings)
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.length_policy = length_policy
        self.train_on = train_on
        self._renderer = ChatRenderer(tokenizer, template)
        self._reasoning = reasoning_prompt(self._renderer, reasoning)
        self._bos = bos_to_prepend(tokenizer)
        self._backend: TokenizerBackend = offsets_backend(tokenizer)
        self._pieces: PieceTokenizer | None = None
        if fast_tokenize:  # same ids and offsets, a piece cache in front of the library (fasttok.py)
            from aligndata.encode.fasttok import piece_tokenizer

            self._pieces = piece_tokenizer(self._backend)
            self._backend = self._pieces or self._backend
        self._split_ids = prompt_split_ids(self._backend)
        self._control = ControlStringCheck.for_backend(self._backend) if control_strings == "refuse" else None

    # ---- public API -------------------------------------------------------------------------

    def learnt_pieces(self) -> dict[str, Any]:
        """Pieces the piece cache learnt since the last call (empty without one); see `add_pieces`."""
        return self._pieces.export_learnt() if self._pieces is not None else {}

    def add_pieces(self, pieces: dict[str, Any]) -> None:
        """Warm the piece cache with `learnt_pieces()` of an Encoder over the same tokenizer elsewhere."""
        if self._pieces is not None and pieces:
            self._pieces.import_learnt(pieces)

    def encode_sft(self, conv: Conversation) -> EncodedSFT:
        return _raise_or_return(self.encode_sft_batch([conv])[0])

    def encode_dpo(self, pair: PreferencePair) -> EncodedDPO:
        return _raise_or_return(self.encode_dpo_batch([pair])[0])

    def encode_sft_batch(self, convs: Sequence[Conversation]) -> list[EncodedSFT | EncodeError]:
        """Encode many conversations with one batched tokenizer call; errors are returned, not raised."""
        messages = [_as_dicts(conv.messages) for conv in convs]
        rendered = [_attempt(self._render_sft, conv.messages, m, conv.tools or None) for m, conv in zip(messages, convs)]
        texts = [r.text for r in rendered if not isinstance(r, EncodeError)]
        tokens = iter(tokenize(self._backend, texts, self._bos))
        return [r if isinstance(r, EncodeError) else _attempt(self._finish_sft, r, next(tokens), m, conv.tools or None)
                for r, m, conv in zip(rendered, messages, convs)]

    def encode_dpo_batch(self, pairs: Sequence[PreferencePair]) -> list[EncodedDPO | EncodeError]:
        """Encode many pairs; prompt+chosen and prompt+rejected of all pairs go through one tokenizer call."""
        prompts = [_as_dicts(pair.prompt) for pair in pairs]
        rendered = [_attempt(self._render_dpo, pair, prompt) for prompt, pair in zip(prompts, pairs)]
        valid = [r for r in rendered if not isinstance(r, EncodeError)]
        chosen = tokenize(self._backend, [r.texts[0] for r in valid], self._bos)
        rejected = tokenize_sharing_prompt(self._backend, self._split_ids, self._bos, valid, chosen)
        tokens = iter(zip(chosen, rejected))
        return [r if isinstance(r, EncodeError) else _attempt(self._finish_dpo, r, *next(tokens), prompt, pair)
                for r, prompt, pair in zip(rendered, prompts, pairs)]

    # ---- one record, before and after the batch's tokenizer call ----------------------------

    def _render_sft(self, originals: list[Message], messages: list[dict], tools: list | None) -> RenderedSFT:
        if self._control is not None:
            self._control.refuse(originals)
        return render_sft(self._renderer, messages, tools, self.train_on, self._reasoning)

    def _render_dpo(self, pair: PreferencePair, prompt: list[dict]) -> RenderedDPO:
        if self._control is not None:
            self._control.refuse([*pair.prompt, *pair.chosen, *pair.rejected])
        return render_dpo(self._renderer, prompt, pair.chosen, pair.rejected, pair.tools or None, self._reasoning)


    def _finish_sft(
        self, rendered: RenderedSFT, tokens: Tokens, messages: list[dict], tools: list | None
    ) -> EncodedSFT:
        return fit_sft(sft_mask(rendered, tokens), messages, lambda shorter: self._encode_sft(shorter, tools),
                       max_length=self.max_length, length_policy=self.length_policy)

    def _finish_dpo(
        self, rendered: RenderedDPO, chosen: Tokens, rejected: Tokens, prompt: list[dict], pair: PreferencePair
    ) -> EncodedDPO:
        tools = pair.tools or None
        return fit_dpo(dpo_split(rendered, chosen, rejected), prompt,
                       lambda shorter: self._encode_dpo(shorter, pair.chosen, pair.rejected, tools),
                       max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                       length_policy=self.length_policy)

    # ---- one record alone: the shorter versions the length policy tries ----------------------

    def _encode_sft(self, messages: list[dict], tools: list | None) -> EncodedSFT:
        rendered = render_sft(self._renderer, messages, tools, self.train_on, self._reasoning)
        return sft_mask(rendered, tokenize(self._backend, [rendered.text], self._bos)[0])

    def _encode_dpo(
        self, prompt: list[dict], chosen: list[Message], rejected: list[Message], tools: list | None
    ) -> EncodedDPO:
        rendered = render_dpo(self._renderer, prompt, chosen, rejected, tools, self._reasoning)
        return dpo_split(rendered, *tokenize(self._backend, list(rendered.texts), self._bos))


def _attempt(step, *args):
    """step(*args), or the EncodeError it raised: a record that fails is that record's result, not the batch's."""
    try:
        return step(*args)
    except EncodeError as exc:
        return exc


def _as_dicts(messages: list[Message]) -> list[dict]:
    return [m.to_json() for m in messages]


def _raise_or_return(result):
    if isinstance(result, EncodeError):
        raise result
    return result
