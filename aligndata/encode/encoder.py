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
from aligndata.encode.control import ControlStringCheck, PlainText
from aligndata.encode.limits import CharBudget, RenderClock, is_panic, per_record, tokenizer_error
from aligndata.encode.mask import dpo_split, sft_mask
from aligndata.encode.reasoning import reasoning_prompt
from aligndata.encode.results import EncodedDPO, EncodedSFT, EncodeError
from aligndata.encode.spans import RenderedDPO, RenderedSFT, render_dpo, render_sft
from aligndata.encode.template import ChatRenderer, TemplateInfo
from aligndata.encode.tokenizer import TokenizerBackend, bos_to_prepend, offsets_backend, prompt_split_ids
from aligndata.encode.tokens import Tokens, tokenize, tokenize_keeping_text, tokenize_sharing_prompt
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
        library = offsets_backend(tokenizer)
        self._backend: TokenizerBackend = library
        self._pieces: PieceTokenizer | None = None
        if fast_tokenize:  # same ids and offsets, a piece cache in front of the library (fasttok.py)
            from aligndata.encode.fasttok import piece_tokenizer

            self._pieces = piece_tokenizer(self._backend)
            self._backend = self._pieces or self._backend
        self._split_ids = prompt_split_ids(self._backend)
        self._budget = CharBudget(tokenizer, max_length, length_policy)
        self._refuse = control_strings == "refuse"
        self._control = ControlStringCheck.for_backend(library) if control_strings != "allow" else None
        self._plain = PlainText(library) if control_strings == "text" else None

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
        """Encode many conversations with one batched tokenizer call; errors are returned, not raised.
        Each record's work is bounded (limits.py)."""
        messages = [_as_dicts(conv.messages) for conv in convs]
        with RenderClock(self.template.source) as clock:
            rendered = [self._budget.check(clock.render(self._checked_sft, conv, m)) for m, conv in zip(messages, convs)]
        tokens = iter(per_record(self._tokenize, [r for r in rendered if not isinstance(r, EncodeError)]))
        return [r if isinstance(r, EncodeError) else _attempt(self._finish_sft, r, next(tokens), m, conv.tools or None)
                for r, m, conv in zip(rendered, messages, convs)]

    def encode_dpo_batch(self, pairs: Sequence[PreferencePair]) -> list[EncodedDPO | EncodeError]:
        """Encode many pairs; prompt+chosen and prompt+rejected of all pairs go through one tokenizer call."""
        prompts = [_as_dicts(pair.prompt) for pair in pairs]
        with RenderClock(self.template.source) as clock:
            rendered = [self._budget.check(clock.render(self._checked_dpo, pair, prompt))
                        for prompt, pair in zip(prompts, pairs)]
        valid = [r for r in rendered if not isinstance(r, EncodeError)]
        tokens = iter(per_record(lambda batch: list(zip(*self._tokenize_pairs(batch))), valid))
        return [r if isinstance(r, EncodeError) else _attempt(self._finish_dpo, r, next(tokens), prompt, pair)
                for r, prompt, pair in zip(rendered, prompts, pairs)]

    # ---- one record, before and after the batch's tokenizer call ----------------------------

    def _checked_sft(self, conv: Conversation, messages: list[dict]) -> RenderedSFT:
        if self._refuse:
            self._control.refuse(conv.messages)
        return self._render_sft(messages, conv.tools or None)

    def _checked_dpo(self, pair: PreferencePair, prompt: list[dict]) -> RenderedDPO:
        if self._refuse:
            self._control.refuse([*pair.prompt, *pair.chosen, *pair.rejected])
        return self._render_dpo(prompt, pair.chosen, pair.rejected, pair.tools or None)

    def _render_sft(self, messages: list[dict], tools: list | None) -> RenderedSFT:
        rendered = render_sft(self._renderer, messages, tools, self.train_on, self._reasoning)
        hidden = self._control.hide(messages) if self._plain is not None else None
        if hidden is not None:  # --control-strings text: where the data's control strings are
            again = render_sft(self._renderer, hidden, tools, self.train_on, self._reasoning)
            rendered.plain = self._control.plain_spans(rendered.text, again.text)
        return rendered

    def _render_dpo(
        self, prompt: list[dict], chosen: list[Message], rejected: list[Message], tools: list | None
    ) -> RenderedDPO:
        rendered = render_dpo(self._renderer, prompt, chosen, rejected, tools, self._reasoning)
        hidden = self._control.hide([*prompt, *_as_dicts(chosen + rejected)]) if self._plain is not None else None
        if hidden is not None:
            n = len(prompt)
            again = render_dpo(self._renderer, hidden[:n], _as_messages(hidden[n:n + len(chosen)]),
                               _as_messages(hidden[n + len(chosen):]), tools, self._reasoning)
            rendered.plain = (self._control.plain_spans(rendered.texts[0], again.texts[0]),
                              self._control.plain_spans(rendered.texts[1], again.texts[1]))
        return rendered

    def _tokenize(self, rendered: list[RenderedSFT]) -> list[Tokens]:
        texts = [r.text for r in rendered]
        if self._plain is None:
            return tokenize(self._backend, texts, self._bos)
        return tokenize_keeping_text(self._backend, self._plain, texts, [r.plain for r in rendered], self._bos)

    def _tokenize_pairs(self, rendered: list[RenderedDPO]) -> tuple[list[Tokens], list[Tokens]]:
        """prompt+chosen and prompt+rejected of every pair; see tokenize_sharing_prompt."""
        if self._plain is None:
            chosen = tokenize(self._backend, [r.texts[0] for r in rendered], self._bos)
            return chosen, tokenize_sharing_prompt(self._backend, self._split_ids, self._bos, rendered, chosen)
        return tuple(tokenize_keeping_text(self._backend, self._plain, [r.texts[side] for r in rendered],
                                           [r.plain[side] if r.plain else None for r in rendered], self._bos)
                     for side in (0, 1))

    def _finish_sft(
        self, rendered: RenderedSFT, tokens: Tokens, messages: list[dict], tools: list | None
    ) -> EncodedSFT:
        return fit_sft(sft_mask(rendered, tokens), messages, lambda shorter: self._encode_sft(shorter, tools),
                       max_length=self.max_length, length_policy=self.length_policy)

    def _finish_dpo(
        self, rendered: RenderedDPO, tokens: tuple[Tokens, Tokens], prompt: list[dict], pair: PreferencePair
    ) -> EncodedDPO:
        tools = pair.tools or None
        return fit_dpo(dpo_split(rendered, *tokens), prompt,
                       lambda shorter: self._encode_dpo(shorter, pair.chosen, pair.rejected, tools),
                       max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                       length_policy=self.length_policy)

    # ---- one record alone: the shorter versions the length policy tries ----------------------

    def _encode_sft(self, messages: list[dict], tools: list | None) -> EncodedSFT:
        rendered = self._render_sft(messages, tools)
        return sft_mask(rendered, self._tokenize([rendered])[0])

    def _encode_dpo(
        self, prompt: list[dict], chosen: list[Message], rejected: list[Message], tools: list | None
    ) -> EncodedDPO:
        rendered = self._render_dpo(prompt, chosen, rejected, tools)
        (chosen_tokens,), (rejected_tokens,) = self._tokenize_pairs([rendered])
        return dpo_split(rendered, chosen_tokens, rejected_tokens)


def _attempt(step, *args):
    """step(*args), or the EncodeError it raised (or that an argument already is, such as a failed
    tokenization), or a tokenizer panic as one: a record that fails is that record's result, not the batch's."""
    failed = next((a for a in args if isinstance(a, EncodeError)), None)
    if failed is not None:
        return failed
    try:
        return step(*args)
    except EncodeError as exc:
        return exc
    except BaseException as exc:
        if is_panic(exc):  # the length policy's re-encoding tokenizes too
            return tokenizer_error(exc)
        raise


def _as_dicts(messages: list[Message]) -> list[dict]:
    return [m.to_json() for m in messages]


def _as_messages(messages: list[dict]) -> list[Message]:
    """Completions back from `_as_dicts` form (render_dpo takes them as Messages)."""
    return [Message(m["role"], m["content"], m.get("name"), m.get("tool_calls"), m.get("tool_call_id"),
                    m.get("reasoning_content")) for m in messages]


def _raise_or_return(result):
    if isinstance(result, EncodeError):
        raise result
    return result
