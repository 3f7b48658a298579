"""CUDA graphs of the decoder stack for padding-free training forwards (`cuda_graphs`).

On a small model a training step is bound by the host, not the GPU: each of a few hundred matrix
multiplies and a few hundred fused kernels costs the host 10-60 us to launch, whatever its size, and the
GPU waits in between (benchmarks/RESULTS.md: the SFT step of qwen0.5b kept the GPU busy 48% of the time).
A CUDA graph records the launches of the whole decoder stack once, forward and backward, and replays them
with one call each.

A graph has fixed shapes, and a padding-free stream has a new length every batch. So the stream is padded
to one of a few bucket lengths chosen for the run (`plan_buckets`: the lengths its micro-batches will have
are known before it starts, from the shards' row lengths), the padding being a segment of its own that no
other token attends to and no trained token reads: the real tokens' outputs and gradients do not change.
One graph pair (forward, backward) is recorded per bucket, all of them in one memory pool: up front
(`record`, which the trainer calls before the first step) or the first time a batch needs it; a stream
longer than every bucket, or one that would need a graph beyond `limit`, runs without a graph.

The recorded backward writes the parameters' gradients into buffers of its own, which autograd then adds
into `.grad`. Autograd would instead adopt such a buffer as `.grad` when `.grad` is None, and the next replay
would overwrite it: the trainer keeps every `.grad` allocated while graphs are in use (`keep_gradients`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .packing import Segments

GRANULARITY = 256  # bucket lengths are multiples of it (tokens)


def plan_buckets(lengths: list[int], count: int, granularity: int = GRANULARITY) -> list[int]:
    """At most `count` bucket lengths (multiples of `granularity`, ascending) covering every length of
    `lengths`, chosen to pad the fewest tokens in all (an exact dynamic program over the distinct lengths
    rounded up to the granularity)."""
    if not lengths or count < 1:
        return []
    rounded = sorted({math.ceil(n / granularity) * granularity for n in lengths})
    weight = {size: 0 for size in rounded}
    total = {size: 0 for size in rounded}
    for n in lengths:
        size = math.ceil(n / granularity) * granularity
        weight[size] += 1
        total[size] += n
    m = len(rounded)
    # cost[i][j]: padding when lengths of rounded[i..j] all go to the bucket rounded[j]
    prefix_w, prefix_t = [0], [0]
    for size in rounded:
        prefix_w.append(prefix_w[-1] + weight[size])
        prefix_t.append(prefix_t[-1] + total[size])

    def cost(i: int, j: int) -> int:
        return rounded[j] * (prefix_w[j + 1] - prefix_w[i]) - (prefix_t[j + 1] - prefix_t[i])

    k = min(count, m)
    best = [[math.inf] * m for _ in range(k + 1)]  # best[b][j]: rounded[0..j] covered by b buckets, the last at j
    back = [[-1] * m for _ in range(k + 1)]
    for j in range(m):
        best[1][j] = cost(0, j)
    for b in range(2, k + 1):
        for j in range(m):
            for i in range(j):
                value = best[b - 1][i] + cost(i + 1, j)
                if value < best[b][j]:
                    best[b][j], back[b][j] = value, i
    b = min(range(1, k + 1), key=lambda b: (best[b][m - 1], b))
    buckets, j = [], m - 1
    while j >= 0 and b >= 1:
        buckets.append(rounded[j])
        j, b = back[b][j], b - 1
    return sorted(buckets)


class _Stack(nn.Module):
    """The decoder stack of a causal LM as a function of tensors alone (what a graph records)."""

    def __init__(self, base_model: nn.Module, max_q: int, max_k: int):
        super().__init__()
        self.base_model = base_model
        self.max_q, self.max_k = max_q, max_k

    def forward(self, input_ids, position_ids, cu_q, cu_k):
        segments = Segments(cu_q, cu_k, None, self.max_q, self.max_k)
        return self.base_model(input_ids=input_ids, position_ids=position_ids, segments=segments, use_cache=False)[0]


class GraphedStack:
    """lm.base_model's forward on a padding-free stream, through a CUDA graph of the stream's bucket.
    `capture=False` pads exactly the same way and runs eagerly (the CPU tests' path)."""

    def __init__(self, base_model: nn.Module, buckets: list[int], pad_id: int = 0, capture: bool = True,
                 limit: int | None = None):
        """`limit`: graphs recorded at most (each holds a set of gradient buffers); default one per bucket.
        A stream whose graph would exceed it runs eagerly."""
        self.base_model = base_model
        self.buckets = sorted(buckets)
        self.pad_id = pad_id
        self.capture = capture
        self.limit = len(self.buckets) if limit is None else limit
        self.graphs: dict[tuple, Any] = {}
        self.pool = None
        self.dtype: torch.dtype | None = None  # the autocast dtype the graphs were recorded under

    def bucket(self, length: int) -> int | None:
        return next((b for b in self.buckets if b >= length), None)

    def applies(self, input_ids: torch.Tensor, segments: Segments) -> bool:
        return (segments.key_index is None and torch.is_grad_enabled() and self.base_model.training
                and self.bucket(input_ids.shape[1]) is not None)

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, segments: Segments) -> torch.Tensor:
        """hidden states [1, T, H] of the stream [1, T] (the caller checked `applies`)."""
        length = input_ids.shape[1]
        size = self.bucket(length)
        extra = size - length
        max_q, max_k = max(segments.max_q, extra), max(segments.max_k, extra)
        # one segment more: the padding's, or an empty one (the number of segments is part of the shapes)
        key = (size, segments.cu_q.shape[0] + 1, max_q, max_k)
        if self.capture and key not in self.graphs and len(self.graphs) >= self.limit:
            return self.base_model(input_ids=input_ids, position_ids=position_ids, segments=segments, use_cache=False)[0]
        device = input_ids.device
        if extra:
            input_ids = torch.cat([input_ids, torch.full((1, extra), self.pad_id, dtype=input_ids.dtype, device=device)], 1)
            position_ids = torch.cat([position_ids, torch.arange(extra, dtype=position_ids.dtype, device=device)[None]], 1)
            end = torch.tensor([size], dtype=segments.cu_q.dtype, device=device)
            cu_q, cu_k = torch.cat([segments.cu_q, end]), torch.cat([segments.cu_k, end])
        else:
            cu_q, cu_k = torch.cat([segments.cu_q, segments.cu_q[-1:]]), torch.cat([segments.cu_k, segments.cu_k[-1:]])
        args = (input_ids, position_ids, cu_q, cu_k)
        if not self.capture:
            return _Stack(self.base_model, max_q, max_k)(*args)[:, :length]
        if key not in self.graphs:
            self.graphs[key] = self._record(args, max_q, max_k)
        return self.graphs[key](*args)[:, :length]

    def record(self, segments_per_stream: int, bound: int, device: torch.device) -> None:
        """Record every bucket's graphs now, for streams of `segments_per_stream` sequences under the run's
        max_length `bound` (call in training mode under the training autocast), rather than in the first
        steps that need them. The recording runs on made-up tokens; it changes no weight or gradient."""
        from .packing import segment_bound

        for size in self.buckets:
            if len(self.graphs) >= self.limit:
                break
            count = max(1, min(segments_per_stream, size))
            cu = torch.linspace(0, size, count + 1, device=device).round().to(torch.int32)
            lengths = cu.diff()
            position_ids = torch.cat([torch.arange(int(n), device=device) for n in lengths])[None]
            input_ids = torch.full((1, size), self.pad_id, dtype=torch.long, device=device)
            longest = segment_bound(int(lengths.max()), bound)
            self(input_ids, position_ids, Segments(cu, cu, None, longest, longest))

    def _record(self, args, max_q: int, max_k: int):
        device = args[0].device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            self.dtype = dtype
        elif dtype != self.dtype:
            raise RuntimeError(f"CUDA graphs recorded under autocast {self.dtype} cannot replay under {dtype}")
        stack = _Stack(self.base_model, max_q, max_k)
        # make_graphed_callables refuses autocast's weight cache, whose casts would live in the graph's pool
        context = torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype is not None else \
            torch.autocast(device.type, enabled=False)
        with context:
            return torch.cuda.make_graphed_callables(stack, args, pool=self.pool)


def keep_gradients(parameters) -> None:
    """Allocate (zeroed) `.grad` of every trainable parameter that has none (module docstring)."""
    for p in parameters:
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
