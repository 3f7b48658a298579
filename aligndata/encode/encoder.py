"""Encode canonical records into token ids and loss masks, then apply the length policy.

Data path: record -> messages as dicts -> rendered with the chat template -> the full text tokenized
ONCE with character offsets -> trained character spans mapped onto tokens -> length policy.

Where the trained span of assistant message i lies is found by rendering, for any template (no
``{% generation %}`` markers needed):

- start: ``len(render(messages[:i], add_generation_prompt=True))``. That rendering must be a textual
  prefix of the full rendering, otherwise the template renders earlier turns differently once later
  turns exist (e.g. it strips reasoning) and the record is refused ("template-mask").
- end: ``render(messages[:i+1])`` must equal the full rendering up to that point, apart from a
  *trailer* the template writes only at the very end of a conversation (Phi-3 appends EOS there).
  The trailer is what is left of the full rendering after its common prefix with the same messages
  rendered with ``add_generation_prompt=True``, widened to whole tokens. Whitespace before the end
  (the newline after ``<|im_end|>``) is not trained; the end-of-turn token itself is.
- both ends must fall on token boundaries of the one tokenization, otherwise "boundary-mismatch".

DPO uses the same ends: the prompt is ``render(prompt, add_generation_prompt=True)``, each completion
runs from there to its end-of-turn token, and ``prompt_ids + chosen_ids`` is by construction a prefix
of the tokenization of the rendered prompt+chosen conversation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2.runtime import new_context

from aligndata.records import Conversation, Message, PreferencePair
from aligndata.encode.tokenizer import TemplateError, TemplateInfo, compile_template

LENGTH_POLICIES = ("drop", "truncate")
TRAIN_ON = ("all", "last")


class EncodeError(Exception):
    """One record cannot be encoded. `reason` is a short kebab-case key that summaries count by."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self):  # keeps both arguments when a worker process sends the error back
        return (type(self), (self.reason, self.message))


@dataclass
class EncodedSFT:
    input_ids: list[int]
    loss_mask: list[int]
    truncated: str | None = None  # None, "prompt" (oldest turns dropped) or "completion" (cut at the right)


