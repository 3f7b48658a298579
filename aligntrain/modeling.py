"""Models: load the policy and the frozen reference, seed archives, and completion log-probs.

Log-probs are computed on completion tokens only. The decoder runs once; the hidden states of the
positions that predict a trained token are gathered ([N, H]) and pushed through the LM head in
chunks of `chunk_tokens` rows (head_chunk_rows: 1024 unless set, more for SFT's head in Triton).
Each chunk is checkpointed, so neither the forward nor the backward ever holds more than
[chunk, vocab] logits, and no [batch, seq, vocab] float32 tensor exists:

    log p(y_t) = logit[y_t] - logsumexp(logits)      (logits in the model's dtype, lse in float32)

Checkpointing the head costs its forward twice (8 FLOPs per head weight and trained token instead of 6).
A loss that is one coefficient c times the sum of the returned log-probs (SFT's token mean) needs no
second forward: the gradient of log p(y_t) with respect to the logits, onehot(y_t) - softmax, is known in
the forward, so each chunk there also computes its share of the head's input and weight gradients, kept
unscaled, and the backward only multiplies them by c (head_logps_uniform_grad; `uniform_grad=True`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from . import kernels
from .compiling import (compile_layers, compile_wanted, compiled_logps_and_grad, compiled_logps_from_logits,
                        logps_and_grad, logps_from_logits)
from .config import Config, ConfigError
from .packing import PACKED_ATTENTION, PADDED, choose_layout, use_packed_attention

HEAD_GRAD_IN_FORWARD = True  # uniform_grad's head gradients in the forward (benchmarks turn it off to measure it)
CHUNK_TOKENS = 1024  # rows per head chunk when logprob_chunk_tokens is null, except as below
HEAD_GRAD_CHUNK_BYTES = 2 << 30  # logits per chunk where the head's gradients come from the Triton kernel


def head_chunk_rows(chunk_tokens: int | None, vocab: int, itemsize: int, in_place: bool) -> int:
    """Rows per chunk of the LM head: `chunk_tokens` when set. Unset: CHUNK_TOKENS, or, where the head's
    gradients are taken in the forward by the Triton kernel (`in_place`: no chunk is recomputed, and the
    gradient is written over the logits, so a chunk holds one [rows, V] tensor and no float32 copy), as
    many rows as fill HEAD_GRAD_CHUNK_BYTES of logits: fewer, larger matrix multiplies, and fewer passes
    of the float32 weight-gradient accumulator (a [V, H] read and write each)."""
    if chunk_tokens:
        return chunk_tokens
    if in_place:
        return max(CHUNK_TOKENS, HEAD_GRAD_CHUNK_BYTES // (vocab * itemsize))
    return CHUNK_TOKENS


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config dtype name (config.MIXED_PRECISION lists them)."""
    return getattr(torch, name)


def compute_autocast(policy_dtype: str, device: torch.device):
    """Autocast to policy_dtype, the compute dtype of training (float16 has no CPU path: float32 there).
    Training's accelerator and the reference both run under it, so their log-probs agree."""
    if policy_dtype == "float32" or (policy_dtype == "float16" and device.type == "cpu"):
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch_dtype(policy_dtype))


def autocast_forward(forward, policy_dtype: str, device: torch.device):
    """`forward` run under compute_autocast: what Accelerate's prepare does to a model it is given, for
    a model it is not (FSDP2 sharded by sharding.py)."""
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with compute_autocast(policy_dtype, device):
            return forward(*args, **kwargs)
    return run


