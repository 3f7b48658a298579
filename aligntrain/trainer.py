"""The training loop, top to bottom: build, (resume), then for each optimizer step: eval when due,
forward/backward every micro-batch, check the loss, clip, step, log, checkpoint when due.

One optimizer step consumes `total_batch_size` examples across all processes (the seed's
definition). The loss of a step is normalised by a *global* count known before the forwards run:
trained tokens for SFT, pairs for preference losses. Each process backpropagates
`sum(its per-token or per-pair losses) * world_size / global_count`, which, after the data-parallel
gradient average, is exactly the gradient of the mean over the whole accumulated batch.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aligndata.errors import InputError, RunStopped
from aligndata.write.shards import ShardMismatch

from .checkpoint import CHECKPOINTS, latest_checkpoint, load_training_state, save_checkpoint
from .compiling import compile_wanted, decoder_layers
from .config import MIXED_PRECISION, Config, ConfigError, defaults_note, working_weights_conflict
from .data import (ShardSplit, check_shards, collate, eval_batches, micro_batches, pad_token_id, process_share,
                   shards_chat_template, step_indices, to_device, total_steps)
from .flops import mfu, training_flops
from .lora import AdapterOffReference, fsdp_wrap_policy, lora_policy
from .masters import MasterAdam, attach_working_copies
from .losses import PREFERENCE_LOSSES, PairLogps, preference_rewards, sft_loss
from .metrics import MetricsLogger
from .modeling import (Reference, SequenceLogps, autocast_forward, compute_autocast, load_archive, load_causal_lm,
                       load_tokenizer, model_inputs, torch_dtype)
from .packing import PACKED, PADDED, choose_layout, use_packed_attention
from .precompute import reference_identity
from .resume import config_text, record_changes, resume_changes, shards_identity, take_current_hyperparameters, trim_metrics
from .runlock import hold_run_lock
from .signals import Interrupted, StopRequest, terminated
from . import flash4, sharding

PREFERENCE_SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                   "logps/chosen", "logps/rejected", "pairs", "input_tokens")


class NonFiniteLossError(RunStopped):
    """The loss or gradient norm became NaN/Inf; training stopped before the optimizer step."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    checkpoint: Path | None
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    first_eval_metrics: dict[str, float] = field(default_factory=dict)  # do_first_eval: before the first step
    history: list[dict[str, float]] = field(default_factory=list)  # per-step train metrics of this invocation
    is_main: bool = True