@dataclass
class EncodedDPO:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: str | None = None  # None, "prompt" (turns dropped / left-cut) or "completion" (cut at the right)


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
        fast_tokenize: bool = True,
    ):
        if length_policy not in LENGTH_POLICIES:
            raise ValueError(f"length_policy must be one of {', '.join(LENGTH_POLICIES)}, not {length_policy!r}")
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
        for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of tokens, not {value}")
        if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.length_policy = length_policy
        self.train_on = train_on
        self._compiled = compile_template(template.text)
        self._prompt_only_appends = False
        if self._compiled is not None:
            # The variables apply_chat_template passes, over the template's globals.
            self._globals = dict(self._compiled.globals)
            self._context = {**self._globals, **tokenizer.special_tokens_map, "documents": None}
            self._prompt_only_appends = _generation_prompt_only_appends(self._compiled, template.text)
        self._bos_id, self._bos_text = _bos_to_prepend(tokenizer)
        self._backend = _offsets_backend(tokenizer)
        if fast_tokenize:  # same ids and offsets, a piece cache in front of the library (aligndata/fasttok.py)
            from aligndata.encode.fasttok import piece_tokenizer

            self._backend = piece_tokenizer(self._backend) or self._backend
        self._split_ids = _prompt_split_ids(self._backend)

    # ---- public API -------------------------------------------------------------------------

    def learnt_pieces(self) -> dict[str, Any]:
        """Pieces the piece cache learnt since the last call (empty without one); see `add_pieces`."""
        export = getattr(self._backend, "export_learnt", None)
        return export() if export is not None else {}

    def add_pieces(self, pieces: dict[str, Any]) -> None:
        """Warm the piece cache with `learnt_pieces()` of an Encoder over the same tokenizer elsewhere."""
        add = getattr(self._backend, "import_learnt", None)
        if add is not None and pieces:
            add(pieces)

    def encode_sft(self, conv: Conversation) -> EncodedSFT:
        return _raise_or_return(self.encode_sft_batch([conv])[0])

    def encode_dpo(self, pair: PreferencePair) -> EncodedDPO:
        return _raise_or_return(self.encode_dpo_batch([pair])[0])

    def encode_sft_batch(self, convs: Sequence[Conversation]) -> list[EncodedSFT | EncodeError]:
        """Encode many conversations with one batched tokenizer call; errors are returned, not raised."""
        plans: list[_SFTPlan | EncodeError] = []
        for conv in convs:
            try:
                plans.append(self._plan_sft(_as_dicts(conv.messages), conv.tools or None))
            except EncodeError as exc:
                plans.append(exc)
        tokens = iter(self._tokenize([p.text for p in plans if isinstance(p, _SFTPlan)]))
        out: list[EncodedSFT | EncodeError] = []
        for conv, plan in zip(convs, plans):
            if isinstance(plan, EncodeError):
                out.append(plan)
                continue
            try:
                out.append(self._fit_sft(conv, self._finish_sft(plan, next(tokens))))
            except EncodeError as exc:
                out.append(exc)
        return out

    def encode_dpo_batch(self, pairs: Sequence[PreferencePair]) -> list[EncodedDPO | EncodeError]:
        """Encode many pairs; prompt+chosen and prompt+rejected of all pairs go through one tokenizer call."""
        plans: list[_DPOPlan | EncodeError] = []
        for pair in pairs:
            try:
                plans.append(self._plan_dpo(_as_dicts(pair.prompt), pair.chosen, pair.rejected, pair.tools or None))
            except EncodeError as exc:
                plans.append(exc)
        valid = [p for p in plans if isinstance(p, _DPOPlan)]
        chosen_tokens = self._tokenize([p.texts[0] for p in valid])
        rejected_tokens = self._tokenize_sharing_prompt(valid, chosen_tokens)
        tokens = iter(zip(chosen_tokens, rejected_tokens))
        out: list[EncodedDPO | EncodeError] = []
        for pair, plan in zip(pairs, plans):
            if isinstance(plan, EncodeError):
                out.append(plan)
                continue
            chosen, rejected = next(tokens)
            try:
                out.append(self._fit_dpo(pair, self._finish_dpo(plan, chosen, rejected)))
            except EncodeError as exc:
                out.append(exc)
        return out

    # ---- rendering and tokenizing -----------------------------------------------------------

    def _render(self, messages: list[dict], tools: list | None, add_generation_prompt: bool) -> str:
        try:
            if self._compiled is not None:
                # What Template.render does, minus re-merging the template's globals on every call.
                context = dict(self._context)
                context["messages"] = messages
                context["tools"] = tools
                context["add_generation_prompt"] = add_generation_prompt
                template = self._compiled
                state = new_context(template.environment, template.name, template.blocks, context, True, self._globals)
                return "".join(template.root_render_func(state))
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.template.text,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except Exception as exc:  # the template is a program: anything it raises is about this record
            raise EncodeError("template-error", f"the chat template failed on this record: {exc}") from exc

    def _render_with_generation_prompt(self, messages: list[dict], tools: list | None) -> str | None:
        """The comparison rendering that reveals a trailer; None where there cannot be one."""
        if self._prompt_only_appends:
            return None
        try:
            return self._render(messages, tools, True)
        except EncodeError:
            return None  # some templates refuse a generation prompt after an assistant turn: no trailer then

    def _tokenize(self, texts: list[str]) -> list[_Tokens]:
        if not texts:
            return []
        encodings = self._backend.encode_batch(texts, add_special_tokens=False)
        bos_id, bos_text = self._bos_id, self._bos_text
        return [
            _Tokens(text, enc, bos_id if bos_id is not None and not text.startswith(bos_text) else None)
            for text, enc in zip(texts, encodings)
        ]

    def _tokenize_sharing_prompt(self, plans: list["_DPOPlan"], chosen: list["_Tokens"]) -> list["_Tokens"]:
        """Tokenize prompt+rejected, re-using the prompt tokens of prompt+chosen up to the prompt's last
        added (special) token.

        The tokenizers library splits its input on added tokens before normalizing, pre-tokenizing and
        running the model, and tokenizes the pieces independently: so tokenize(A + S + B) equals
        tokenize(A) + tokenize(S + B) when S is an added token. The rejected side therefore only needs
        S + the rest of the prompt + the completion tokenized (starting the tail *with* S keeps
        position-dependent rules such as Metaspace's prepend-first identical). Tokenizers with
        `single_word` added tokens (whose matching looks at the neighbouring characters) take the full path.
        """
        tails: list[tuple[int, int]] = []  # (split char, prompt tokens re-used) per plan
        texts = []
        for plan, tokens in zip(plans, chosen):
            split, reused = (0, 0)
            if self._split_ids is not None:
                split, reused = self._prompt_split(plan, tokens)
            tails.append((split, reused))
            texts.append(plan.texts[1][split:])
        if not texts:
            return []
        encodings = self._backend.encode_batch(texts, add_special_tokens=False)
        out = []
        for plan, tokens, (split, reused), encoding in zip(plans, chosen, tails, encodings):
            if reused == 0:
                out.append(_Tokens(plan.texts[1], encoding, self._bos_id
                                   if self._bos_id is not None and not plan.texts[1].startswith(self._bos_text) else None))
            else:
                out.append(_SharedTokens(plan.texts[1], tokens, split, reused, encoding))
        return out

    def _prompt_split(self, plan: "_DPOPlan", tokens: "_Tokens") -> tuple[int, int]:
        """(char, token index) where the last added token inside the prompt starts; (0, 0) if none."""
        end = tokens.token_at(plan.prompt_length - 1) if plan.prompt_length else None
        if end is None:
            return 0, 0
        ids = tokens.ids
        for index in range(end, tokens.shift - 1, -1):
            if ids[index] in self._split_ids:
                start = tokens.chars(index)[0]
                if plan.texts[1][:start] != plan.texts[0][:start]:
                    return 0, 0
                return start, index
        return 0, 0

    # ---- SFT --------------------------------------------------------------------------------

    def _plan_sft(self, messages: list[dict], tools: list | None) -> _SFTPlan:
        full = self._render(messages, tools, False)
        targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not targets:
            raise EncodeError("no-trained-tokens", "the conversation has no assistant message to train on")
        if self.train_on == "last":
            targets = targets[-1:]
        last = len(messages) - 1
        turns = []
        for i in targets:
            prefix = self._render(messages[:i], tools, True)
            if not full.startswith(prefix):
                raise EncodeError(
                    "template-mask",
                    f"assistant message {i}: the conversation before it, rendered with the generation prompt, "
                    f"is not a prefix of the full rendering ({_first_difference(prefix, full)}); the template "
                    "renders earlier turns differently once later turns exist, so the trained span cannot be located",
                )
            upto = None if i == last else self._render(messages[: i + 1], tools, False)
            turns.append((i, len(prefix), upto))
        return _SFTPlan(full, self._render_with_generation_prompt(messages, tools), turns)

    def _finish_sft(self, plan: _SFTPlan, tokens: _Tokens) -> EncodedSFT:
        trailer = _trailer(tokens, plan.with_generation_prompt)
        mask = [0] * len(tokens.ids)
        for i, start, upto in plan.turns:
            body_end = _turn_end(tokens.text, trailer, upto, i)
            first, stop = _token_span(tokens, start, body_end, f"assistant message {i}")
            mask[first:stop] = [1] * (stop - first)
        return EncodedSFT(tokens.ids, mask)

    def _fit_sft(self, conv: Conversation, enc: EncodedSFT) -> EncodedSFT:
        limit = self.max_length
        if limit is not None and len(enc.input_ids) > limit:
            if self.length_policy == "drop":
                raise EncodeError("too-long", f"{len(enc.input_ids)} tokens > max_length {limit}")
            enc = self._truncate_sft(conv, limit)
        if not any(enc.loss_mask):
            raise EncodeError("no-trained-tokens", "no token of this conversation is trained")
        return enc

    def _truncate_sft(self, conv: Conversation, limit: int) -> EncodedSFT:
        """Drop the oldest exchanges (keeping the system message) until it fits, else cut at the right."""
        messages, tools = _as_dicts(conv.messages), conv.tools or None
        enc = None
        for shorter in _shorter_conversations(messages):
            enc = self._encode_sft_messages(shorter, tools)
            enc.truncated = "prompt"
            if len(enc.input_ids) <= limit:
                return enc
        if enc is None:  # nothing to drop
            enc = self._encode_sft_messages(messages, tools)
        return EncodedSFT(enc.input_ids[:limit], enc.loss_mask[:limit], "completion")

    def _encode_sft_messages(self, messages: list[dict], tools: list | None) -> EncodedSFT:
        plan = self._plan_sft(messages, tools)
        return self._finish_sft(plan, self._tokenize([plan.text])[0])

    # ---- DPO --------------------------------------------------------------------------------

    def _plan_dpo(
        self, prompt: list[dict], chosen: list[Message], rejected: list[Message], tools: list | None
    ) -> _DPOPlan:
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            if len(completion) != 1:
                raise EncodeError(
                    "multi-message-completion" if completion else "empty-completion",
                    f"the {name} completion has {len(completion)} messages; DPO needs exactly one assistant message",
                )
            if completion[0].role != "assistant":
                raise EncodeError(
                    "completion-role", f"the {name} completion is a {completion[0].role!r} message, not 'assistant'"
                )
        prompt_text = self._render(prompt, tools, True)
        texts, with_prompts = [], []
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            messages = [*prompt, completion[0].to_json()]
            full = self._render(messages, tools, False)
            if not full.startswith(prompt_text):
                raise EncodeError(
                    "boundary-mismatch",
                    f"the rendered prompt is not a prefix of the rendered prompt+{name} conversation "
                    f"({_first_difference(prompt_text, full)}); the template renders the prompt differently "
                    "once a completion follows",
                )
            texts.append(full)
            with_prompts.append(self._render_with_generation_prompt(messages, tools))
        return _DPOPlan(len(prompt_text), (texts[0], texts[1]), (with_prompts[0], with_prompts[1]))

    def _finish_dpo(self, plan: _DPOPlan, chosen: _Tokens, rejected: _Tokens) -> EncodedDPO:
        cut = plan.prompt_length
        spans = []
        for name, tokens, with_prompt in zip(("chosen", "rejected"), (chosen, rejected), plan.with_generation_prompt):
            body_end = len(tokens.text) - len(_trailer(tokens, with_prompt))
            spans.append(_token_span(tokens, cut, body_end, f"the {name} completion"))
        (c_first, c_stop), (r_first, r_stop) = spans
        prompt_ids = chosen.ids[:c_first]
        if rejected.ids[:r_first] != prompt_ids:
            raise EncodeError(
                "boundary-mismatch",
                "the prompt tokenizes differently before the chosen and before the rejected completion "
                f"({_first_id_difference(prompt_ids, rejected.ids[:r_first])})",
            )
        return EncodedDPO(prompt_ids, chosen.ids[c_first:c_stop], rejected.ids[r_first:r_stop])

    def _fit_dpo(self, pair: PreferencePair, enc: EncodedDPO) -> EncodedDPO:
        limit = self.max_length
        if limit is not None and _dpo_length(enc) > limit:
            if self.length_policy == "drop":
                raise EncodeError(
                    "too-long",
                    f"prompt {len(enc.prompt_ids)} + longest completion "
                    f"{max(len(enc.chosen_ids), len(enc.rejected_ids))} tokens > max_length {limit}",
                )
            enc = self._truncate_dpo(pair, enc, limit)
        if not enc.chosen_ids or not enc.rejected_ids:
            raise EncodeError("no-trained-tokens", "a completion has no tokens")
        return enc

    def _truncate_dpo(self, pair: PreferencePair, enc: EncodedDPO, limit: int) -> EncodedDPO:
        """As the original DPO code: prompt to max_prompt_length (oldest turns first), then cut completions."""
        prompt_limit = self.max_prompt_length
        if prompt_limit is not None and len(enc.prompt_ids) > prompt_limit:
            tools = pair.tools or None
            for shorter in _shorter_prompts(_as_dicts(pair.prompt)):
                plan = self._plan_dpo(shorter, pair.chosen, pair.rejected, tools)
                enc = self._finish_dpo(plan, *self._tokenize(list(plan.texts)))
                if len(enc.prompt_ids) <= prompt_limit:
                    break
            if len(enc.prompt_ids) > prompt_limit:
                enc.prompt_ids = enc.prompt_ids[-prompt_limit:]
            enc.truncated = "prompt"
        if _dpo_length(enc) > limit:
            room = limit - len(enc.prompt_ids)
            if room <= 0:
                raise EncodeError(
                    "too-long",
                    f"the prompt alone has {len(enc.prompt_ids)} tokens >= max_length {limit}; "
                    "set max_prompt_length to truncate it",
                )
            enc.chosen_ids = enc.chosen_ids[:room]
            enc.rejected_ids = enc.rejected_ids[:room]
            enc.truncated = "completion"
        return enc


