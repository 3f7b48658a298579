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
kernels); elsewhere exact attention per segment (a custom operator), which is also the CPU path the tests
cover. Both trace into a compiled decoder layer without a graph break (segment_attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import flash4

PACKED_ATTENTION = "aligntrain_packed"
PADDED, PACKED, SHARED = "padded", "packed", "shared-prompt"  # batch layouts (data.collate builds each)

# keyword arguments a model's attention may pass that this path does not implement
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux")


@dataclass
class Segments:
    """The attention layout of one stream (a forward kwarg, so it reaches every attention call).

    cu_q / cu_k: int32 [S + 1] offsets of each query segment in the stream and of its keys in the key
    stream; key_index: [Tk] stream position of each key (None when the keys are the stream itself);
    max_q / max_k: bounds on the longest segments (the flash kernel's grid), the same for every batch of a
    run (pack's `bound`), so a compiled layer sees one constant rather than a new value per batch."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    key_index: torch.Tensor | None
    max_q: int
    max_k: int

    def to(self, device) -> "Segments":
        index = None if self.key_index is None else self.key_index.to(device, non_blocking=True)
        return Segments(self.cu_q.to(device, non_blocking=True), self.cu_k.to(device, non_blocking=True), index,
                        self.max_q, self.max_k)


def register() -> None:
    """Make PACKED_ATTENTION a valid attn_implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, segments=None, **kwargs):
    """transformers' attention signature: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None).
    A call without `segments` is SDPA with what transformers passes, which for an attention it has no mask
    builder for is no mask: causal only. That is exact for right-padded batches (data.collate's; a padding
    key only ever follows the real queries), and is what a reference given the padded layout computes.
    Everything here traces into a compiled layer (compiling.py) without a graph break (segment_attention)."""
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
    """Causal attention of each query segment over its key segment, aligned to the end of the keys: a query
    segment shorter than its keys (a rejected completion) sees the keys before it (its prompt) in full.
    q [Tq, H, D], k/v [Tk, Hkv, D] (keys already gathered) -> [Tq, H, D]. Flash attention on CUDA in
    bf16/fp16, exact arithmetic per segment otherwise (the CPU path).

    Both trace into a compiled decoder layer without a graph break, and the segment layout (cu_q, cu_k)
    stays a runtime tensor, never a compile-time constant. The flash path is an autograd.Function around
    aten's varlen flash kernels, which torch.compile traces op by op (they have meta kernels): the compiled
    layer calls them as it calls a matmul. They are called directly rather than through
    torch.nn.attention.varlen, whose dispatch may pick cuDNN (which plans on the host for every new set of
    lengths); grouped-query heads need no copies (the kernel reads each key/value head for its group of
    query heads and sums their gradients). The exact path reads the offsets on the host, which tracing
    cannot do, so it is a custom operator (aligntrain::segment_attention): one opaque node of the graph."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if _flash_applies(q):
        return _FlashSegments.apply(q, k, v, segments.cu_q, segments.cu_k, segments.max_q, segments.max_k, scale)
    return torch.ops.aligntrain.segment_attention(q, k, v, segments.cu_q, segments.cu_k, scale)[0]


class _FlashSegments(torch.autograd.Function):
    """aten's varlen flash kernels (FA2), or FA4's where flash4.applies (model.flash_attention)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale):
        ctx.fa4 = flash4.applies(q)
        if ctx.fa4:
            out, lse = torch.ops.aligntrain.fa4_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale)
            ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        else:
            out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
                q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale)
            ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed, offset)
        ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.fa4:
            dq, dk, dv = torch.ops.aligntrain.fa4_backward(grad.contiguous(), *ctx.saved_tensors, ctx.max_q, ctx.max_k,
                                                           ctx.scale)
            return dq, dk, dv, None, None, None, None, None
        q, k, v, out, lse, cu_q, cu_k, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, 0.0, True, seed, offset,
            scale=ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def _flash_applies(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


@torch.library.custom_op("aligntrain::segment_attention", mutates_args=())
def _segment_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                          scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact path: -> (out [Tq, H, D], logsumexp [H, Tq] in at least float32, which its backward takes)."""
    return _per_segment_forward(q, k, v, cu_q.tolist(), cu_k.tolist(), scale)


@_segment_attention_op.register_fake
def _(q, k, v, cu_q, cu_k, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=_accumulate(q))


@torch.library.custom_op("aligntrain::segment_attention_backward", mutates_args=())
def _segment_attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   out: torch.Tensor, lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                                   scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _per_segment_backward(grad, q, k, v, out, lse, cu_q.tolist(), cu_k.tolist(), scale)


@_segment_attention_backward_op.register_fake
def _(grad, q, k, v, out, lse, cu_q, cu_k, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs, output):
    q, k, v, cu_q, cu_k, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.scale = scale


def _backward(ctx, grad, _lse):  # the logsumexp takes no gradient
    dq, dk, dv = torch.ops.aligntrain.segment_attention_backward(grad, *ctx.saved_tensors, ctx.scale)
    return dq, dk, dv, None, None, None


_segment_attention_op.register_autograd(_backward, setup_context=_save)


def _accumulate(q: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


def _per_segment_forward(q, k, v, bounds_q, bounds_k, scale):
    """out [Tq, H, D] and logsumexp [H, Tq] of segment_attention, one segment at a time."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=_accumulate(q))
    for i in range(len(bounds_q) - 1):
        (lo_q, hi_q), (lo_k, hi_k) = bounds_q[i:i + 2], bounds_k[i:i + 2]
        if hi_q == lo_q:
            continue
        qq, kk, vv = _heads_first(q[lo_q:hi_q], k[lo_k:hi_k], v[lo_k:hi_k], groups)
        seg_out, seg_lse = _segment_forward(qq, kk, vv, scale)
        out[lo_q:hi_q] = seg_out.transpose(0, 1)
        lse[:, lo_q:hi_q] = seg_lse
    return out, lse


def _per_segment_backward(grad, q, k, v, out, lse, bounds_q, bounds_k, scale):
    """The gradients of _per_segment_forward, from its saved output and logsumexp."""
    kv_heads = k.shape[1]
    groups = q.shape[1] // kv_heads
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i in range(len(bounds_q) - 1):
        (lo_q, hi_q), (lo_k, hi_k) = bounds_q[i:i + 2], bounds_k[i:i + 2]
        if hi_q == lo_q:
            continue
        qq, kk, vv = _heads_first(q[lo_q:hi_q], k[lo_k:hi_k], v[lo_k:hi_k], groups)
        g, o = grad[lo_q:hi_q].transpose(0, 1), out[lo_q:hi_q].transpose(0, 1)
        seg_dq, seg_dk, seg_dv = _segment_backward(g, qq, kk, vv, o, lse[:, lo_q:hi_q], scale)
        dq[lo_q:hi_q] = seg_dq.transpose(0, 1)
        # a key/value head's gradient is the sum over the query heads of its group
        dk[lo_k:hi_k] += seg_dk.view(kv_heads, groups, hi_k - lo_k, -1).sum(1).transpose(0, 1)
        dv[lo_k:hi_k] += seg_dv.view(kv_heads, groups, hi_k - lo_k, -1).sum(1).transpose(0, 1)
    return dq, dk, dv


def _heads_first(q, k, v, groups: int):
    """One segment's [L, H, D] slices as [H, L, D], each key/value head repeated for its group of query heads."""
    return q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(groups, 0), v.transpose(0, 1).repeat_interleave(groups, 0)


def _end_aligned(lq: int, lk: int, device) -> torch.Tensor:
    """[Lq, Lk] bool: query i sees keys up to i + (Lk - Lq) (causal, aligned to the end of the keys)."""
    return torch.arange(lk, device=device)[None, :] <= torch.arange(lq, device=device)[:, None] + (lk - lq)


def _end_aligned_bias(lq: int, lk: int, like: torch.Tensor) -> torch.Tensor:
    """_end_aligned as an additive mask in `like`'s dtype (0 where seen, -inf elsewhere)."""
    allowed = _end_aligned(lq, lk, like.device)
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(~allowed, float("-inf"))


def _segment_forward(q, k, v, scale):
    """One segment, heads first ([H, Lq, D] over [H, Lk, D]) -> out [H, Lq, D], logsumexp [H, Lq]. On the CPU
    aten's fused kernel (the one SDPA runs there), which also returns the logsumexp; elsewhere (float32 on
    CUDA) the arithmetic written out, in float32 or wider."""
    lq, lk = q.shape[1], k.shape[1]
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None], k[None], v[None], 0.0, lq == lk, attn_mask=None if lq == lk else _end_aligned_bias(lq, lk, q),
            scale=scale)
        return out[0], lse[0]
    return _written_out_forward(q, k, v, scale)


