"""Numbers over token lengths and loss masks: percentiles, histograms, padding and packing shares.

Plain numpy on flat arrays, one home per rule: `percentiles` is the definition the manifest uses, and
`first_trained` is where a row's prompt ends, for the manifest's and inspect's length columns alike.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

HIST_BINS = 12


def percentiles(values: Any) -> dict[str, int]:
    """p50/p90/p99/max by nearest rank (round half up), the definition `convert` writes to the manifest."""
    s = np.sort(np.asarray(values, dtype=np.int64))
    if not s.size:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}

    def at(q: float) -> int:
        return int(s[min(s.size - 1, int(q * (s.size - 1) + 0.5))])

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": int(s[-1])}


def first_trained(mask: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per row of a flat loss mask (rows given by their lengths): the index of its first trained token,
    which is the length of its prompt, or the row's length when nothing in it is trained.

    Works on span starts (a trained token whose predecessor in the row is not trained), which are few,
    rather than on every trained token.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    off = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=off[1:])
    on = np.asarray(mask) != 0
    before = np.zeros(on.size, dtype=bool)
    before[1:] = on[:-1]
    before[off[:-1][lengths > 0]] = False  # a row's first token has no predecessor
    starts = np.flatnonzero(on & ~before)
    first = lengths.copy()
    if starts.size:
        rows = np.searchsorted(off, starts, side="right") - 1
        new_row = np.ones(rows.size, dtype=bool)
        new_row[1:] = rows[1:] != rows[:-1]
        first[rows[new_row]] = starts[new_row] - off[rows[new_row]]
    return first


def nice_histogram(values: np.ndarray, bins: int = HIST_BINS) -> dict[str, list[int]]:
    """Counts over bins of a round width (1, 2 or 5 x 10^k). Bin i holds lo[i] <= value <= hi[i]."""
    values = np.asarray(values, dtype=np.int64)
    if values.size == 0:
        return {"lo": [], "hi": [], "counts": []}
    lo_v, hi_v = int(values.min()), int(values.max())
    need = max(1, math.ceil((hi_v - lo_v + 1) / bins))
    width = next(m * 10**e for e in range(0, 19) for m in (1, 2, 5) if m * 10**e >= need)
    start = lo_v // width * width
    counts = np.bincount((values - start) // width)
    lows = [start + i * width for i in range(len(counts))]
    return {"lo": lows, "hi": [x + width - 1 for x in lows], "counts": counts.tolist()}


def padded_share(widths: np.ndarray, batch_size: int, real_tokens: int, sequences_per_row: int = 1) -> float:
    """Share of tokens that are padding when consecutive rows form batches of `batch_size`, each row
    padded to the longest in its batch (the last batch may be smaller; it is not dropped).

    `widths` is each row's padded width (DPO: prompt + the longer completion) and a row holds
    `sequences_per_row` sequences (DPO: 2, chosen and rejected, as aligntrain collates them).
    """
    n = len(widths)
    if n == 0:
        return 0.0
    full = n // batch_size * batch_size
    padded = int(widths[:full].reshape(-1, batch_size).max(axis=1).sum()) * batch_size if full else 0
    if full < n:
        padded += int(widths[full:].max()) * (n - full)
    padded *= sequences_per_row
    return (padded - real_tokens) / padded if padded else 0.0


def pack_count(lengths: np.ndarray, capacity: int) -> int:
    """How many sequences of `capacity` tokens best-fit-decreasing packing needs (no sequence is split).

    Items of one length are placed together: bins are kept only as counts per free room, so the cost
    grows with the number of distinct lengths, not with the number of rows.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > capacity:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens cannot be packed into {capacity}")
    sizes, counts = np.unique(lengths[lengths > 0], return_counts=True)
    free = np.zeros(capacity + 1, dtype=np.int64)  # free[c]: open bins with exactly c tokens of room
    bins = 0
    for s, k in zip(sizes[::-1].tolist(), counts[::-1].tolist()):  # k items of length s, longest first
        while k:
            room = np.flatnonzero(free[s:])
            c, have = (s + int(room[0]), int(free[s + int(room[0])])) if room.size else (capacity, None)
            per_bin = c // s  # the best fit stays the best fit until less than s is left in it
            full, rest = divmod(k, per_bin)
            if have is not None and full >= have:  # fill every bin with this much room, then look again
                free[c] -= have
                free[c - per_bin * s] += have
                k -= have * per_bin
                continue
            used = full + (1 if rest else 0)
            if have is None:
                bins += used  # new bins
            else:
                free[c] -= used
            free[c - per_bin * s] += full
            if rest:
                free[c - rest * s] += 1
            k = 0
    return bins


def packed_share(lengths: np.ndarray, capacity: int) -> tuple[float, int]:
    """(share of padding tokens, number of sequences) when `lengths` are packed into `capacity`-token rows."""
    n = pack_count(lengths, capacity)
    total = n * capacity
    return ((total - int(np.sum(lengths))) / total if total else 0.0), n