# ---- helpers ----------------------------------------------------------------------------------


@dataclass
class _SFTPlan:
    text: str  # the full conversation, rendered without a generation prompt
    with_generation_prompt: str | None  # the same with one (None when the template refuses)
    turns: list[tuple[int, int, str | None]]  # (message index, start char, rendering up to it; None if last)


@dataclass
class _DPOPlan:
    prompt_length: int  # chars of the prompt rendered with the generation prompt
    texts: tuple[str, str]  # prompt+chosen and prompt+rejected, rendered
    with_generation_prompt: tuple[str | None, str | None]


class _Tokens:
    """One rendered text, tokenized once; `ids` has the tokenizer's BOS in front when it wants one."""

    __slots__ = ("text", "ids", "_encoding", "_shift")

    @property
    def shift(self) -> int:
        return self._shift

    def __init__(self, text: str, encoding: Any, bos_id: int | None):
        self.text = text
        self._encoding = encoding
        if bos_id is None:
            self.ids, self._shift = encoding.ids, 0
        else:
            self.ids, self._shift = [bos_id, *encoding.ids], 1

    def token_at(self, pos: int) -> int | None:
        index = self._encoding.char_to_token(pos)
        return None if index is None else index + self._shift

    def chars(self, index: int) -> tuple[int, int]:
        return (0, 0) if index < self._shift else tuple(self._encoding.token_to_chars(index - self._shift))

    def boundary(self, pos: int) -> int | None:
        """Index of the first token at or after char `pos` when `pos` lies between two tokens, else None."""
        if pos >= len(self.text):
            return len(self.ids)
        index = self.token_at(pos)
        if index is None or self.chars(index)[0] != pos:
            return None
        return index

    def describe(self, pos: int) -> str:
        around = f"{self.text[max(0, pos - 30):pos]!r} | {self.text[pos:pos + 30]!r}"
        index = self.token_at(pos)
        if index is None:
            return f"char {pos} ({around}) belongs to no token"
        start, end = self.chars(index)
        return f"token {index} {self.text[start:end]!r} (chars {start}-{end}) straddles char {pos} ({around})"