def _written_out_forward(q, k, v, scale):
    scores, acc = _scores(q, k, scale)
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse[..., None]) @ v.to(acc)).to(q.dtype), lse


def _segment_backward(grad, q, k, v, out, lse, scale):
    """The gradients of _segment_forward (heads first, key/value heads repeated as there)."""
    lq, lk = q.shape[1], k.shape[1]
    if q.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad[None].contiguous(), q[None], k[None], v[None], out[None], lse[None], 0.0, lq == lk,
            attn_mask=None if lq == lk else _end_aligned_bias(lq, lk, q), scale=scale)
        return dq[0], dk[0], dv[0]
    return _written_out_backward(grad, q, k, v, out, lse, scale)


def _written_out_backward(grad, q, k, v, out, lse, scale):
    scores, acc = _scores(q, k, scale)
    probs = torch.exp(scores - lse[..., None])  # [H, Lq, Lk]
    g, o, vv = grad.to(acc), out.to(acc), v.to(acc)
    d_scores = probs * (g @ vv.transpose(1, 2) - (g * o).sum(-1, keepdim=True)) * _scale(q, scale)
    return ((d_scores @ k.to(acc)).to(q.dtype), (d_scores.transpose(1, 2) @ q.to(acc)).to(k.dtype),
            (probs.transpose(1, 2) @ g).to(v.dtype))


