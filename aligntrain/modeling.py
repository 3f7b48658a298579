"""Models: load the policy and the frozen reference, seed archives, and completion log-probs.

Batches are packed (data.collate): one stream of tokens [1, T] with per-sequence position ids and no
padding. Attention follows a mask rule over the stream (`visible`): causal, within one row, and a
DPO completion never sees the other completion of its pair. On CUDA the rule becomes a flex
attention block mask (only the blocks it allows are computed); elsewhere SDPA runs row by row with
the rule as a dense mask: the same numbers up to the kernels' rounding.

Log-probs are computed on completion tokens only. The decoder runs once; the hidden states of the
positions that predict a trained token are gathered ([N, H]) and pushed through the LM head in
chunks of `chunk_tokens` rows. Each chunk is checkpointed, so neither the forward nor the backward
ever holds more than [chunk, vocab] logits, and no [tokens, vocab] float32 tensor exists:

    log p(y_t) = logit[y_t] - logsumexp(logits)      (logits in the model's dtype, lse in float32)
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import Config, ConfigError

PACKED_ATTENTION = "aligntrain_packed"  # the attention implementation SequenceLogps switches its model to
MODEL_INPUTS = ("input_ids", "position_ids", "doc", "branch", "sources", "targets", "counts")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config dtype name (config.MIXED_PRECISION lists them)."""
    return getattr(torch, name)


def compute_autocast(policy_dtype: str, device: torch.device):
    """Autocast to policy_dtype, the compute dtype of training (float16 has no CPU path: float32 there).
    Training's accelerator and the reference both run under it, so their log-probs agree."""
    if policy_dtype == "float32" or (policy_dtype == "float16" and device.type == "cpu"):
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch_dtype(policy_dtype))


# -- attention over a packed stream -----------------------------------------------------------------

def visible(doc: torch.Tensor, branch: torch.Tensor, q, k):
    """The mask rule of a packed stream: key k is visible from query q when both are in the same row,
    k <= q, and k is shared (branch 0) or on q's own branch. q and k: indices, broadcast together."""
    return (doc[q] == doc[k]) & (k <= q) & ((branch[k] == 0) | (branch[k] == branch[q]))


def attention_mask(doc: torch.Tensor, branch: torch.Tensor, kernel: str = "flex"):
    """The mask that `packed_attention` reads (handed down as the keyword `packed_mask`: transformers
    passes extra keywords through to the attention function untouched): a flex BlockMask on CUDA with
    kernel "flex"; otherwise each row's span and mask for `row_attention`."""
    n = doc.shape[0]
    if kernel == "flex" and doc.is_cuda and flex_attention() is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(lambda b, h, q, k: visible(doc, branch, q, k), None, None, n, n, device=doc.device)
    return row_masks(doc, branch)


def row_masks(doc: torch.Tensor, branch: torch.Tensor) -> list[tuple[slice, torch.Tensor | None]]:
    """Each row's slice of the stream with its [n, n] mask; None for a row of one branch (plain causal)."""
    branched = set(doc[branch != 0].unique().tolist())
    out, start = [], 0
    for row, n in zip(*(t.tolist() for t in torch.unique_consecutive(doc, return_counts=True))):
        mask = None
        if row in branched:
            i = torch.arange(n, device=doc.device)
            mask = visible(doc[start:start + n], branch[start:start + n], i[:, None], i[None, :])
        out.append((slice(start, start + n), mask))
        start += n
    return out