class _SharedTokens(_Tokens):
    """prompt+rejected as the chosen side's tokens before char `split` plus the tail tokenized from there."""

    __slots__ = ("_prefix", "_split", "_reused")

    def __init__(self, text: str, prefix: _Tokens, split: int, reused: int, tail: Any):
        self.text = text
        self._prefix, self._split, self._reused = prefix, split, reused
        self._encoding = tail
        self._shift = prefix.shift
        self.ids = prefix.ids[:reused] + tail.ids

    def token_at(self, pos: int) -> int | None:
        if pos < self._split:
            return self._prefix.token_at(pos)
        index = self._encoding.char_to_token(pos - self._split)
        return None if index is None else index + self._reused

    def chars(self, index: int) -> tuple[int, int]:
        if index < self._reused:
            return self._prefix.chars(index)
        start, end = self._encoding.token_to_chars(index - self._reused)
        return start + self._split, end + self._split


def _prompt_split_ids(backend: Any) -> frozenset[int] | None:
    """Ids of added tokens the input is split on; None when sharing prompt tokens would not be exact."""
    added = backend.get_added_tokens_decoder()
    if not added or any(getattr(tok, "single_word", False) for tok in added.values()):
        return None
    return frozenset(added)


def _token_span(tokens: _Tokens, start: int, body_end: int, what: str) -> tuple[int, int]:
    """Token indices [first, stop) of chars [start, body_end) less trailing whitespace; both must be boundaries."""
    first = tokens.boundary(start)
    if first is None and tokens.token_at(start) is None and not tokens.text[start:start + 1].isspace():
        raise EncodeError(
            "boundary-mismatch",
            f"the start of {what} is not a token boundary: {tokens.describe(start)}; the tokenizer turns this "
            "text into no tokens at all (its normalizer or pre-tokenizer drops it): check that it is the "
            "tokenizer you meant and that it loads as intended",
        )
    if first is None:
        raise EncodeError(
            "boundary-mismatch",
            f"the start of {what} is not a token boundary: {tokens.describe(start)}; the generation prompt and "
            "the text after it merge into one token, so the prompt tokenized alone would differ",
        )
    end = _strip_end(tokens.text, start, body_end)
    stop = tokens.boundary(end)
    if stop is None:
        # An end-of-turn token declared with rstrip (Phi-3's <|end|>) swallows the newline after it: the
        # token is still the end-of-turn token, so it is trained whole.
        index = tokens.token_at(end)
        if index is not None:
            token_start, token_end = tokens.chars(index)
            if start <= token_start < end and token_end <= body_end and tokens.text[end:token_end].isspace():
                stop = index + 1
    if stop is None:
        raise EncodeError("boundary-mismatch", f"the end of {what} is not a token boundary: {tokens.describe(end)}")
    return first, stop


