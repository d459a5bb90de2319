"""Candles without network: real daily bars that ship with `arch`, and random walks.

`arch.data.sp500` and `arch.data.nasdaq` hold daily OHLCV bars of the S&P 500 and the
NASDAQ Composite, 1999-2018 (NCSA licence). They are returned in the long format the
forecaster takes. `amount` is left out: the forecaster derives it from volume.

`random_walk_candles` makes synthetic series of any length and spacing for tests,
benchmarks and warm-up requests (same seed, same frame).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .frames import SERIES_ID, TIMESTAMP

INDEXES = {"SP500": "arch.data.sp500", "NASDAQ": "arch.data.nasdaq"}


def load_index(name: str = "SP500", last: int | None = None) -> pd.DataFrame:
    """Daily candles of one index -> series_id, timestamp, open, high, low, close, volume."""
    if name not in INDEXES:
        raise ValueError(f"unknown index {name!r}; choose from {sorted(INDEXES)}")
    import importlib

    raw = importlib.import_module(INDEXES[name]).load()
    frame = pd.DataFrame(
        {
            SERIES_ID: name,
            TIMESTAMP: pd.DatetimeIndex(raw.index),
            "open": raw["Open"].to_numpy(dtype=float),
            "high": raw["High"].to_numpy(dtype=float),
            "low": raw["Low"].to_numpy(dtype=float),
            "close": raw["Close"].to_numpy(dtype=float),
            "volume": raw["Volume"].to_numpy(dtype=float),
        }
    )
    return frame.tail(last).reset_index(drop=True) if last else frame


def load_indexes(last: int | None = None) -> pd.DataFrame:
    """Both indexes, stacked (two series)."""
    return pd.concat([load_index(name, last) for name in INDEXES], ignore_index=True)


ARCH_PREFIX = "arch:"


def read_candles(source: str) -> tuple[pd.DataFrame, str]:
    """(frame, description) of a data source: `arch:SP500`, `arch:NASDAQ`, `arch:ALL` (both),
    or a `.csv` / `.parquet` file. Raises ValueError with a one-line reason."""
    if source.startswith(ARCH_PREFIX):
        name = source[len(ARCH_PREFIX) :].upper()
        if name == "ALL":
            return load_indexes(), source
        if name not in INDEXES:
            raise ValueError(f"unknown arch index {source!r}: use arch:SP500, arch:NASDAQ or arch:ALL")
        return load_index(name), f"{ARCH_PREFIX}{name}"
    from pathlib import Path

    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ValueError(f"unsupported data file {path}: use .csv or .parquet")
    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # parser, encoding, arrow errors: all mean a bad file
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read {path}: {detail}") from None
    return frame, f"file:{path.name}"


def random_walk_candles(
    length: int,
    seed: int | np.random.Generator = 0,
    *,
    start: str | pd.Timestamp = "2024-01-02 09:30",
    freq: str = "5min",
    series_id: str | None = None,
    volume: bool = True,
    amount: bool = True,
) -> pd.DataFrame:
    """`length` candles of a geometric random walk in the long format (valid OHLC bars).

    Close moves 1% per bar (log-normal steps from 100), open is the previous close with a
    0.2% jitter, high/low lie 0.3% (half-normal) beyond them; volume is uniform in
    1000-5000 and amount = volume x close. `seed` is an int or a generator to draw from
    (several series from one generator differ); timestamps start at `start`, `freq` apart.
    Columns: [series_id], timestamp, open, high, low, close, [volume, [amount]].
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, length)))  # [length]
    open_ = np.concatenate([[close[0]], close[:-1]]) * (1 + rng.normal(0, 0.002, length))
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.003, length)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.003, length)))
    frame = pd.DataFrame(
        {
            TIMESTAMP: pd.date_range(start, periods=length, freq=freq),
            "open": open_,
            "high": high,
            "low": low,
            "close": close,
        }
    )
    if volume:
        frame["volume"] = rng.uniform(1e3, 5e3, length)
        if amount:
            frame["amount"] = frame["volume"] * frame["close"]
    if series_id is not None:
        frame.insert(0, SERIES_ID, series_id)
    return frame