def train(cfg: Config, shards: str | Path, *, resume: bool = False, console=None) -> TrainResult:
    """Train with the run directory locked (one training per output_dir; the main process holds it)
    and SIGTERM/SIGUSR1 turned into a checkpoint and a clean stop."""
    lock = hold_run_lock(cfg.output_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
    with lock, StopRequest() as stop:
        return _train(cfg, shards, resume, console, stop)


def _train(cfg: Config, shards: str | Path, resume: bool, console, stop: StopRequest) -> TrainResult:
    # -- build -------------------------------------------------------------------------------------
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own display reports progress
    shards = Path(shards)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    manifest = check_shards(shards, cfg, tokenizer, cfg.task)
    tokenizer.chat_template = shards_chat_template(shards, manifest, tokenizer, cfg)  # what checkpoints ship
    train_split = ShardSplit(shards, "train", manifest)
    eval_split = ShardSplit(shards, "eval", manifest) if "eval" in manifest["splits"] else train_split
    steps = total_steps(len(train_split), cfg)
    run_dir = Path(cfg.output_dir)
    latest = latest_checkpoint(run_dir / CHECKPOINTS)
    if latest is not None and not resume:
        raise ConfigError(f"{run_dir}: this run already has checkpoints; pass --resume to continue it, "
                          "or choose another output_dir")
    resume_from = latest if resume else None
    changed = resume_changes(resume_from, cfg, manifest) if resume_from is not None else {}

    # float32 master weights; policy_dtype bfloat16/float16 is the autocast compute dtype
    if cfg.model.lora is not None:
        policy = lora_policy(cfg, resume_from)  # frozen base (+ archive) in reference_dtype, float32 adapters
    else:
        if resume_from is not None and not sharding.weights_only_sharded(resume_from):
            policy = load_causal_lm(resume_from, "float32", cfg.model.attn_implementation, from_checkpoint=True)
        else:  # a fresh run, or resuming from sharded weights (load_training_state reads them in)
            policy = load_causal_lm(cfg.model.name_or_path, "float32", cfg.model.attn_implementation)
        if cfg.model.archive and resume_from is None:
            load_archive(policy, cfg.model.archive)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(policy)
    layout, layout_note = choose_layout(cfg, policy)
    if layout != PADDED:
        use_packed_attention(policy)
    use_shard_reference = _use_shard_reference(cfg, manifest, train_split, eval_split)

    accelerator = make_accelerator(cfg, policy)
    world, rank = accelerator.num_processes, accelerator.process_index
    check_batch_geometry(cfg, world)
    sharded = shards_itself(cfg, world)  # FSDP2, applied here (sharding.py)
    fsdp = sharded or getattr(accelerator.state, "fsdp_plugin", None) is not None
    fused = accelerator.device.type == "cuda" and not fsdp
    if fused:  # fused Adam(W) checks at construction that its parameters are on the GPU
        policy.to(accelerator.device)
    # the one-GPU fast path under FSDP2 too (layers compiled before they are sharded); not under FSDP1's flat
    # parameters. SFT's loss weighs every trained token alike: the head's gradients can come with its forward
    compiled = compile_wanted(cfg, accelerator.device, fsdp=fsdp and not sharded)
    flash_note = flash4.configure(cfg.model.flash_attention, accelerator.device, layout != PADDED,
                                  flash4.attention_width(policy.config), cfg.cuda_graphs)
    working = {}  # float32 master -> its bf16 working copy (masters.py)
    if _working_weights(cfg, accelerator.device, compiled, fsdp, world):
        working = attach_working_copies(decoder_layers(policy), torch_dtype(cfg.model.policy_dtype))
    model = SequenceLogps(policy, cfg.logprob_chunk_tokens, cfg.model.cudnn_attention, compiled,
                          uniform_grad=cfg.task == "sft" and (sharded or not fsdp))
    mp = torch_dtype(cfg.model.fsdp_policy_mp) if cfg.model.fsdp_policy_mp else None
    if sharded:
        sharding.shard(model, accelerator.device, mp)
        model.forward = autocast_forward(model.forward, cfg.model.policy_dtype, accelerator.device)
    optimizer = build_optimizer(cfg, model, fused=fused, working=working)  # over the sharded parameters where sharded
    scheduler = build_scheduler(cfg, optimizer, steps)
    if sharded:  # Accelerate would wrap the model in DDP: it gets the optimizer alone
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    graphed = cfg.cuda_graphs and _graph_stack(cfg, accelerator, model, policy, layout, steps, train_split, world,
                                               pad_token_id(tokenizer))
    reference = None
    if cfg.task == "dpo" and not cfg.loss.reference_free and not use_shard_reference:
        reference = AdapterOffReference(model, policy) if cfg.model.lora else Reference(cfg, accelerator.device, compiled)
        if sharded and not cfg.model.lora:  # sharded like the policy, its gathered weights freed after each forward
            sharding.shard(reference.model, accelerator.device, mp, reshard_root=True)
    # LoRA computes no weight gradients of the frozen base: the 6N-per-token rule of flops.py does not hold
    objective = Objective(cfg, reference, accelerator, layout, None if cfg.model.lora else policy.config)

    start = 0
    if resume_from is not None:
        weight_decays = [g["weight_decay"] for g in optimizer.param_groups]  # the current config's
        start = load_training_state(resume_from, accelerator, model, optimizer, scheduler)["step"]
        if working:
            _inner(optimizer).sync_working_copies()
        take_current_hyperparameters(cfg, optimizer, scheduler, weight_decays)
    notes = _prepare_run_dir(run_dir, cfg, start, changed, accelerator)
    log = MetricsLogger(cfg, run_dir, steps, start, enabled=accelerator.is_main_process, console=console)
    defaults = defaults_note(cfg)
    if defaults:
        log.note(defaults)
    if resume:
        log.note(f"resuming from {resume_from} (step {start} of {steps})" if resume_from is not None
                 else f"--resume: no checkpoint in {run_dir / CHECKPOINTS} yet; starting at step 0")
    if compiled:
        notes.append("compile: decoder layers and the head's log-softmax are compiled (torch.compile); the first step "
                     "includes compiling them (compile: false turns it off)")
    if working:
        notes.append(f"working_weights: {len(working)} linear weights and biases of the decoder layers train through "
                     f"{cfg.model.policy_dtype} working copies, their float32 masters updated by MasterAdam "
                     "(working_weights: false keeps autocast's casts)")
    if flash_note:
        notes.append(flash_note)
    for note in notes + ([layout_note] if layout_note else []):
        log.note(note)
    if eval_split is train_split and (cfg.do_first_eval or cfg.eval_every_steps):
        log.note("no eval split in the shards: evaluating on the first rows of the train split")
    if use_shard_reference:
        log.note("reference log-probs come from the shards (precomputed); no reference model is loaded")

    # -- train -------------------------------------------------------------------------------------
    result = TrainResult(run_dir=run_dir, steps=steps, checkpoint=resume_from, is_main=accelerator.is_main_process)
    try:
        if start == 0 and cfg.do_first_eval:
            result.eval_metrics = evaluate(model, objective, eval_split, cfg, accelerator, pad_token_id(tokenizer))
            result.first_eval_metrics = result.eval_metrics
            log.log(0, "eval", result.eval_metrics)
        def step_batches(step: int, device=None) -> list[dict[str, Any]]:
            """This process's collated micro-batches of 0-based optimizer step `step` (a function of the step
            alone, so prefetching changes nothing); `device`: sent there without waiting for the copies."""
            rows = process_share(step_indices(step, len(train_split), cfg.total_batch_size, cfg.seed), rank, world)
            parts = micro_batches(rows, train_split.widths, cfg.gradient_accumulation_steps, cfg.tokens_per_batch,
                                  sequences_per_row=1 if cfg.task == "sft" else 2, sizes=train_split.stream_tokens(layout))
            batches = [collate(train_split.rows(p), cfg.task, pad_token_id(tokenizer), layout, cfg.max_length)
                       for p in parts]
            return batches if device is None else [to_device(b, device, non_blocking=True) for b in batches]

        upcoming: dict[int, list[dict[str, Any]]] = {}

        def prefetch(step: int) -> None:  # called by train_step once the GPU has a backward to work through
            if step < steps and PREFETCH:
                upcoming[step] = step_batches(step, accelerator.device)

        clock = StepClock()

        def finish(queued: QueuedStep) -> dict[str, float]:
            """A step's metrics, read (waiting for the GPU as far as they are computed), checked and logged."""
            metrics = queued.metrics(clock)
            result.train_metrics = metrics
            result.history.append(metrics)
            log.log(queued.step, "train", metrics, show=queued.step % cfg.log_every_steps == 0 or queued.step == steps)
            return metrics

        pending = None  # a queued step whose metrics are read once the next step is queued
        for step in range(start, steps):
            batches = upcoming.pop(step, None) or step_batches(step)
            queued = train_step(step + 1, model, objective, optimizer, scheduler, batches, cfg, accelerator,
                                prefetch=lambda nxt=step + 1: prefetch(nxt), keep_grads=bool(graphed))
            if pending is not None:
                finish(pending)
            pending = queued
            evaluating = _due(step + 1, cfg.eval_every_steps, steps)
            stopping = step + 1 < steps and stop.requested(accelerator)
            saving = not cfg.debug and (step + 1 == steps or _due(step + 1, cfg.save_every_steps, steps) or stopping)
            if evaluating or saving or stopping or step + 1 == steps or not queued.deferred:
                metrics, pending = finish(queued), None
            if evaluating:
                result.eval_metrics = evaluate(model, objective, eval_split, cfg, accelerator, pad_token_id(tokenizer))
                log.log(step + 1, "eval", result.eval_metrics)
            if saving:
                state = {"total_steps": steps, "examples_seen": (step + 1) * cfg.total_batch_size,
                         "world_size": world, "train_metrics": metrics, "eval_metrics": result.eval_metrics,
                         "shards": shards_identity(manifest)}
                result.checkpoint = save_checkpoint(accelerator, run_dir, step + 1, model, optimizer, scheduler,
                                                    tokenizer, cfg, state)
            if stopping:
                raise terminated(stop.signal, step + 1, None if cfg.debug else result.checkpoint)
    except KeyboardInterrupt:
        raise Interrupted(latest_checkpoint(run_dir / CHECKPOINTS)) from None
    finally:
        log.close()
    if sharded:  # every process done with collectives, the sharded state freed, then the process group ended
        accelerator.wait_for_everyone()
        del model, policy, optimizer, reference, objective
        gc.collect()
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


PREFETCH = True  # the next step's batches prepared during this step's backward (benchmarks turn it off to measure it)


def train_step(step: int, model, objective: "Objective", optimizer, scheduler, batches: list[dict[str, torch.Tensor]],
               cfg: Config, accelerator, prefetch=None, keep_grads: bool = False) -> "QueuedStep":
    """One optimizer step over this process's micro-batches, queued; returns a QueuedStep whose metrics() are
    the step's global metrics (read from the GPU then, where _skips_on_device; else read here already, and a
    non-finite loss or gradient norm raised here, before the update).
    `prefetch()` runs once every backward is queued: the host prepares the next step while the GPU works.
    `keep_grads`: gradients are zeroed in place, never freed (graphs.py: CUDA graphs in the backward)."""
    started = time.perf_counter()
    model.train()
    count = objective.global_count(batches)
    world = accelerator.num_processes
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with _gradient_sync(model, accelerator, last):
            loss, batch_sums = objective(model, to_device(batch, accelerator.device), count)
            accelerator.backward(loss * world)
        if not last and isinstance(_inner(optimizer), MasterAdam):
            _inner(optimizer).fold()  # bf16 working-copy gradients summed in float32
        sums = {k: sums.get(k, 0) + v for k, v in batch_sums.items()}
    if prefetch is not None:
        prefetch()
    for key in ("useful_tokens", "attention_pairs"):
        sums[key] = float(sum(b[key] for b in batches))
    max_norm = cfg.max_grad_norm or float("inf")
    if _skips_on_device(optimizer, accelerator, model):
        names = sorted(sums)
        stacked = _reduce_stacked(sums, names, accelerator)
        grad_norm = _clip_grad_norm(model, optimizer, accelerator, max_norm)
        _skip_unless_finite(optimizer, stacked[names.index(objective.loss_sum)], grad_norm)
        values = HostCopy(torch.cat([stacked, grad_norm.detach().reshape(1).float()]))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=not keep_grads)
        return QueuedStep(step, started, objective, cfg, world, lr, names=names, values=values)
    totals = _all_reduce(sums, accelerator)
    metrics = objective.finish(totals)
    _stop_unless_finite("loss", metrics["loss"], step)
    grad_norm = float(_clip_grad_norm(model, optimizer, accelerator, max_norm))
    if accelerator.mixed_precision != "fp16":  # fp16's scaler skips such steps
        _stop_unless_finite("gradient norm", grad_norm, step)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=not keep_grads)
    return QueuedStep(step, started, objective, cfg, world, lr, known=({**metrics, "grad_norm": grad_norm}, totals))


