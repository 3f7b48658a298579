"""`aligntrain generate`: replies of one or more models (or LoRA adapters) to the same prompts (before/after training)."""

from __future__ import annotations

from pathlib import Path

import torch

from .data import pad_token_id
from .lora import is_adapter_dir, load_adapter_model
from .modeling import load_causal_lm, load_tokenizer, resolve_model_dir


@torch.no_grad()
def generate_replies(model_dir: str | Path, prompts: list[str], *, system: str | None = None,
                     max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Render each prompt with the model's chat template (plus the generation prompt) and decode the
    reply: greedy when temperature is 0, sampled (seeded) otherwise."""
    model_dir = resolve_model_dir(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    if is_adapter_dir(model_dir):  # a LoRA checkpoint: its base model with the adapter applied
        model = load_adapter_model(model_dir)
    else:
        model = load_causal_lm(model_dir, "float32", trainable=False)
    replies = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id(tokenizer),
                                eos_token_id=tokenizer.eos_token_id, **sampling)
        reply = output[0, inputs["input_ids"].shape[1]:]
        replies.append(tokenizer.decode(reply, skip_special_tokens=True).strip())
    return replies
