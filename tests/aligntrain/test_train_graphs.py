"""CUDA graphs of the decoder stack (aligntrain/graphs.py): the bucket plan, and the padding a graph's fixed
shapes need, which must change no real token's output or gradient (checked on the CPU, where the padded
stack runs eagerly). The graphs themselves are checked on CUDA in test_train_gpu.py."""

import itertools
import math
import random

import pytest
import torch

from aligntrain.data import collate
from aligntrain.graphs import GraphedStack, plan_buckets
from aligntrain.modeling import SequenceLogps, load_causal_lm, model_inputs
from aligntrain.packing import PACKED, use_packed_attention


def padding(lengths, buckets):
    return sum(min(b for b in buckets if b >= n) - n for n in lengths)


def test_the_bucket_plan_covers_every_length_with_the_least_padding():
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 2000) for _ in range(rng.randint(1, 25))]
        count = rng.randint(1, 4)
        buckets = plan_buckets(lengths, count, granularity=128)
        assert 1 <= len(buckets) <= count and buckets == sorted(buckets)
        assert all(b % 128 == 0 for b in buckets) and max(buckets) >= max(lengths)
        candidates = sorted({math.ceil(n / 128) * 128 for n in lengths})
        best = min(padding(lengths, c) for k in range(1, count + 1) for c in itertools.combinations(candidates, k)
                   if max(c) >= max(lengths))
        assert padding(lengths, buckets) == best


def test_the_bucket_plan_edge_cases():
    assert plan_buckets([], 4) == [] and plan_buckets([300], 0) == []
    assert plan_buckets([256, 512, 100], 8) == [256, 512]  # no more buckets than distinct lengths
    assert plan_buckets([10, 20, 700], 1) == [768]


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, p in lengths:
        ids = torch.randint(7, 300, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * p + [1] * (n - p), "length": n})
    return collate(rows, "sft", 0, PACKED, 64)


@pytest.mark.parametrize("buckets", [[48], [29], [256]])  # padded by 19, not at all (an empty segment), by 227
def test_a_padded_stream_gives_the_same_logps_and_gradients(tiny_model, buckets):
    batch = _batch([(9, 3), (14, 5), (6, 2)])
    assert batch["input_ids"].shape[1] == 29

    def run(graphed: bool):
        lm = load_causal_lm(tiny_model, "float32").train()
        use_packed_attention(lm)
        model = SequenceLogps(lm, chunk_tokens=4, uniform_grad=True)
        if graphed:
            model.graphed = GraphedStack(lm.base_model, buckets, pad_id=0, capture=False)
            assert model.graphed.applies(batch["input_ids"], batch["segments"])
        logps, _ = model(**model_inputs(batch))
        (-0.3 * logps.sum()).backward()
        return logps.detach(), {n: p.grad for n, p in lm.named_parameters()}

    (want, want_grads), (got, got_grads) = run(False), run(True)
    assert torch.allclose(got, want, atol=1e-5)
    for name, grad in got_grads.items():
        assert torch.allclose(grad, want_grads[name], atol=1e-5), name


def test_the_graphs_apply_only_to_training_forwards_that_fit_a_bucket(tiny_model):
    lm = load_causal_lm(tiny_model, "float32").train()
    batch = _batch([(9, 3), (14, 5)])
    stack = GraphedStack(lm.base_model, [16, 64], capture=False)
    assert stack.bucket(23) == 64 and stack.bucket(16) == 16 and stack.bucket(65) is None
    assert stack.applies(batch["input_ids"], batch["segments"])
    with torch.no_grad():
        assert not stack.applies(batch["input_ids"], batch["segments"])
    lm.eval()
    assert not stack.applies(batch["input_ids"], batch["segments"])
    lm.train()
    assert not GraphedStack(lm.base_model, [16], capture=False).applies(batch["input_ids"], batch["segments"])


def test_cuda_graphs_are_refused_where_they_do_not_apply(tmp_path, tiny_model, sft_shards):
    from trainer_fixtures import write_config

    from aligntrain.config import ConfigError, load_config
    from aligntrain.trainer import train

    cfg = load_config(write_config(tmp_path / "cfg.yml", tiny_model, tmp_path / "run", cuda_graphs=True))
    if torch.cuda.is_available():
        pytest.skip("the CPU case")
    with pytest.raises(ConfigError, match="cuda_graphs: true needs a CUDA device"):
        train(cfg, sft_shards)
    padded = load_config(write_config(tmp_path / "p.yml", tiny_model, tmp_path / "run2", cuda_graphs=True,
                                      padding_free=False))
    with pytest.raises(ConfigError, match="cuda_graphs: true needs padding-free batches"):
        train(padded, sft_shards)