def _stop_unless_finite(what: str, value: float, step: int) -> None:
    """NonFiniteLossError naming `what` and the step where `value` is NaN or infinite."""
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{what} is {value} at step {step}; stopped before the optimizer step")


ASYNC_METRICS = True  # a step's metrics read while the next step runs, where that is exact (benchmarks turn it off)


def _skips_on_device(optimizer, accelerator, model) -> bool:
    """Whether this step can leave its loss and gradient norm on the GPU until the next step is queued: the
    optimizer is torch's fused Adam(W), which skips its whole update (and its step count) on the GPU when
    given a nonzero `found_inf`, so a non-finite step changes nothing before the host sees it. Not under
    float16's loss scaler (it owns found_inf) nor sharded parameters (their own clipping, sharding.py)."""
    inner = _inner(optimizer)
    fused = bool(inner.defaults.get("fused")) or isinstance(inner, MasterAdam)
    return (ASYNC_METRICS and fused and accelerator.mixed_precision != "fp16"
            and accelerator.scaler is None and not sharding.is_sharded(model))


def _skip_unless_finite(optimizer, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """The optimizer's found_inf: 1 once a step's loss or gradient norm is not finite, and from then on (the
    host stops the run when it reads that step, and the step queued meanwhile must not update either)."""
    inner = _inner(optimizer)
    bad = (~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))).float()
    previous = getattr(inner, "found_inf", None)
    inner.found_inf = bad if previous is None else torch.maximum(previous, bad)


