"""Backtest data: the daily S&P 500 candles shipped by `arch`, or a user CSV / Parquet file
in the long format (`series_id` optional, `timestamp`, `open`, `high`, `low`, `close`,
optional `volume`, `amount`). Anything unusable raises BadDataError (exit code 6)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import BadDataError

REQUIRED = ("timestamp", "open", "high", "low", "close")
OPTIONAL = ("volume", "amount")
DEFAULT_SERIES = "series"


def read_file(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet file (by suffix); any read failure is BadDataError."""
    from model_package.data import read_candles

    try:
        return read_candles(str(path))[0]
    except ValueError as exc:
        raise BadDataError(str(exc)) from None


def validate(frame: pd.DataFrame, origin: str) -> pd.DataFrame:
    """Check and normalise a long-format candle frame (sorted, typed, one id per series)."""
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise BadDataError(f"{origin}: missing column(s) {', '.join(missing)}; need {', '.join(REQUIRED)}")
    if frame.empty:
        raise BadDataError(f"{origin}: no rows")
    out = pd.DataFrame({"series_id": frame["series_id"].astype(str) if "series_id" in frame else DEFAULT_SERIES})
    try:
        out["timestamp"] = pd.to_datetime(frame["timestamp"], errors="raise")
    except (ValueError, TypeError) as exc:
        raise BadDataError(f"{origin}: column timestamp has unparseable values ({str(exc)[:80]})") from None
    for column in REQUIRED[1:] + tuple(c for c in OPTIONAL if c in frame.columns):
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise BadDataError(f"{origin}: column {column} has missing or non-numeric values (first at row {row})")
        out[column] = values.astype(float)
    if out.duplicated(["series_id", "timestamp"]).any():
        raise BadDataError(f"{origin}: duplicate timestamps within a series")
    return out.sort_values(["series_id", "timestamp"]).reset_index(drop=True)


def load_candles(path: str | None, index: str = "SP500") -> tuple[pd.DataFrame, str]:
    """(candles, description): the file at `path`, else the `arch` index `index`."""
    if path:
        file = Path(path).expanduser()
        return validate(read_file(file), str(file)), f"file:{file.name}"
    from model_package.data import load_index  # imports torch: only when needed

    return validate(load_index(index), f"arch:{index}"), f"arch:{index}"