def _scores(q, k, scale):
    acc = _accumulate(q)
    allowed = _end_aligned(q.shape[1], k.shape[1], q.device)
    return (q.to(acc) @ k.to(acc).transpose(1, 2) * _scale(q, scale)).masked_fill(~allowed, float("-inf")), acc


def _scale(q, scale):
    return scale if scale is not None else q.shape[-1] ** -0.5


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

def pack(sequences: list[np.ndarray], trained: list[np.ndarray], prompts: list[int] | None = None,
         bound: int | None = None) -> dict:
    """The padding-free micro-batch of `sequences` (token id arrays) whose tokens `trained` (bool arrays) are
    trained. `prompts` (DPO sharing the prompt): sequences are [chosen 0..B-1, rejected 0..B-1], pair i's
    prompt is its first prompts[i] tokens, forwarded once. `bound`: the run's max_length (segment_bound).

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
                        segment_bound(int(np.diff(cu_q).max()), bound), segment_bound(int(np.diff(cu_k).max()), bound))
    return {
        "input_ids": torch.from_numpy(np.concatenate(stream_ids).astype(np.int64))[None],
        "position_ids": torch.from_numpy(np.concatenate(stream_pos).astype(np.int64))[None],
        "predict": torch.from_numpy(np.concatenate(predict).astype(np.int64)),
        "targets": torch.from_numpy(np.concatenate(targets).astype(np.int64)),
        "slots": torch.from_numpy(slots),
        "lengths": torch.tensor([len(x) for x in sequences], dtype=torch.long),
        "segments": segments,
    }


def segment_bound(longest: int, bound: int | None) -> int:
    """What the attention is told of the longest segment: `bound` (the run's max_length) when no segment is
    longer, else `longest` rounded up to a power of two. The flash kernel only sizes its grid by it (blocks
    past a segment's end exit at once), and a value that stays the same from batch to batch is one compiled
    graph, where the exact longest segment would be a new constant, or a guard, every batch."""
    if bound is not None and longest <= bound:
        return bound
    return 1 << max(longest - 1, 0).bit_length()