def _reduce_stacked(sums: dict[str, Any], names: list[str], accelerator) -> torch.Tensor:
    """The step's sums in the order of `names`, summed over processes: one float32 tensor on the device.
    The sums the host holds (token counts) go to the GPU in one copy from pinned memory, queued: a copy from
    pageable memory makes torch wait for the stream to drain, so the host would queue the clip and the
    update only once the backward had ended, with the GPU idle meanwhile."""
    device = accelerator.device
    on_host = [k for k in names if not isinstance(sums[k], torch.Tensor)]
    host = torch.tensor([float(sums[k]) for k in on_host], dtype=torch.float32)
    host = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    column = dict(zip(on_host, host.unbind(0)))
    stacked = torch.stack([column[k] if k in column else torch.as_tensor(sums[k], dtype=torch.float32, device=device)
                           for k in names])
    return accelerator.reduce(stacked, "sum")


class HostCopy:
    """A small device tensor on its way to the host: copied into pinned memory without waiting, behind an
    event, so that read() waits for this copy alone and not for whatever the GPU was given after it."""

    def __init__(self, values: torch.Tensor):
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = values.detach().clone(), None

    def read(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class StepClock:
    """When the host last saw a step finished: a step's time is from then (or from its start, if later) to
    when its own metrics arrive, so steps read one behind still add up to the run's time."""

    def __init__(self):
        self.last = 0.0

    def lap(self, started: float) -> float:
        now = time.perf_counter()
        seconds, self.last = max(now - max(started, self.last), 1e-9), now
        return seconds


class QueuedStep:
    """An optimizer step whose work is queued: metrics(clock) reads its values (ASYNC_METRICS: from the GPU,
    once the next step is queued), stops the run if they are not finite, and adds rates and MFU."""

    def __init__(self, step: int, started: float, objective: "Objective", cfg: Config, world: int, lr: float, *,
                 names: list[str] | None = None, values: HostCopy | None = None,
                 known: tuple[dict[str, float], dict[str, float]] | None = None):
        """Either `names` and `values` (the sums in that order, then the gradient norm, still on their way
        from the GPU) or `known`: (metrics, totals) read already."""
        self.step, self.started, self.objective, self.cfg, self.world, self.lr = step, started, objective, cfg, world, lr
        self.names, self.values, self.known = names, values, known

    @property
    def deferred(self) -> bool:
        """Its values come from the device (read when metrics() is first called), not read already."""
        return self.values is not None

    def metrics(self, clock: StepClock) -> dict[str, float]:
        if self.known is None:
            read = self.values.read()
            totals = dict(zip(self.names, read[:-1]))
            metrics, grad_norm = self.objective.finish(totals), read[-1]
            # the optimizer skipped this step's update and the next one's (found_inf)
            _stop_unless_finite("loss", metrics["loss"], self.step)
            _stop_unless_finite("gradient norm", grad_norm, self.step)
            self.known = {**metrics, "grad_norm": grad_norm}, totals
        metrics, totals = dict(self.known[0]), self.known[1]
        seconds = clock.lap(self.started)
        metrics.update({"lr": self.lr, "examples_per_s": self.cfg.total_batch_size / seconds,
                        "tokens_per_s": totals["input_tokens"] / seconds})
        utilisation = self.objective.mfu(totals["useful_tokens"], totals["attention_pairs"], seconds * self.world)
        if utilisation is not None:  # GPU-seconds
            metrics["mfu"] = utilisation
        return metrics


@torch.no_grad()
def evaluate(model, objective: "Objective", split: ShardSplit, cfg: Config, accelerator, pad_id: int) -> dict[str, float]:
    """Metrics over the first n_eval_examples rows of `split`, every row counted once."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for indices, weights in eval_batches(len(split), cfg.n_eval_examples, cfg.eval_batch_size,
                                         accelerator.process_index, accelerator.num_processes):
        batch = collate(split.rows(indices), split.task, pad_id, objective.layout, cfg.max_length)
        batch["weights"] = torch.from_numpy(weights)
        _, batch_sums = objective(model, to_device(batch, accelerator.device))
        sums = {k: sums.get(k, 0) + v for k, v in batch_sums.items()}
    return objective.finish(_all_reduce(sums, accelerator))


class Objective:
    """Loss and metric sums of one micro-batch, for the task of the config.

    __call__(model, batch, count) -> (loss, sums): the batch's share of the step loss, i.e. its summed
    per-token (SFT) or per-pair losses divided by `count`, the step's global token or pair count;
    sums are detached per-batch totals that `finish` turns into means after the all-reduce.
    """

    def __init__(self, cfg: Config, reference: Reference | None, accelerator, layout: str = PADDED, model_config=None):
        self.cfg = cfg
        self.layout = layout  # of the batches it is given (data.collate)
        self.model_config = model_config  # the policy's transformers config, for the FLOPs of a step
        device = accelerator.device
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.task = cfg.task
        self.reference = reference
        self.accelerator = accelerator
        self.loss_fn = PREFERENCE_LOSSES.get(cfg.loss.name)

    def global_count(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """The step's normaliser over all processes: trained tokens (SFT) or pairs (preference)."""
        if self.task == "dpo":
            return float(self.cfg.total_batch_size)
        local = sum(b["trained_tokens"] for b in batches)
        if self.accelerator.num_processes == 1:
            return max(float(local), 1.0)
        total = self.accelerator.reduce(torch.tensor(float(local), device=self.accelerator.device), "sum")
        return max(float(total), 1.0)

    def __call__(self, model, batch: dict[str, torch.Tensor], count: float = 1.0):
        logps, tokens = model(**model_inputs(batch))
        n = logps.shape[0] if self.task == "sft" else logps.shape[0] // 2
        weights = batch.get("weights", torch.ones(n, device=logps.device)).to(logps.device)
        input_tokens = batch["lengths"].to(logps.device).float()
        if self.task == "sft":
            loss = sft_loss(logps * weights, count)
            return loss, {"nll": -(logps * weights).sum().detach(), "tokens": (tokens * weights).sum(),
                          "input_tokens": (input_tokens * weights).sum()}

        pairs = PairLogps(logps[:n], logps[n:], *self._reference_logps(batch, n, logps), tokens[:n], tokens[n:])
        if self.cfg.loss.reference_free:
            pairs = pairs.without_reference()
        losses = self.loss_fn(pairs, self.cfg.loss.beta, self.cfg.loss.label_smoothing)
        chosen, rejected = preference_rewards(pairs, self.cfg.loss.beta)
        loss_sum = (losses * weights).sum()

        def w(t: torch.Tensor) -> torch.Tensor:  # a weighted sum for the metrics
            return (t.detach().float() * weights).sum()

        return loss_sum / count, {
            "loss": loss_sum.detach(), "rewards/chosen": w(chosen), "rewards/rejected": w(rejected),
            "rewards/accuracies": w(chosen > rejected), "rewards/margins": w(chosen - rejected),
            "logps/chosen": w(pairs.policy_chosen), "logps/rejected": w(pairs.policy_rejected),
            "pairs": weights.sum(), "input_tokens": (input_tokens * torch.cat([weights, weights])).sum(),
        }

    def _reference_logps(self, batch: dict[str, torch.Tensor], n: int, like: torch.Tensor):
        if self.reference is not None:
            ref = self.reference(batch)
            return ref[:n], ref[n:]
        if "ref_chosen" in batch:  # precomputed by `aligntrain precompute-ref`
            return batch["ref_chosen"].to(like.device), batch["ref_rejected"].to(like.device)
        zeros = torch.zeros(n, device=like.device)  # reference_free: no reference at all
        return zeros, zeros

    def mfu(self, tokens: float, pairs: float, gpu_seconds: float) -> float | None:
        """Model FLOPs utilisation of a step's GPU-seconds (flops.py's useful FLOPs; the reference's forward
        counts when it runs live); None off CUDA, under LoRA or on a card whose peak is not known."""
        if self.device_name is None or self.model_config is None:
            return None
        live = self.reference is not None
        flops = training_flops(self.model_config, int(tokens), int(pairs), int(tokens) if live else 0,
                               int(pairs) if live else 0)
        return mfu(flops, gpu_seconds, self.device_name)

    @property
    def loss_sum(self) -> str:
        """The sum whose total the step's loss divides by a count: not finite exactly when the loss is not."""
        return "nll" if self.task == "sft" else "loss"

    def finish(self, totals: dict[str, float]) -> dict[str, float]:
        if self.task == "sft":
            return {"loss": totals["nll"] / max(totals["tokens"], 1.0), "trained_tokens": totals["tokens"],
                    "input_tokens": totals["input_tokens"]}
        pairs = max(totals["pairs"], 1.0)
        out = {k: totals[k] / pairs for k in PREFERENCE_SUMS if k not in ("pairs", "input_tokens")}
        out["input_tokens"] = totals["input_tokens"]
        return out


# -- building blocks ------------------------------------------------------------------------------

def _due(step: int, every: int | None, last: int) -> bool:
    """Every `every` steps, and after the last one; never when `every` is unset."""
    return bool(every) and (step % every == 0 or step == last)


def make_accelerator(cfg: Config, policy):
    """Mixed precision from policy_dtype (float16 has no CPU kernel path: CPU runs it as float32);
    FSDPTrainer shards over the launched processes; one process is plain single-device training."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    precision = MIXED_PRECISION[cfg.model.policy_dtype]
    if precision == "fp16" and not torch.cuda.is_available():
        precision = "no"
    kwargs: dict[str, Any] = {}
    if _world_size() == 1:  # a fresh state per run in one Python process (tests, notebooks)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    plugin = _fsdp_from_launcher() or (cfg.trainer == "FSDPTrainer" and _world_size() > 1 and not sharding.fsdp2_available())
    if plugin and not torch.cuda.is_available():  # Accelerate's FSDP raises a RuntimeError with no device
        raise ConfigError("Accelerate's FSDP (an accelerate config with FSDP, or torch older than 2.6) shards the "
                          "model over GPUs and there is none here; on CPU, trainer: FSDPTrainer shards it without "
                          "an FSDP accelerate config (torch 2.6 or newer), or trainer: BasicTrainer trains data-parallel")
    if plugin and not _fsdp_from_launcher():  # FSDPTrainer where torch has no FSDP2: Accelerate's FSDP1
        from accelerate import FullyShardedDataParallelPlugin

        mp = cfg.model.fsdp_policy_mp  # the seed's key: dtype of sharded parameters, reductions and buffers
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=list(getattr(policy, "_no_split_modules", None) or []),
            state_dict_type="FULL_STATE_DICT", use_orig_params=True, sync_module_states=True,
            mixed_precision_policy={k: torch_dtype(mp) for k in ("param_dtype", "reduce_dtype", "buffer_dtype")} if mp else None)
    accelerator = Accelerator(mixed_precision=precision, **kwargs)
    if accelerator.num_processes != _world_size():  # each process would train every row alone, in one run dir
        raise InputError(f"the launcher started {_world_size()} processes (WORLD_SIZE) but Accelerate joined "
                         f"{accelerator.num_processes}; on CPU, set ACCELERATE_USE_CPU=true for gloo")
    if cfg.model.lora is not None and getattr(accelerator.state, "fsdp_plugin", None) is not None:  # ours or the launcher's
        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_wrap_policy(policy)
    return accelerator


def _graph_stack(cfg: Config, accelerator, model, policy, layout: str, steps: int, split: ShardSplit, world: int,
                 pad_id: int) -> bool:
    """Give the policy's log-prob module a graphs.GraphedStack over buckets planned from every micro-batch of
    the run (cuda_graphs: true), its graphs recorded now where every stream holds the same number of
    sequences; a ConfigError where graphs do not apply."""
    from .graphs import GraphedStack, keep_gradients, plan_buckets

    why = ("padding-free batches without a shared prompt" if layout != PACKED else
           "one process without sharding" if world > 1 else
           "full-weight training" if cfg.model.lora is not None else
           "a CUDA device" if accelerator.device.type != "cuda" else None)
    if why is not None:
        raise ConfigError(f"cuda_graphs: true needs {why}; set cuda_graphs: false")
    sizes = split.stream_tokens(layout)
    lengths = []
    for step in range(steps):
        rows = step_indices(step, len(split), cfg.total_batch_size, cfg.seed)
        for part in micro_batches(rows, split.widths, cfg.gradient_accumulation_steps, cfg.tokens_per_batch, 1, sizes):
            lengths.append(int(sizes[part].sum()))
    inner = accelerator.unwrap_model(model)
    inner.graphed = GraphedStack(policy.base_model, plan_buckets(lengths, cfg.cuda_graph_buckets), pad_id)
    keep_gradients(inner.parameters())
    if cfg.tokens_per_batch is None:  # every stream holds this many sequences: record the graphs up front
        sequences = cfg.total_batch_size // (world * cfg.gradient_accumulation_steps) * (2 if cfg.task == "dpo" else 1)
        inner.train()
        with torch.enable_grad(), compute_autocast(cfg.model.policy_dtype, accelerator.device):
            inner.graphed.record(sequences, cfg.max_length, accelerator.device)
    return True


def shards_itself(cfg: Config, world: int) -> bool:
    """FSDPTrainer over several processes shards with FSDP2 (sharding.py) where torch provides it, unless
    the launcher brought an FSDP accelerate config (then Accelerate's FSDP, as that config says)."""
    return cfg.trainer == "FSDPTrainer" and world > 1 and not _fsdp_from_launcher() and sharding.fsdp2_available()


def _gradient_sync(model, accelerator, sync: bool):
    """Where gradients are reduced across processes: after the step's last micro-batch only."""
    if sharding.is_sharded(model):
        return sharding.gradient_sync(model, sync)
    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


def _clip_grad_norm(model, optimizer, accelerator, max_norm: float) -> torch.Tensor | float:
    """The gradients' total norm, the gradients clipped to max_norm (MasterAdam: as its update reads them)."""
    if isinstance(_inner(optimizer), MasterAdam):
        return _inner(optimizer).clip_grad_norm_(max_norm)
    if sharding.is_sharded(model):
        accelerator.unscale_gradients()  # float16's loss scale (a no-op otherwise)
        return sharding.clip_grad_norm_(model.parameters(), max_norm)
    return accelerator.clip_grad_norm_(model.parameters(), max_norm)


def _inner(optimizer):
    """The optimizer under Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _working_weights(cfg: Config, device: torch.device, compiled: bool, fsdp: bool, world: int) -> bool:
    """Whether the policy's linear layers get bf16 working copies (masters.py). working_weights: null -> where
    the config allows them (working_weights_conflict), one unsharded process, on CUDA with compiled layers
    (the fast path they are for); true -> wherever the config allows them (CPU too: the tests' path)."""
    if cfg.working_weights is False:
        return False
    fits = working_weights_conflict(cfg) is None
    one = world == 1 and not fsdp
    if cfg.working_weights is None:
        return fits and one and device.type == "cuda" and compiled
    if not one:
        raise ConfigError("working_weights: true needs one process training an unsharded model (the working "
                          "copies' gradients are not all-reduced); set working_weights: null")
    return True


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def gpus_left_idle(cfg: Config) -> int:
    """The visible CUDA GPUs of an FSDPTrainer run started without a launcher, when there are several
    (it would train on one of them); 0 when the run is fine as started. `accelerate launch` with one
    process sets no WORLD_SIZE but always ACCELERATE_MIXED_PRECISION: that run asked for one process."""
    if cfg.trainer != "FSDPTrainer" or any(k in os.environ for k in ("WORLD_SIZE", "ACCELERATE_MIXED_PRECISION")):
        return 0
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return gpus if gpus > 1 else 0


def _fsdp_from_launcher() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every decoder layer (transformers renamed the method in 5.x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_batch_geometry(cfg: Config, world: int) -> None:
    per_step = world if cfg.tokens_per_batch else world * cfg.gradient_accumulation_steps
    if cfg.total_batch_size % per_step:
        what = "processes" if cfg.tokens_per_batch else "processes x gradient_accumulation_steps"
        raise ConfigError(f"total_batch_size ({cfg.total_batch_size}) must be divisible by {what} ({per_step})")


OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "RMSprop": torch.optim.RMSprop,
              "SGD": torch.optim.SGD}


def build_optimizer(cfg: Config, model: torch.nn.Module, fused: bool = False,
                    working: dict | None = None) -> torch.optim.Optimizer:
    """Weight decay on matrices only: norms, biases and other vectors are not decayed. `fused`: Adam(W)'s
    one-kernel update (parameters on one CUDA device), instead of a loop of kernels per tensor group.
    `working`: float32 masters with bf16 working copies (masters.py): MasterAdam updates both."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if working:
        return MasterAdam([g for g in groups if g["params"]], lr=cfg.lr, decoupled=cfg.optimizer == "AdamW",
                          working=working)
    extra = {"fused": True} if fused and cfg.optimizer in ("Adam", "AdamW") else {}
    return OPTIMIZERS[cfg.optimizer]([g for g in groups if g["params"]], lr=cfg.lr, **extra)


def lr_factor(step: int, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Multiplier of lr for 0-based optimizer step `step`: the seed's linear warmup
    min(1, (step + 1) / (warmup + 1)), then constant, linear or cosine decay to min_ratio."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(cfg: Config, optimizer, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, steps, cfg.scheduler, cfg.min_lr_ratio))


def _use_shard_reference(cfg: Config, manifest: dict[str, Any], train_split: ShardSplit, eval_split: ShardSplit) -> bool:
    """Use precomputed reference log-probs when the shards have them for the configured reference."""
    if cfg.task != "dpo" or cfg.loss.reference_free or cfg.loss.precomputed_reference == "ignore":
        return False
    if not (train_split.has_reference and eval_split.has_reference and manifest.get("reference")):
        return False
    recorded = manifest["reference"]
    wanted = reference_identity(cfg)
    if recorded.get("sha256") != wanted["sha256"] or recorded.get("dtype") != wanted["dtype"]:
        raise ShardMismatch(f"the shards carry reference log-probs of {recorded.get('model')!r} "
                         f"(dtype {recorded.get('dtype')}, sha256 {str(recorded.get('sha256'))[:12]}), not of the "
                         f"configured reference {wanted['model']!r} (dtype {wanted['dtype']}, sha256 "
                         f"{wanted['sha256'][:12]}); re-run `aligntrain precompute-ref` or set "
                         "loss.precomputed_reference: ignore")
    return True


def _prepare_run_dir(run_dir: Path, cfg: Config, start: int, changed: dict[str, tuple[Any, Any]],
                     accelerator) -> list[str]:
    """Create the run dir, save the config; on resume drop metrics logged after the checkpoint and record
    the settings that changed. Returns notes for the console."""
    notes = []
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = config_text(cfg, run_dir, start)
        notes = [n for n in [trim_metrics(run_dir, start)] if n]
        if changed:
            notes.append(record_changes(run_dir, start, changed))
            text += f"# {notes[-1]}\n"
        (run_dir / "config.yaml").write_text(text, encoding="utf-8")
    accelerator.wait_for_everyone()
    return notes


def _all_reduce(sums: dict[str, torch.Tensor], accelerator) -> dict[str, float]:
    names = sorted(sums)
    return dict(zip(names, _reduce_stacked(sums, names, accelerator).tolist()))
