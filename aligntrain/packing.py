"""Padding-free batches: every sequence of a micro-batch back to back in one row, attention per sequence.

A padded batch of log-normal lengths spends most of its FLOPs on padding (rows padded to the longest
of 2 x pairs sequences). Here the micro-batch is one stream of real tokens, `input_ids [1, T]`, with
position ids restarting per sequence, and the attention of each layer runs on segments of the stream:

    SFT, and DPO without prompt sharing:   [seq 0][seq 1] ...           each segment causal on itself
    DPO sharing the prompt (default):      [prompt 0, chosen 0, rejected 0][prompt 1, ...] ...
        query segment [prompt, chosen]  -> keys [prompt, chosen]         (causal)
        query segment [rejected]        -> keys [prompt, rejected]       (causal, aligned to the end)

so the prompt is forwarded once per pair and both completions attend to it, not to each other. The
rejected tokens sit at positions P.. as they would after their prompt, so every log-prob equals the
padded path's (tests/aligntrain/test_train_packing.py checks it to 1e-5 in float32).

The attention function is registered with transformers' AttentionInterface under PACKED_ATTENTION and
receives the segment layout through the model's forward kwargs (transformers hands them to every
attention call). On CUDA in bf16/fp16 it runs flash attention over the segments (aten's varlen
kernels); elsewhere SDPA per segment, which is also the CPU path the tests cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PACKED_ATTENTION = "aligntrain_packed"
PADDED, PACKED, SHARED = "padded", "packed", "shared-prompt"  # batch layouts (data.collate builds each)

# keyword arguments a model's attention may pass that this path does not implement
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux")


@dataclass
class Segments:
    """The attention layout of one stream (a forward kwarg, so it reaches every attention call).

    cu_q / cu_k: int32 [S + 1] offsets of each query segment in the stream and of its keys in the key
    stream; key_index: [Tk] stream position of each key (None when the keys are the stream itself);
    max_q / max_k: the longest segments; bounds: the same offsets as Python lists (the per-segment path
    slices with them without a device sync)."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    key_index: torch.Tensor | None
    max_q: int
    max_k: int
    bounds_q: list[int]
    bounds_k: list[int]

    def to(self, device) -> "Segments":
        index = None if self.key_index is None else self.key_index.to(device, non_blocking=True)
        return Segments(self.cu_q.to(device, non_blocking=True), self.cu_k.to(device, non_blocking=True), index,
                        self.max_q, self.max_k, self.bounds_q, self.bounds_k)


def register(for_compile: bool = False) -> None:
    """Make PACKED_ATTENTION a valid attn_implementation (idempotent). `for_compile` (compiling.py, before
    any layer is compiled): the registered function runs eagerly inside compiled layers, so `segments`
    stays a runtime value instead of a compile-time constant; outside compiled code that changes nothing.
    It is not the default, because importing torch's compiler costs seconds at every start."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, torch.compiler.disable(packed_attention) if for_compile
                                else packed_attention)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, segments=None, **kwargs):
    """transformers' attention signature: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None).
    A call without `segments` is SDPA with what transformers passes, which for an attention it has no mask
    builder for is no mask: causal only. That is exact for right-padded batches (data.collate's; a padding
    key only ever follows the real queries), and is what a reference given the padded layout computes."""
    if segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    window = kwargs.get("sliding_window")
    if window is not None and segments.max_k <= window:  # no sequence reaches past the window: plain causal
        kwargs["sliding_window"] = None
    used = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if used:  # padding_free: null never picks such a model (packing_unavailable); this is an explicit true
        raise RuntimeError(f"padding-free attention does not implement {', '.join(used)} (used by this model); "
                           "set padding_free: false")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, D]
    device = q.device.type
    if torch.is_autocast_enabled(device):  # float32 RoPE tables promote q and k; SDPA would cast them back itself
        q, k, v = (x.to(torch.get_autocast_dtype(device)) for x in (q, k, v))
    if segments.key_index is not None:
        k, v = k.index_select(0, segments.key_index), v.index_select(0, segments.key_index)
    return segment_attention(q, k, v, segments, scaling).unsqueeze(0), None


def segment_attention(q, k, v, segments: Segments, scale=None):
    """Causal attention of each query segment over its key segment, aligned to the end of the keys; q [Tq, H, D],
    k/v [Tk, Hkv, D] (keys already gathered) -> [Tq, H, D]. Flash attention on CUDA in bf16/fp16, SDPA per
    segment otherwise."""
    if _flash_applies(q):
        return _varlen_flash(q, k, v, segments, scale)
    return _per_segment(q, k, v, segments, scale)


class _FlashVarlen(torch.autograd.Function):
    """Flash attention over segments (aten's varlen kernels), causal, aligned to the end of each key segment:
    a query segment shorter than its keys (a rejected completion) sees the keys before it (its prompt) in
    full. Called directly rather than through torch.nn.attention.varlen, whose dispatch may pick cuDNN
    (which plans on the host for every new set of lengths). Grouped-query heads need no copies: the kernel
    reads each key/value head for its group of query heads and sums their gradients."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng, unused)
        ctx.sizes = max_q, max_k, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu_q, cu_k, rng, unused = ctx.saved_tensors
        max_q, max_k, scale = ctx.sizes
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, True, rng, unused, scale=scale)
        return dq, dk, dv, None, None, None, None, None


