"""Model FLOPs of training, counted from the useful tokens only, and the MFU they give on a known card.

The count is the usual dense-transformer one (Kaplan et al. 2020; PaLM's MFU, Chowdhery et al. 2022,
appendix B), split so that a caller can pass what its batches really hold:

- every token is multiplied by `matmul_params(config)` weights: 2 FLOPs per weight forward, 4 more
  backward (the gradients of the activations and of the weights), so 6 per weight for a trained token
  and 2 for a token the frozen reference only forwards;
- every (query, key) pair that causal attention computes costs 2 FLOPs per head dimension for QK^T
  and 2 for PV, in every head of every layer (`attention_forward_flops`); backward costs twice the
  forward, so 3 times the forward for a trained pair.

What counts is the useful work, not what an implementation happens to run: only non-pad tokens, and
a DPO prompt shared by chosen and rejected counts once (its keys are attended by both completions).
Padding, a prompt forwarded twice, or activation checkpointing's second forward make a run slower
without adding FLOPs here, so two trainers fed the same data are credited the same FLOPs and their
MFU compares their speed.
"""

from __future__ import annotations

from typing import Iterable


def _dims(config) -> tuple[int, int, int, int, int, int, int]:
    """(hidden, intermediate, layers, heads, kv heads, head dim, vocab) of a transformers config (its text
    part, for a multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = text.hidden_size, text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return hidden, text.intermediate_size, text.num_hidden_layers, heads, kv_heads, head_dim, text.vocab_size


def matmul_params(config) -> int:
    """Weights every token is multiplied by: the q, k, v, o projections and the gated MLP's three
    matrices in every layer, plus the LM head once (tied to the embeddings or not). The embedding
    lookup, norms and biases multiply nothing."""
    hidden, intermediate, layers, heads, kv_heads, head_dim, vocab = _dims(config)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o: heads; k and v: kv heads
    mlp = 3 * hidden * intermediate
    return layers * (attention + mlp) + hidden * vocab


def attention_pairs(segments: Iterable[tuple[int, int]]) -> int:
    """(query, key) pairs of causal attention over `segments` of (q_len, k_len), q_len <= k_len: the
    queries are the last q_len positions of the k_len keys, so query i (from 0) sees k_len - q_len + i + 1
    keys. (n, n) is a plain causal sequence; (c, p + c) a completion attending its prompt."""
    total = 0
    for q_len, k_len in segments:
        if not 0 <= q_len <= k_len:
            raise ValueError(f"attention segment ({q_len}, {k_len}): need 0 <= q_len <= k_len")
        total += q_len * (k_len - q_len) + q_len * (q_len + 1) // 2
    return total


def item_counts(lengths: tuple[int, ...]) -> tuple[int, int]:
    """(useful tokens, attention pairs) of one training item: (n,) a sequence of n tokens; (p, c, r) a
    preference pair whose prompt p is counted once, each completion attending to it and to itself."""
    if len(lengths) == 1:
        (n,) = lengths
        return n, attention_pairs([(n, n)])
    p, c, r = lengths
    return p + c + r, attention_pairs([(p + c, p + c), (r, p + r)])


def attention_forward_flops(config) -> int:
    """Forward FLOPs of one (query, key) pair over all layers: QK^T and PV, one multiply-add (2 FLOPs)
    per head dimension each, in every query head."""
    _, _, layers, heads, _, head_dim, _ = _dims(config)
    return 4 * layers * heads * head_dim


def training_flops(config, policy_tokens: int, policy_pairs: int, reference_tokens: int = 0,
                   reference_pairs: int = 0) -> float:
    """FLOPs of training on `policy_tokens` tokens whose attention computes `policy_pairs` (query, key)
    pairs, plus a frozen reference forwarding `reference_tokens` / `reference_pairs`:

        6 * N * policy_tokens + 3 * A * policy_pairs + 2 * N * reference_tokens + A * reference_pairs

    with N = matmul_params(config) and A = attention_forward_flops(config). The counts are of useful
    tokens: no padding, and a DPO prompt shared by chosen and rejected counted once (module docstring)."""
    n, a = matmul_params(config), attention_forward_flops(config)
    return float(6 * n * policy_tokens + 3 * a * policy_pairs + 2 * n * reference_tokens + a * reference_pairs)


# Dense bf16 tensor-core peaks from NVIDIA's datasheets (the figures "with sparsity" halved), matched
# in this order against torch.cuda.get_device_name(): H100 PCIe before H100, A100 before an "A10".
# The A10G is AWS's A10; NVIDIA's A10 datasheet gives it.
PEAK_BF16 = (
    (("h100", "pcie"), 756e12),
    (("nvl",), 835e12),  # H100 NVL and H200 NVL: 1,671 TFLOPS with sparsity
    (("h100",), 989e12),  # SXM
    (("h200",), 989e12),  # SXM; the same tensor cores as H100 SXM
    (("a100",), 312e12),  # SXM and PCIe alike
    (("l40s",), 362e12),
    (("a10g",), 125e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the card named `device_name`; None for a card not in PEAK_BF16 (and
    for "cpu"), where MFU is not reported."""
    name = device_name.lower()
    for parts, peak in PEAK_BF16:
        if all(part in name for part in parts):
            return peak
    return None


def mfu(flops: float, seconds: float, device_name: str) -> float | None:
    """Model FLOPs utilisation: the share of the card's dense bf16 peak that `flops` in `seconds` is;
    None where the peak is unknown or no time passed."""
    peak = peak_bf16_flops(device_name)
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / peak
