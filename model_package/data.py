"""Real daily candles that ship with the `arch` package (no network needed).

`arch.data.sp500` and `arch.data.nasdaq` hold daily OHLCV bars of the S&P 500 and the
NASDAQ Composite, 1999-2018 (NCSA licence). They are returned in the long format the
forecaster takes. `amount` is left out: the forecaster derives it from volume.
"""

from __future__ import annotations

import pandas as pd

from .frames import SERIES_ID, TIMESTAMP

INDEXES = {"SP500": "arch.data.sp500", "NASDAQ": "arch.data.nasdaq"}


def load_index(name: str = "SP500", last: int | None = None) -> pd.DataFrame:
    """Daily candles of one index -> series_id, timestamp, open, high, low, close, volume."""
    if name not in INDEXES:
        raise ValueError(f"unknown index {name!r}; choose from {sorted(INDEXES)}")
    import importlib

    raw = importlib.import_module(INDEXES[name]).load()
    frame = pd.DataFrame({
        SERIES_ID: name,
        TIMESTAMP: pd.DatetimeIndex(raw.index),
        "open": raw["Open"].to_numpy(dtype=float),
        "high": raw["High"].to_numpy(dtype=float),
        "low": raw["Low"].to_numpy(dtype=float),
        "close": raw["Close"].to_numpy(dtype=float),
        "volume": raw["Volume"].to_numpy(dtype=float),
    })
    return frame.tail(last).reset_index(drop=True) if last else frame


def load_indexes(last: int | None = None) -> pd.DataFrame:
    """Both indexes, stacked (two series)."""
    return pd.concat([load_index(name, last) for name in INDEXES], ignore_index=True)