def _trailer(tokens: _Tokens, with_generation_prompt: str | None) -> str:
    """What the template writes only at the end of a conversation (e.g. Phi-3's EOS), in whole tokens."""
    full = tokens.text
    if with_generation_prompt is None:
        return ""
    common = _common_prefix_length(full, with_generation_prompt)
    if common >= len(full):
        return ""
    index = tokens.token_at(common)
    start = common if index is None else min(common, tokens.chars(index)[0])
    return full[start:]


def _turn_end(full: str, trailer: str, upto: str | None, index: int) -> int:
    """Char where assistant message `index` ends in `full` (its end-of-turn included, whitespace not stripped)."""
    if upto is None:  # the last message
        return len(full) - len(trailer)
    body = upto[: len(upto) - len(trailer)] if trailer and upto.endswith(trailer) else upto
    if not full.startswith(body):
        raise EncodeError(
            "template-mask",
            f"assistant message {index}: rendered as the last message it differs from its rendering inside the "
            f"full conversation ({_first_difference(body, full)}); the template renders a turn differently once "
            "later turns exist, so the trained span cannot be located",
        )
    return len(body)


def _generation_prompt_only_appends(compiled: Any, text: str) -> bool:
    """True when the template's last statement is `{% if add_generation_prompt %}...{% endif %}` (no else)
    and nothing else reads the flag: the rendering without the prompt is then always a prefix of the one
    with it, so there is no trailer and the comparison rendering can be skipped."""
    from jinja2 import nodes

    body = compiled.environment.parse(text).body
    while body and isinstance(body[-1], nodes.Output) and not any(
        not isinstance(n, nodes.TemplateData) or n.data for n in body[-1].nodes
    ):
        body = body[:-1]  # empty output nodes render nothing
    if not body or not isinstance(body[-1], nodes.If):
        return False
    last = body[-1]
    test = last.test
    if last.elif_ or last.else_ or not (isinstance(test, nodes.Name) and test.name == "add_generation_prompt"):
        return False
    uses = [n for stmt in body for n in stmt.find_all(nodes.Name) if n.name == "add_generation_prompt"]
    return len(uses) == 1


