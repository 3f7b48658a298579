"""Model FLOPs arithmetic (aligntrain/flops.py) against real modules and hand-computed counts."""

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, AutoModelForCausalLM

from aligntrain.flops import attention_pairs, matmul_params, mfu, peak_bf16_flops, training_flops

DIMS = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)


def linear_weights(config) -> int:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("config", [
    LlamaConfig(**DIMS, num_key_value_heads=2, tie_word_embeddings=True),
    LlamaConfig(**DIMS, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False),  # head_dim != hidden/heads
    Qwen2Config(**DIMS, num_key_value_heads=2, tie_word_embeddings=True),  # q, k, v biases are not counted
    Qwen2Config(**DIMS),  # no num_key_value_heads given: as many as heads
], ids=["llama-tied", "llama-head-dim", "qwen2-tied", "qwen2-mha"])
def test_matmul_params_are_the_linear_weights_of_the_model(config):
    assert matmul_params(config) == linear_weights(config)


def test_attention_pairs_by_hand():
    assert attention_pairs([(3, 3)]) == 1 + 2 + 3
    assert attention_pairs([(2, 5)]) == 4 + 5  # the queries are the last two of five positions
    assert attention_pairs([(4, 4), (2, 6), (3, 7)]) == 10 + (5 + 6) + (5 + 6 + 7)  # prompt, chosen, rejected
    assert attention_pairs([]) == 0 and attention_pairs([(0, 5)]) == 0


def test_attention_pairs_refuses_more_queries_than_keys():
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        attention_pairs([(3, 2)])


def test_training_flops_by_hand():
    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=4, vocab_size=10)
    # per layer: q and o 8*4*2 each, k and v 8*4 each = 192; MLP 3*8*16 = 384; two layers + LM head 8*10
    assert matmul_params(config) == 2 * (192 + 384) + 80 == 1232
    pair = 4 * 2 * 2 * 4  # layers * heads * head_dim * (2 for QK^T + 2 for PV)
    assert training_flops(config, 10, 20) == 6 * 1232 * 10 + 3 * pair * 20 == 77760
    assert training_flops(config, 10, 20, 5, 7) == 77760 + 2 * 1232 * 5 + pair * 7 == 90528


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA A10G", 125e12),
    ("cpu", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_by_card_name(name, peak):
    assert peak_bf16_flops(name) == peak


def test_mfu_is_the_share_of_the_peak_and_none_where_unknown():
    assert mfu(989e12, 2.0, "NVIDIA H200") == pytest.approx(0.5)
    assert mfu(1e12, 1.0, "cpu") is None