@functools.cache
def flex_attention():
    """torch's flex attention, compiled once per process (None where this torch has none)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention as flex
    except ImportError:
        return None
    return torch.compile(flex)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed_mask=None, **kwargs):
    """A transformers attention function: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> [1, T, Hq, D].
    transformers' own attention_mask is None here (it builds none for an attention it does not know)."""
    if packed_mask is None:
        raise RuntimeError("packed attention without its mask: call the model through SequenceLogps")
    gqa = query.shape[1] != key.shape[1]
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # autocast leaves flex attention alone, and rotary embeddings computed against float32 master
        # weights hand it float32 queries: cast as autocast casts SDPA's inputs
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if isinstance(packed_mask, list):
        out = row_attention(query, key, value, packed_mask, scaling, gqa)
    else:
        out = flex_attention()(query, key, value, block_mask=packed_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def row_attention(query, key, value, rows: list[tuple[slice, torch.Tensor | None]], scaling, gqa: bool) -> torch.Tensor:
    """Attention without flex: SDPA row by row (`row_masks`), so the cost stays that of the rows and not
    of the whole stream squared; rows of one branch take SDPA's own causal kernel."""
    out = [F.scaled_dot_product_attention(query[:, :, span], key[:, :, span], value[:, :, span], attn_mask=mask,
                                          is_causal=mask is None, scale=scaling, enable_gqa=gqa)
           for span, mask in rows]
    return torch.cat(out, dim=2)


class SequenceLogps(nn.Module):
    """A causal LM whose forward returns, per sequence of a packed batch, the summed log-probs of its
    trained tokens: forward(**{k: batch[k] for k in MODEL_INPUTS}) -> (logps [S] float32, counts [S]).

    The wrapped model is switched to the packed attention; `attention` "flex" takes flex attention on
    CUDA, "rows" SDPA row by row (what runs anywhere else). Accelerate wraps this module (not the
    bare LM), so autocast and FSDP see one root forward.
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int = 1024, attention: str = "flex"):
        from transformers import AttentionInterface

        super().__init__()
        config = lm.config
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ConfigError(f"model.name_or_path: layer types {sorted(kinds)}: only full-attention models "
                              "can be trained on packed batches")
        AttentionInterface.register(PACKED_ATTENTION, packed_attention)
        lm.set_attn_implementation(PACKED_ATTENTION)
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.attention = attention
        self.softcap = getattr(config, "final_logit_softcapping", None)
        # Heads that rescale logits in their own forward: we cannot apply their lm_head alone.
        self.plain_head = not any(getattr(config, k, None) not in (None, 1, 1.0) for k in ("logit_scale", "logits_scaling"))

    def forward(self, input_ids, position_ids, doc, branch, sources, targets, counts):
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False,
                  "packed_mask": attention_mask(doc, branch, self.attention)}
        if self.plain_head:
            hidden = self.lm.base_model(**inputs)[0][0]  # [T, H]
            token_logps = chunked_token_logps(hidden[sources], targets, self.lm.get_output_embeddings(),
                                              self.chunk_tokens, self.softcap)
        else:
            logits = self.lm(**inputs).logits[0]
            token_logps = gathered_token_logps(logits[sources], targets, self.chunk_tokens)
        return per_sequence_sums(token_logps, counts), counts


def batch_flops(config, batch: dict[str, torch.Tensor], passes: float) -> float:
    """Model FLOPs of a packed batch, counting useful work only: 2 per weight per forwarded token (the
    body without the embedding table), the LM head on trained tokens, and attention over exactly the
    keys each query sees (its position + 1: a DPO completion sees its prompt and itself). `passes`: 3
    for forward + backward, 1 for a forward."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    mlp = 3 * hidden * config.intermediate_size
    attn_weights = hidden * head_dim * (2 * config.num_attention_heads + 2 * kv)
    tokens = batch["input_ids"].numel()
    keys = float((batch["position_ids"].double() + 1).sum())
    per_pass = (2 * layers * (mlp + attn_weights) * tokens + 2 * hidden * config.vocab_size * batch["targets"].numel()
                + 4 * layers * config.num_attention_heads * head_dim * keys)
    return passes * per_pass


def per_sequence_sums(token_logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[N] values grouped by sequence (counts [S]) -> [S] sums. Scattered into [S, longest] and reduced
    row by row: deterministic on GPU, unlike an atomic index_add."""
    width = int(counts.max()) if counts.numel() else 0
    slots = torch.arange(width, device=counts.device)[None, :] < counts[:, None]
    rows = torch.zeros(slots.shape, dtype=torch.float32, device=token_logps.device)
    return rows.masked_scatter(slots, token_logps).sum(dim=1)


def chunked_token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk: int,
                        softcap: float | None = None) -> torch.Tensor:
    """log p(target) for each row of hidden [N, H]; logits exist only [chunk, V] at a time. -> [N] float32."""
    out = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            # recompute this chunk's logits in backward instead of keeping them alive
            out.append(checkpoint(_head_logps, head, h, t, softcap, use_reentrant=False))
        else:
            out.append(_head_logps(head, h, t, softcap))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def _head_logps(head: nn.Module, h: torch.Tensor, t: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(h)  # [n, V], model dtype
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return (fused_logps() if logits.is_cuda else picked_logps)(logits, t)


def picked_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logit[target] - logsumexp(logits) per row, in float32. [n, V], [n] -> [n]."""
    picked = logits.gather(-1, targets[:, None]).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


@functools.cache
def fused_logps():
    """picked_logps compiled: on the GPU it reads the bf16 logits once instead of writing a float32 copy."""
    return torch.compile(picked_logps, dynamic=True)


def gathered_token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Fallback for heads with their own scaling: selected logits [N, V] (model dtype), lse per chunk."""
    out = [picked_logps(logits[s:s + chunk], targets[s:s + chunk]) for s in range(0, logits.shape[0], chunk)]
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


# -- loading --------------------------------------------------------------------------------------

def load_tokenizer(path: str):
    """The tokenizer exactly as aligndata loads it (so its identity hash matches the manifest's)."""
    from aligndata.encode.tokenizer import TemplateError
    from aligndata.encode.tokenizer import load_tokenizer as load

    try:
        return load(str(path))
    except TemplateError as e:
        raise ConfigError(str(e)) from None  # it names the path


def load_causal_lm(path: str | Path, dtype: str, attn_implementation: str = "sdpa", *, trainable: bool = True):
    """A local Hugging Face causal LM in `dtype`, dropout off (as the seed does: DPO's log-ratios
    must not be noisy), `use_cache` off. The frozen reference gets `trainable=False`."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype),
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot load a causal LM from {str(path)!r}: {_first_line(e)}") from None
    disable_dropout(model)
    model.config.use_cache = False
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


class Reference:
    """The frozen reference model of DPO, built one way for training and for `precompute-ref`, so
    stored and live reference log-probs agree by construction: model.name_or_path (+ archive) in
    reference_dtype, run without autograd under the training compute autocast."""

    def __init__(self, cfg: Config, device: torch.device):
        lm = load_causal_lm(cfg.model.name_or_path, cfg.model.reference_dtype, cfg.model.attn_implementation,
                            trainable=False)
        if cfg.model.archive:
            load_archive(lm, cfg.model.archive)
        self.model = SequenceLogps(lm, cfg.logprob_chunk_tokens, cfg.model.packed_attention).to(device)
        self.policy_dtype = cfg.model.policy_dtype
        self.device = device

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[S] float32 summed log-probs of the trained tokens of each sequence of a packed batch."""
        with compute_autocast(self.policy_dtype, self.device):
            return self.model(**{k: batch[k] for k in MODEL_INPUTS})[0]


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a run directory / checkpoints directory of ours -> its latest checkpoint."""
    from .checkpoint import latest_checkpoint

    path = Path(path)
    if (path / "config.json").exists():
        return path
    for candidate in (path, path / "checkpoints"):
        latest = latest_checkpoint(candidate) if candidate.is_dir() else None
        if latest is not None:
            return latest
    raise ConfigError(f"{path}: not a model directory (no config.json) and no checkpoint of ours in it")


def load_archive(model: nn.Module, archive: str | Path) -> None:
    """Load archive weights into `model`: the seed's `policy.pt` ({"state": state_dict, ...}, read with
    weights_only=True), a bare state-dict `.pt`, or a model/checkpoint/run directory of ours."""
    archive = Path(archive)
    if not archive.exists():
        raise ConfigError(f"model.archive: {archive} does not exist")
    if archive.is_dir():
        state = _read_safetensors_dir(resolve_model_dir(archive))
    else:
        try:
            obj = torch.load(archive, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types; all mean "not a weights-only archive"
            raise ConfigError(f"model.archive: {archive} is not a weights-only torch archive ({_first_line(e)})") from None
        state = obj["state"] if isinstance(obj, dict) and isinstance(obj.get("state"), dict) else obj
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"model.archive: {archive} holds no state dict (expected {{'state': state_dict, ...}})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys, e.g. {unexpected[:3]}")
        raise ConfigError(f"model.archive: {archive} does not match model.name_or_path ({'; '.join(parts)})")


def _read_safetensors_dir(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (model_dir / name).exists():
            raise ConfigError(f"model.archive: {model_dir / name} is missing")
        state.update(load_file(str(model_dir / name)))
    return state


def _is_tied(model: nn.Module, key: str) -> bool:
    """A parameter absent from a saved state dict because it shares storage with another one."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    ptr = params[key].data_ptr()
    return any(p.data_ptr() == ptr for k, p in params.items() if k != key)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
