"""The warm-up request: a small synthetic history run once before the model reports ready."""

from __future__ import annotations

import pandas as pd

from model_package.data import random_walk_candles


def warmup_history(length: int = 32) -> pd.DataFrame:
    """A deterministic hourly random walk of `length` candles (no series_id column)."""
    return random_walk_candles(length, seed=0, start="2024-01-01", freq="h", amount=False)
