"""Tiny, offline building blocks for the aligntrain tests.

    model_dir = make_tiny_model(tmp)                       tokenizer + random 2-layer Llama (hidden 32)
    sft = make_sft_shards(tmp / "sft", model_dir)          SFT shards (train + eval) per docs/SHARDS.md
    dpo = make_dpo_shards(tmp / "dpo", model_dir)          DPO shards
    cfg = write_config(tmp / "cfg.yml", model_dir, tmp / "run", loss={"name": "dpo"}, lr=1e-3)

Shards are written with aligndata's own ShardWriter / prepare_output / finish_output and a manifest
whose tokenizer identity comes from aligndata.encode.tokenizer, exactly as `aligndata convert` records it.
The pytest fixtures built from these (tiny_model, sft_shards, dpo_shards) are in tests/aligntrain/conftest.py,
once per test session.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
import yaml
from tiny_tokenizer import make_tiny_tokenizer

from aligndata.write.shards import ShardWriter, finish_output, prepare_output
from aligndata.encode.template import resolve_chat_template
from aligndata.encode.tokenizer import load_tokenizer, tokenizer_identity

QUESTIONS = ["What is the weather in Paris?", "Thanks, and in London?", "Tell me a joke.", "What is two plus two?",
             "Hello! How can I help you today?", "Why did the chicken cross the road?"]
ANSWERS = ["It is sunny in Paris today.", "It is raining in London.", "The answer is yes.", "Two plus two is four."]
CHOSEN, REJECTED = "The answer is yes.", "The answer is no."


def make_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised LlamaForCausalLM whose vocabulary is the tiny tokenizer's, saved with it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tokenizer = make_tiny_tokenizer(directory)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return directory


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prompt_ids(tokenizer, question: str) -> list[int]:
    return _encode(tokenizer, f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def sft_rows(tokenizer, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chats whose answers are a deterministic function of the question (learnable by a tiny model)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = rng.randrange(len(QUESTIONS))
        prompt = _prompt_ids(tokenizer, QUESTIONS[q])
        answer = _encode(tokenizer, ANSWERS[q % len(ANSWERS)] + "<|im_end|>")
        rows.append({"input_ids": prompt + answer, "loss_mask": [0] * len(prompt) + [1] * len(answer),
                     "source": 0, "source_index": i + 1})
    return rows


def dpo_rows(tokenizer, n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = _prompt_ids(tokenizer, QUESTIONS[rng.randrange(len(QUESTIONS))])
        chosen, rejected = CHOSEN, REJECTED
        if rng.random() < 0.5:  # two kinds of pairs, so that the preference is not one fixed string
            chosen, rejected = ANSWERS[rng.randrange(2)], ANSWERS[2 + rng.randrange(2)]
        rows.append({"prompt_ids": prompt, "chosen_ids": _encode(tokenizer, chosen + "<|im_end|>"),
                     "rejected_ids": _encode(tokenizer, rejected + "<|im_end|>"), "source": 0, "source_index": i + 1})
    return rows


def write_shards(out_dir: Path, model_dir: Path, task: str, rows: dict[str, list[dict[str, Any]]],
                 max_length: int = 64, shard_rows: int = 50_000, extra_columns: tuple[str, ...] = ()) -> Path:
    """Rows per split -> a complete shard directory with a manifest following docs/SHARDS.md."""
    out_dir = Path(out_dir)
    prepare_output(out_dir)
    writer = ShardWriter(out_dir, task, shard_rows=shard_rows, extra_columns=extra_columns)
    for split, split_rows in rows.items():
        for row in split_rows:
            writer.write(split, row)
    splits = writer.close()
    tokenizer = load_tokenizer(str(model_dir))
    total = sum(len(r) for r in rows.values())
    manifest = {
        "format_version": 1, "task": task, "created_by": "tests/trainer_fixtures.py",
        "tokenizer": tokenizer_identity(tokenizer, str(model_dir)),
        "chat_template": {"source": "tokenizer", "sha256": resolve_chat_template(tokenizer, None).sha256},
        "settings": {"max_length": max_length, "max_prompt_length": max_length // 2, "length_policy": "drop",
                     "train_on": "all" if task == "sft" else None, "eval_fraction": 0.0, "eval_file": False,
                     "seed": 0, "shard_rows": shard_rows, "input_format": "auto"},
        "settings_sha256": "0" * 64,
        "sources": [{"path": "synthetic", "sha256": "0" * 64, "format": "synthetic", "records": total, "role": "train"}],
        "counts": {"read": total, "kept": total, "rejected": {}, "dropped": {}, "truncated": {}},
        "stats": {}, "splits": splits, "reference": None,
    }
    finish_output(out_dir, manifest)
    return out_dir


def make_shards(task: str, out_dir: Path, model_dir: Path, n_train: int = 32, n_eval: int = 8, **kw: Any) -> Path:
    """Synthetic train (seed 0) and eval (seed 1) rows of `task` written as shards."""
    tokenizer = load_tokenizer(str(model_dir))
    make_rows = sft_rows if task == "sft" else dpo_rows
    rows = {"train": make_rows(tokenizer, n_train, seed=0)}
    if n_eval:
        rows["eval"] = make_rows(tokenizer, n_eval, seed=1)
    return write_shards(out_dir, model_dir, task, rows, **kw)


def make_sft_shards(out_dir: Path, model_dir: Path, **kw: Any) -> Path:
    return make_shards("sft", out_dir, model_dir, **kw)


def make_dpo_shards(out_dir: Path, model_dir: Path, **kw: Any) -> Path:
    return make_shards("dpo", out_dir, model_dir, **kw)


def base_config(model_dir: Path, run_dir: Path, **changes: Any) -> dict[str, Any]:
    """A seed-style config dict for the tiny model; nested groups in `changes` are merged."""
    cfg: dict[str, Any] = {
        "seed": 0, "exp_name": "tiny", "trainer": "BasicTrainer", "optimizer": "AdamW", "lr": 1e-3,
        "total_batch_size": 8, "gradient_accumulation_steps": 2, "eval_batch_size": 8, "max_length": 64,
        "max_prompt_length": 32, "n_epochs": 1, "warmup_steps": 0, "max_grad_norm": 10.0,
        "activation_checkpointing": False, "report_to_tensorboard": False, "do_first_eval": False,
        "eval_every_steps": None, "n_eval_examples": 8, "output_dir": str(run_dir), "log_every_steps": 1,
        "model": {"name_or_path": str(model_dir), "archive": None, "policy_dtype": "float32",
                  "reference_dtype": "float32"},
        "loss": {"name": "sft"},
        "wandb": {"enabled": False},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(path: Path, model_dir: Path, run_dir: Path, **changes: Any) -> Path:
    Path(path).write_text(yaml.safe_dump(base_config(model_dir, run_dir, **changes), sort_keys=False))
    return Path(path)


def trainer_calls_at(monkeypatch, step: int, action) -> None:
    """Run `action(model)` at the start of aligntrain's optimizer step `step` (1-based), inside the training loop."""
    import aligntrain.trainer as trainer_module

    real_step = trainer_module.train_step

    def wrapped(at, model, *args, **kwargs):
        if at == step:
            action(model)
        return real_step(at, model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", wrapped)


def interrupt(_model=None) -> None:
    """Ctrl-C, as trainer_calls_at's action."""
    raise KeyboardInterrupt


def killed_then_resumed(monkeypatch, make_cfg, shards, kill_at: int):
    """(the run of make_cfg("straight") uninterrupted, the run of make_cfg("killed") killed at the start of
    step `kill_at` and then resumed from its latest checkpoint): the pair a resume test compares."""
    from aligntrain.trainer import train

    straight = train(make_cfg("straight"), shards)
    cfg = make_cfg("killed")
    trainer_calls_at(monkeypatch, kill_at, interrupt)
    try:
        train(cfg, shards)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError(f"the run was not interrupted at step {kill_at}")
    finally:
        monkeypatch.undo()
    return straight, train(cfg, shards, resume=True)


def poison_parameters_at(monkeypatch, step: int, value: float) -> None:
    """Make aligntrain's train_step fill the first parameter with `value` (nan, inf) at `step`."""

    def poison(model):
        with torch.no_grad():
            next(model.parameters()).fill_(value)

    trainer_calls_at(monkeypatch, step, poison)