def _flash_applies(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


def _varlen_flash(q, k, v, s: Segments, scale):
    return _FlashVarlen.apply(q.contiguous(), k.contiguous(), v.contiguous(), s.cu_q, s.cu_k, s.max_q, s.max_k, scale)


def _per_segment(q, k, v, s: Segments, scale):
    groups = q.shape[1] // k.shape[1]
    out = []
    for i in range(len(s.bounds_q) - 1):
        qq = q[s.bounds_q[i]:s.bounds_q[i + 1]].transpose(0, 1)  # [H, Lq, D]
        kk, vv = (x[s.bounds_k[i]:s.bounds_k[i + 1]].transpose(0, 1) for x in (k, v))
        if groups > 1:
            kk, vv = kk.repeat_interleave(groups, dim=0), vv.repeat_interleave(groups, dim=0)
        lq, lk = qq.shape[1], kk.shape[1]
        if lq == 0:
            continue
        if lq == lk:
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale)
        else:  # causal aligned to the end of the keys
            mask = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + (lk - lq)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


# -- when the path applies ------------------------------------------------------------------------

def choose_layout(cfg, lm) -> tuple[str, str | None]:
    """The batch layout of a run and, when it is not what padding_free asked for, a note saying why.
    padding_free: null (auto) packs whenever the model allows it; true insists (a ConfigError otherwise)."""
    from .config import ConfigError

    if cfg.padding_free is False:
        return PADDED, None
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # under peft
    reason = packing_unavailable(base, cfg.model.attn_implementation, cfg.max_length)
    if reason is not None:
        if cfg.padding_free:
            raise ConfigError(f"padding_free: true, but {reason}; set padding_free: false (or leave it unset)")
        return PADDED, f"padded batches: {reason}"
    return (SHARED if cfg.task == "dpo" and cfg.share_prompt else PACKED), None


def use_packed_attention(lm) -> None:
    """Route the model's attention through packed_attention (padded calls still reach SDPA through it)."""
    from transformers import AttentionInterface

    if PACKED_ATTENTION not in AttentionInterface():  # compiling.py may have registered its eager-under-compile form
        register()
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    base.set_attn_implementation(PACKED_ATTENTION)


