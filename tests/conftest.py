"""Shared pytest fixtures. Add yours below; keep each one small and say what it gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_tokenizer import make_tiny_tokenizer

from paths import SHARED_DATA


@pytest.fixture
def tiny_tokenizer():
    """A fresh in-process byte-level BPE tokenizer with a ChatML chat template (see tests/tiny_tokenizer.py)."""
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_tokenizer_dir(tmp_path):
    """The tiny tokenizer saved with save_pretrained; returns the directory."""
    make_tiny_tokenizer(tmp_path)
    return tmp_path


@pytest.fixture
def shared_data() -> Path:
    """Path to ../shared/data; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA
