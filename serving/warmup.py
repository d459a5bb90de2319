"""The warm-up request: a small synthetic history run once before the model reports ready."""

from __future__ import annotations

import numpy as np
import pandas as pd


def warmup_history(length: int = 32) -> pd.DataFrame:
    """A deterministic hourly random walk of `length` candles (no series_id column)."""
    rng = np.random.default_rng(0)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, length)))
    open_ = np.concatenate([[close[0]], close[:-1]])
    return pd.DataFrame({
        "timestamp": pd.date_range("2024-01-01", periods=length, freq="h"),
        "open": open_, "high": np.maximum(open_, close) * 1.001,
        "low": np.minimum(open_, close) * 0.999, "close": close,
        "volume": rng.uniform(1e3, 5e3, length),
    })