def trained_positions(loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T-1] bool: position t-1 predicts token t, trained when t is a real loss-mask token.
    Position 0 has no context and is never trained."""
    return loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()


class SequenceLogps(nn.Module):
    """A causal LM whose forward returns, per sequence, the summed log-probs of its trained tokens.

    forward(input_ids [B, T], attention_mask [B, T], loss_mask [B, T]) -> (logps [B] float32, tokens [B])
    Token t is trained when loss_mask[t] == 1 and t > 0; it is predicted from tokens < t.
    Accelerate wraps this module (not the bare LM), so autocast and FSDP see one root forward.
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int | None = None, cudnn_attention: bool = False,
                 compiled: bool = False, uniform_grad: bool = False):
        """`chunk_tokens`: rows per chunk of the LM head (None: head_chunk_rows decides).
        `uniform_grad`: the caller's loss is c * (sum of the returned log-probs), one c for every sequence
        (SFT with every example weighted 1); the head then computes its gradients in the forward
        (module docstring). A loss that weighs sequences differently must leave it False."""
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.cudnn_attention = cudnn_attention
        self.uniform_grad = uniform_grad
        self.graphed = None  # a graphs.GraphedStack: the trainer's, for padding-free training forwards
        if compiled:  # the decoder layers (here, once) and the head's log-softmax (compiling.py)
            compile_layers(lm)
        self.logps = compiled_logps_from_logits() if compiled else logps_from_logits
        self.logps_and_grad = compiled_logps_and_grad() if compiled and uniform_grad else logps_and_grad
        config = lm.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        # Heads that rescale logits in their own forward: we cannot apply their lm_head alone.
        self.plain_head = not any(getattr(config, k, None) not in (None, 1, 1.0) for k in ("logit_scale", "logits_scaling"))

    def causal_lm(self) -> nn.Module:
        """The transformers model, also under a peft wrapper (whose `base_model` is peft's tuner, not the
        decoder); peft injects its adapter layers into this very model, so they run."""
        get_base_model = getattr(self.lm, "get_base_model", None)
        return get_base_model() if get_base_model is not None else self.lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, **packed):
        """A padded batch (input_ids, attention_mask, loss_mask [B, T]) or a padding-free one (input_ids and
        packing.pack's tensors as keywords)."""
        run = self._forward_packed if packed else self._forward
        if self.cudnn_attention or not input_ids.is_cuda:
            return run(input_ids, attention_mask, loss_mask, **packed)
        # SDPA's backward runs the kernel its forward chose, so the choice made here holds for both
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return run(input_ids, attention_mask, loss_mask, **packed)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor):
        predict = trained_positions(loss_mask, attention_mask)  # [B, T-1]
        targets = input_ids[:, 1:][predict]  # [N], row by row
        if self.plain_head:
            lm = self.causal_lm()
            hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
            token_logps = self._token_logps(hidden[:, :-1][predict], targets, lm)  # hidden [N, H]
        else:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            token_logps = gathered_token_logps(logits[:, :-1][predict], targets, self.chunk_tokens or CHUNK_TOKENS,
                                               self.logps)
        # scatter into [B, T-1] and reduce per row: deterministic on GPU, unlike an atomic index_add
        per_position = torch.zeros(predict.shape, dtype=torch.float32, device=input_ids.device)
        per_position = per_position.masked_scatter(predict, token_logps)
        return per_position.sum(dim=1), predict.sum(dim=1)

    def _forward_packed(self, input_ids, attention_mask, loss_mask, *, position_ids, predict, targets, slots,
                        segments, **_):
        """The stream [1, T] of packing.pack; `predict` picks the position before each trained token (a shared
        prompt's last position predicts the first token of both completions)."""
        lm = self.causal_lm()
        if lm.config._attn_implementation != PACKED_ATTENTION:  # SDPA would attend across the whole stream
            raise RuntimeError("a padding-free batch reached a model without packed attention (packing.use_packed_attention)")
        inputs = dict(input_ids=input_ids, position_ids=position_ids, use_cache=False, segments=segments)
        if self.plain_head:
            if self.graphed is not None and self.graphed.applies(input_ids, segments):
                hidden = self.graphed(input_ids, position_ids, segments)  # graphs.py
            else:
                hidden = lm.base_model(**inputs)[0]
            token_logps = self._token_logps(hidden[0].index_select(0, predict), targets, lm)
        else:
            logits = self.lm(**inputs).logits[0].index_select(0, predict)
            token_logps = gathered_token_logps(logits, targets, self.chunk_tokens or CHUNK_TOKENS, self.logps)
        per_slot = torch.zeros(slots.shape, dtype=torch.float32, device=input_ids.device).masked_scatter(slots, token_logps)
        return per_slot.sum(dim=1), slots.sum(dim=1)

    def _token_logps(self, hidden: torch.Tensor, targets: torch.Tensor, lm: nn.Module) -> torch.Tensor:
        """[N] float32 log-probs of targets from the final hidden states [N, H], through the LM head."""
        head = lm.get_output_embeddings()
        if self._gradient_in_forward(hidden, head):
            dtype = head_compute_dtype(hidden.device.type, head.weight)
            in_place = self.logps_and_grad is not logps_and_grad and kernels.serves(hidden.device, dtype, self.softcap)
            chunk = head_chunk_rows(self.chunk_tokens, head.weight.shape[0], dtype.itemsize, in_place)
            return head_logps_uniform_grad(hidden, head.weight, targets, chunk, self.softcap, self.logps_and_grad)
        return chunked_token_logps(hidden, targets, head, self.chunk_tokens or CHUNK_TOKENS, self.softcap, self.logps)

    def _gradient_in_forward(self, hidden: torch.Tensor, head: nn.Module) -> bool:
        """A training forward of a uniform-gradient loss through a plain bias-free linear head whose weight is
        an ordinary tensor (not an FSDP shard, not a peft layer)."""
        if not (HEAD_GRAD_IN_FORWARD and self.uniform_grad and torch.is_grad_enabled() and hidden.shape[0] > 0):
            return False
        if type(head) is not nn.Linear or head.bias is not None or type(head.weight) is not nn.Parameter:
            return False
        return hidden.requires_grad or head.weight.requires_grad


