"""Shared fixtures: the parity fixtures, tiny random-weight checkpoints, synthetic candles."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import settings

from model_package.data import random_walk_candles
from model_package.kronos import write_random_checkpoint
from model_package.kronos.presets import TINY_MODEL_CONFIG, TINY_TOKENIZER_CONFIG

# Data the tests need, carried in the repository (the upstream reference outputs and their
# tiny weights; see each folder's README).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARITY_DIR = FIXTURES / "kronos-parity-tiny"
TRAINING_DIR = FIXTURES / "kronos-training-tiny"

torch.set_num_threads(2)

# Property-based tests: repeatable and quick by default; `--hypothesis-profile=explore`
# searches with fresh randomness and many more examples. No example database on disk.
settings.register_profile("kronos", max_examples=150, derandomize=True, deadline=None, database=None)
settings.register_profile("explore", max_examples=2000, deadline=None, database=None)
settings.load_profile("kronos")

# Model tests run on the CPU unless KRONOS_TEST_DEVICE names another device (e.g. cuda).
TEST_DEVICE = os.environ.get("KRONOS_TEST_DEVICE", "cpu")

TINY_TOKENIZER, TINY_MODEL = TINY_TOKENIZER_CONFIG, TINY_MODEL_CONFIG


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The upstream parity fixtures (tests/fixtures/kronos-parity-tiny)."""
    assert PARITY_DIR.is_dir(), f"parity fixtures not found at {PARITY_DIR}"
    return PARITY_DIR


@pytest.fixture(scope="session")
def training_dir() -> Path:
    """Upstream's training losses and gradients on the parity weights
    (tests/fixtures/kronos-training-tiny)."""
    assert TRAINING_DIR.is_dir(), f"training fixtures not found at {TRAINING_DIR}"
    return TRAINING_DIR


@pytest.fixture(scope="session")
def device() -> str:
    return TEST_DEVICE


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tokenizer_dir, model_dir): a tiny random-weight pair in the Hugging Face layout."""
    root = tmp_path_factory.mktemp("tiny-kronos")
    return (
        write_random_checkpoint(TINY_TOKENIZER, root / "tokenizer", seed=1),
        write_random_checkpoint(TINY_MODEL, root / "model", seed=2),
    )


@pytest.fixture
def candles() -> Callable[..., pd.DataFrame]:
    """`model_package.data.random_walk_candles`: a random-walk OHLCV frame, long format."""
    return random_walk_candles