def packing_unavailable(lm, attn_implementation: str, max_length: int | None) -> str | None:
    """Why a model cannot take padding-free batches of sequences up to `max_length` tokens (None when it can).
    A sliding window matters only when a sequence can be longer than it."""
    config = lm.config
    if attn_implementation != "sdpa":
        return f"model.attn_implementation is {attn_implementation}"
    if not getattr(lm, "_supports_attention_backend", False):
        return f"{type(lm).__name__} does not use transformers' attention interface"
    if getattr(config, "attn_logit_softcapping", None):
        return "the model soft-caps attention logits"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False and (max_length is None or max_length > window):
        layer_types = getattr(config, "layer_types", None) or ["sliding_attention"]
        if "sliding_attention" in layer_types:
            return f"the model uses sliding-window attention ({window} tokens) and max_length is {max_length}"
    if getattr(config, "model_type", "") == "gpt_oss":
        return "the model's attention has sink logits"
    return None


# -- building a stream ----------------------------------------------------------------------------

def pack(sequences: list[np.ndarray], trained: list[np.ndarray], prompts: list[int] | None = None) -> dict:
    """The padding-free micro-batch of `sequences` (token id arrays) whose tokens `trained` (bool arrays) are
    trained. `prompts` (DPO sharing the prompt): sequences are [chosen 0..B-1, rejected 0..B-1], pair i's
    prompt is its first prompts[i] tokens, forwarded once.

    Returns tensors for SequenceLogps.forward: input_ids / position_ids [1, T]; predict [N] (the stream
    position whose output predicts each trained token), targets [N]; slots [S, longest] bool (row s's first
    n_s entries are sequence s's N-order trained tokens); lengths [S] (tokens of each sequence, the prompt
    included); segments (Segments, CPU)."""
    n_seq = len(sequences)
    if prompts is None:
        order = [(s, 0, len(sequences[s])) for s in range(n_seq)]  # (sequence, from, to) chunks of the stream
    else:
        b = n_seq // 2
        order = []
        for i in range(b):
            p = prompts[i]
            order += [(i, 0, len(sequences[i])), (b + i, p, len(sequences[b + i]))]
    stream_ids, stream_pos, where = [], [], [None] * n_seq  # where[s]: stream position of each token of s
    offset = 0
    for s, lo, hi in order:
        ids = sequences[s]
        stream_ids.append(ids[lo:hi])
        stream_pos.append(np.arange(lo, hi))
        own = np.arange(offset, offset + hi - lo)
        where[s] = own if lo == 0 else np.concatenate([where[s - n_seq // 2][:lo], own])
        offset += hi - lo
    predict, targets, counts = [], [], []
    for s in range(n_seq):
        t = np.flatnonzero(trained[s][1:]) + 1  # token 0 has no context: never trained
        predict.append(where[s][t - 1])
        targets.append(sequences[s][t])
        counts.append(len(t))
    if prompts is None:
        cu_q = np.concatenate([[0], np.cumsum([hi - lo for _, lo, hi in order])])
        cu_k, key_index = cu_q, None
    else:
        q_len = [hi - lo for _, lo, hi in order]
        k_len = [hi for _, _, hi in order]
        key_index = np.concatenate([where[s] for s, _, _ in order])
        cu_q, cu_k = np.concatenate([[0], np.cumsum(q_len)]), np.concatenate([[0], np.cumsum(k_len)])
    longest = max(counts) if counts else 0
    slots = np.arange(max(longest, 1))[None, :] < np.asarray(counts)[:, None]
    segments = Segments(torch.from_numpy(cu_q.astype(np.int32)), torch.from_numpy(cu_k.astype(np.int32)),
                        None if key_index is None else torch.from_numpy(key_index.astype(np.int64)),
                        int(np.diff(cu_q).max()), int(np.diff(cu_k).max()), cu_q.tolist(), cu_k.tolist())
    return {
        "input_ids": torch.from_numpy(np.concatenate(stream_ids).astype(np.int64))[None],
        "position_ids": torch.from_numpy(np.concatenate(stream_pos).astype(np.int64))[None],
        "predict": torch.from_numpy(np.concatenate(predict).astype(np.int64)),
        "targets": torch.from_numpy(np.concatenate(targets).astype(np.int64)),
        "slots": torch.from_numpy(slots),
        "lengths": torch.tensor([len(x) for x in sequences], dtype=torch.long),
        "segments": segments,
    }