def _strip_end(text: str, start: int, end: int) -> int:
    """Move `end` back over whitespace (the newline a template puts after its end-of-turn token)."""
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


def _common_prefix_length(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    low, high = 0, min(len(a), len(b))  # a[:low] == b[:low] holds; a[:high+1] differs somewhere
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _first_difference(a: str, b: str) -> str:
    at = _common_prefix_length(a, b)
    return f"first difference at char {at}: {a[at:at + 40]!r} vs {b[at:at + 40]!r}"


def _first_id_difference(a: list[int], b: list[int]) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{len(a)} vs {len(b)} tokens, first difference at token {at}: {a[at:at + 5]} vs {b[at:at + 5]}"


def _dpo_length(enc: EncodedDPO) -> int:
    return len(enc.prompt_ids) + max(len(enc.chosen_ids), len(enc.rejected_ids))


def _shorter_conversations(messages: list[dict]) -> Iterator[list[dict]]:
    """The conversation starting at each later user message (oldest dropped first), system message kept."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    last_assistant = max((j for j, m in enumerate(body) if m["role"] == "assistant"), default=-1)
    for j, message in enumerate(body):
        if 0 < j < last_assistant and message["role"] == "user":
            yield head + body[j:]


def _shorter_prompts(messages: list[dict]) -> Iterator[list[dict]]:
    """The prompt starting at each later user message, system kept; finally the last exchange without it."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    starts = [j for j, m in enumerate(body) if j > 0 and m["role"] == "user"]
    for j in starts:
        yield head + body[j:]
    if head:
        yield body[starts[-1]:] if starts else body


def _as_dicts(messages: list[Message]) -> list[dict]:
    return [m.to_json() for m in messages]


def _raise_or_return(result):
    if isinstance(result, EncodeError):
        raise result
    return result


def _bos_to_prepend(tokenizer: Any) -> tuple[int | None, str | None]:
    """The BOS the tokenizer adds with add_special_tokens=True; we add it only where the template did not."""
    bos_id = tokenizer.bos_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if bos_id is None or backend is None:
        return None, None
    with_specials = backend.encode("a", add_special_tokens=True).ids
    without = backend.encode("a", add_special_tokens=False).ids
    if with_specials[:1] == [bos_id] and without[:1] != [bos_id]:
        return bos_id, tokenizer.bos_token
    return None, None


def _offsets_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer to call directly: untrimmed offsets, no truncation or padding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        raise TemplateError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer; aligndata needs a fast one "
            "(the `tokenizers` library) for character offsets"
        )
    split_special = bool(getattr(tokenizer, "split_special_tokens", False))
    post = backend.post_processor
    trims = post is not None and '"trim_offsets":true' in post.__getstate__().decode("utf-8").replace(" ", "")
    if not trims and backend.truncation is None and backend.padding is None:
        if backend.encode_special_tokens == split_special:
            return backend
    from tokenizers import Tokenizer

    state = json.loads(backend.to_str())
    state["truncation"] = None
    state["padding"] = None
    _untrim(state.get("post_processor"))
    copy = Tokenizer.from_str(json.dumps(state))
    copy.encode_special_tokens = split_special
    return copy


def _untrim(node: Any) -> None:
    # ByteLevel (and RoBERTa) post-processors trim the leading space off offsets by default, which would
    # hide a token that straddles a boundary; ids do not change.
    if isinstance(node, dict):
        if "trim_offsets" in node:
            node["trim_offsets"] = False
        for value in node.values():
            _untrim(value)
    elif isinstance(node, list):
        for value in node:
            _untrim(value)
