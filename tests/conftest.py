"""Shared fixtures: the parity fixtures, tiny random-weight checkpoints, synthetic candles."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model_package.kronos import KronosConfig, TokenizerConfig, write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KRONOS_SHARED_DIR", ROOT.parent / "shared"))
PARITY_DIR = SHARED / "fixtures" / "kronos-parity-tiny"

torch.set_num_threads(2)

# Model tests run on the CPU unless KRONOS_TEST_DEVICE names another device (e.g. cuda).
TEST_DEVICE = os.environ.get("KRONOS_TEST_DEVICE", "cpu")

TINY_TOKENIZER = TokenizerConfig(
    d_in=6, d_model=32, n_heads=2, ff_dim=64, n_enc_layers=3, n_dec_layers=3,
    ffn_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0, s1_bits=8, s2_bits=8,
    beta=0.05, gamma0=1.0, gamma=1.1, zeta=0.05, group_size=4,
)
TINY_MODEL = KronosConfig(
    s1_bits=8, s2_bits=8, n_layers=2, d_model=48, n_heads=3, ff_dim=96, ffn_dropout_p=0.1,
    attn_dropout_p=0.0, resid_dropout_p=0.1, token_dropout_p=0.0, learn_te=True,
)


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The upstream parity fixtures (must exist: they sit in ../shared beside the repo)."""
    assert PARITY_DIR.is_dir(), f"parity fixtures not found at {PARITY_DIR}"
    return PARITY_DIR


@pytest.fixture(scope="session")
def device() -> str:
    return TEST_DEVICE


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tokenizer_dir, model_dir): a tiny random-weight pair in the Hugging Face layout."""
    root = tmp_path_factory.mktemp("tiny-kronos")
    return (write_random_checkpoint(TINY_TOKENIZER, root / "tokenizer", seed=1),
            write_random_checkpoint(TINY_MODEL, root / "model", seed=2))


def make_candles(length: int, seed: int = 0, start: str = "2024-01-02 09:30",
                 freq: str = "5min", series_id: str | None = None,
                 volume: bool = True, amount: bool = True) -> pd.DataFrame:
    """A random-walk OHLCV frame in the long format."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, length)))
    open_ = np.concatenate([[close[0]], close[:-1]]) * (1 + rng.normal(0, 0.002, length))
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.003, length)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.003, length)))
    frame = pd.DataFrame({
        "timestamp": pd.date_range(start, periods=length, freq=freq),
        "open": open_, "high": high, "low": low, "close": close,
    })
    if volume:
        frame["volume"] = rng.uniform(1e3, 5e3, length)
        if amount:
            frame["amount"] = frame["volume"] * frame["close"]
    if series_id is not None:
        frame.insert(0, "series_id", series_id)
    return frame


@pytest.fixture
def candles() -> Callable[..., pd.DataFrame]:
    return make_candles
