"""Fixtures of the aligntrain tests, built once per test session (tests/trainer_fixtures.py makes them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_fixtures import make_dpo_shards, make_sft_shards, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny randomly initialised Llama-shaped model directory with the tiny tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def sft_shards(tmp_path_factory, tiny_model) -> Path:
    """SFT shards converted with tiny_model's tokenizer."""
    return make_sft_shards(tmp_path_factory.mktemp("shards") / "sft", tiny_model)


@pytest.fixture(scope="session")
def dpo_shards(tmp_path_factory, tiny_model) -> Path:
    """DPO shards converted with tiny_model's tokenizer."""
    return make_dpo_shards(tmp_path_factory.mktemp("shards") / "dpo", tiny_model)