def head_compute_dtype(device_type: str, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matrix multiplies run in: autocast's where it is on, else the weight's."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype


def head_logps_uniform_grad(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                            softcap: float | None = None, logps_and_grad=logps_and_grad) -> torch.Tensor:
    """log p(target) [N] float32 for hidden [N, H] through a linear head of `weight` [V, H], for a loss
    c * sum(returned) with one coefficient c: the gradients are computed here, chunk by chunk, and only
    scaled in the backward, which is exact for that loss and wrong for any other.
    `logps_and_grad`: compiling.logps_and_grad or its compiled twin."""
    return _HeadLogpsUniformGrad.apply(hidden, weight, targets, chunk, softcap, logps_and_grad)


class _HeadLogpsUniformGrad(torch.autograd.Function):
    """Per chunk of rows, in the compute dtype (autocast's, else the weight's):

        logits = h W^T,  g = onehot(target) - softmax(logits)   (= d log p / d logits)
        dH[chunk] = g W,  dW += g^T h   (float32)

    backward(grad [N]): dH * grad per row, and dW * grad[0]: the coefficient every row shares."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, softcap, logps_and_grad):
        device = hidden.device.type
        dtype = head_compute_dtype(device, weight)
        with torch.autocast(device, enabled=False):
            w, h = weight.to(dtype), hidden.to(dtype)
            unit_dh = torch.empty_like(h)
            unit_dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if ctx.needs_input_grad[1] else None
            out = []
            for start, stop in chunk_bounds(h.shape[0], chunk):
                logps, grad = logps_and_grad(h[start:stop] @ w.t(), targets[start:stop], softcap)
                out.append(logps)
                torch.mm(grad, w, out=unit_dh[start:stop])
                if unit_dw is not None:
                    accumulate_mm(unit_dw, grad.t(), h[start:stop])
        ctx.save_for_backward(unit_dh, unit_dw)
        ctx.dtypes = hidden.dtype, weight.dtype
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        unit_dh, unit_dw = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (unit_dh.float() * grad[:, None]).to(hidden_dtype)
        if unit_dw is not None:
            grad_weight = unit_dw.mul_(grad[0]).to(weight_dtype)  # grad[0]: no host sync
        return grad_hidden, grad_weight, None, None, None, None


_ADDMM_TO_FLOAT32: dict[str, bool] = {}


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc in float32 and a, b maybe in a lower precision: on CUDA one cuBLAS call that adds
    into the float32 accumulator (torch's addmm with out_dtype), where this torch has it and it checks out
    on a small case; elsewhere the product in a's dtype, then added."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _addmm_to_float32(a.device):
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    else:
        acc.add_(a @ b)


def _addmm_to_float32(device: torch.device) -> bool:
    key = str(device)
    if key not in _ADDMM_TO_FLOAT32:
        try:
            gen = torch.Generator(device=device).manual_seed(0)
            a, b = (torch.randn(shape, device=device, generator=gen).to(torch.bfloat16) for shape in ((64, 48), (48, 32)))
            acc = torch.ones(64, 32, device=device)
            expected = acc + a.float() @ b.float()
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
            _ADDMM_TO_FLOAT32[key] = bool(torch.allclose(acc, expected, atol=1e-3, rtol=1e-3))
        except (RuntimeError, AttributeError, TypeError):
            _ADDMM_TO_FLOAT32[key] = False
    return _ADDMM_TO_FLOAT32[key]


def chunked_token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk: int,
                        softcap: float | None = None, logps=logps_from_logits) -> torch.Tensor:
    """log p(target) for each row of hidden [N, H]; logits exist only [chunk, V] at a time. -> [N] float32.
    `logps`: logps_from_logits or its compiled twin."""
    out = []
    for start, stop in chunk_bounds(hidden.shape[0], chunk):
        h, t = hidden[start:stop], targets[start:stop]
        if torch.is_grad_enabled() and h.requires_grad:
            # recompute this chunk's logits in backward instead of keeping them alive
            out.append(checkpoint(_head_logps, head, h, t, softcap, logps, use_reentrant=False))
        else:
            out.append(_head_logps(head, h, t, softcap, logps))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) of ceil(n / chunk) chunks of near-equal size, none over `chunk`: no 1-row remainder
    (which a compiled head would take as a new shape) unless n is 1."""
    count = -(-n // chunk)
    edges = [n * i // count for i in range(count + 1)] if count else [0]
    return list(zip(edges[:-1], edges[1:]))


def _head_logps(head: nn.Module, h: torch.Tensor, t: torch.Tensor, softcap: float | None, logps) -> torch.Tensor:
    return logps(head(h), t, softcap)  # head(h): [n, V] logits in the model's dtype


def gathered_token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk: int, logps=logps_from_logits) -> torch.Tensor:
    """Fallback for heads with their own scaling: selected logits [N, V] (model dtype), lse per chunk."""
    out = [logps(logits[a:b], targets[a:b]) for a, b in chunk_bounds(logits.shape[0], chunk)]
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


def load_causal_lm(path: str | Path, dtype: str, attn_implementation: str = "sdpa", *, trainable: bool = True,
                   from_checkpoint: bool = False):
    """A local Hugging Face causal LM in `dtype`, dropout off (as the seed does: DPO's log-ratios
    must not be noisy), `use_cache` off. The frozen reference gets `trainable=False`. A model that cannot
    be loaded is a ConfigError naming model.name_or_path, or, `from_checkpoint`, an InputError (exit 2)
    naming the checkpoint: a damaged checkpoint is not a config mistake."""
    from transformers import AutoModelForCausalLM

    refuse_sharded(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype),
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError, SafetensorError) as e:  # missing, unreadable or truncated weights
        if from_checkpoint:
            from .checkpoint import damaged_checkpoint

            raise damaged_checkpoint(Path(path), Path(path), f"cannot load its model ({first_line(e)})") from None
        raise ConfigError(f"model.name_or_path: cannot load a causal LM from {str(path)!r}: {first_line(e)}") from None
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

    def __init__(self, cfg: Config, device: torch.device, compiled: bool | None = None):
        """`compiled`: as the policy of the run (None: compiling.compile_wanted's choice for `device`)."""
        lm = load_causal_lm(cfg.model.name_or_path, cfg.model.reference_dtype, cfg.model.attn_implementation,
                            trainable=False)
        if cfg.model.archive:
            load_archive(lm, cfg.model.archive)
        self.layout = choose_layout(cfg, lm)[0]  # the policy's, as the model is the same (the run notes why)
        if self.layout != PADDED:
            use_packed_attention(lm)
        if compiled is None:
            compiled = compile_wanted(cfg, device)
        self.model = SequenceLogps(lm, cfg.logprob_chunk_tokens, cfg.model.cudnn_attention, compiled).to(device)
        self.policy_dtype = cfg.model.policy_dtype
        self.device = device

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        """[B] float32 summed log-probs of the trained tokens of each sequence of a collated batch."""
        with compute_autocast(self.policy_dtype, self.device):
            return self.model(**model_inputs(batch))[0]


MODEL_INPUTS = ("input_ids", "attention_mask", "loss_mask", "position_ids", "predict", "targets", "slots", "segments")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The entries of a collated batch (padded or padding-free) that SequenceLogps.forward takes."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # attention modules pass it to the kernel
            module.attention_dropout = 0.0


def resolve_model_dir(path: str | Path) -> Path:
    """A model or LoRA adapter directory, or a run directory / checkpoints directory of ours -> its latest checkpoint."""
    from .checkpoint import latest_checkpoint
    from .lora import is_adapter_dir

    path = Path(path)
    if (path / "config.json").exists() or is_adapter_dir(path):
        return path
    for candidate in (path, path / "checkpoints"):
        latest = latest_checkpoint(candidate) if candidate.is_dir() else None
        if latest is not None:
            return latest
    raise ConfigError(f"{path}: not a model directory (no config.json) and no checkpoint of ours in it")


def refuse_sharded(path: str | Path) -> None:
    """A checkpoint whose weights exist only as the shards of the processes that wrote them is not a model
    directory yet: say how to make one."""
    from .sharding import weights_only_sharded

    if weights_only_sharded(Path(path)):
        raise ConfigError(f"{path}: its weights are sharded over the processes that trained it (sharded/, "
                          f"trainer: FSDPTrainer); make a model directory of it with `aligntrain export {path} OUT`")


def load_archive(model: nn.Module, archive: str | Path) -> None:
    """Load archive weights into `model`: the seed's `policy.pt` ({"state": state_dict, ...}, read with
    weights_only=True), a bare state-dict `.pt`, or a model/checkpoint/run directory of ours (a LoRA
    checkpoint's adapter is merged into `model`, which must then be its base)."""
    archive = Path(archive)
    if not archive.exists():
        raise ConfigError(f"model.archive: {archive} does not exist")
    if archive.is_dir():
        from .lora import is_adapter_dir, merge_adapter_into

        model_dir = resolve_model_dir(archive)
        if is_adapter_dir(model_dir):  # a LoRA run: its base is model.name_or_path, its update the adapter
            merge_adapter_into(model, model_dir)
            return
        refuse_sharded(model_dir)
        state = _read_safetensors_dir(model_dir)
    else:
        try:
            obj = torch.load(archive, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types; all mean "not a weights-only archive"
            raise ConfigError(f"model.archive: {archive} is not a weights-only torch archive ({first_line(e)})") from None
        state = obj["state"] if isinstance(obj, dict) and isinstance(obj.get("state"), dict) else obj
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"model.archive: {archive} holds no state dict (expected {{'state': state_dict, ...}})")
    own = model.state_dict()
    reshaped = [f"{k} is {list(v.shape)}, the model's {list(own[k].shape)}" for k, v in state.items()
                if k in own and v.shape != own[k].shape]
    if reshaped:  # load_state_dict would raise with every mismatch on its own line
        raise ConfigError(f"model.archive: {archive} does not match model.name_or_path ({len(reshaped)} tensors of "
                          f"another shape, e.g. {'; '.join(reshaped[:2])})")
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


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors run on for pages)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
