"""Long-format candle frames: validation, splitting into series, feature preparation.

Input columns: optional `series_id`, `timestamp`, `open`, `high`, `low`, `close`, optional
`volume`, optional `amount`. Missing-column rules (as upstream Kronos): without volume,
volume and amount are 0; without amount, amount = volume x mean(open, high, low, close).
A column present in the frame but entirely empty for one series counts as missing for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import KronosInputError

SERIES_ID = "series_id"
TIMESTAMP = "timestamp"
PRICE_COLUMNS = ("open", "high", "low", "close")
VOLUME, AMOUNT = "volume", "amount"
CANDLE_COLUMNS = (*PRICE_COLUMNS, VOLUME, AMOUNT)
NORM_EPS = 1e-5


@dataclass
class Series:
    """One series of a request: raw candles [L, 6] float32 and its timestamps."""

    series_id: object | None  # None when the frame has no series_id column
    timestamps: pd.DatetimeIndex
    candles: np.ndarray  # [L, 6] float32

    @property
    def label(self) -> object:
        return self.series_id if self.series_id is not None else "<single>"


def split_series(history: pd.DataFrame, min_length: int = 2) -> list[Series]:
    """Validate a long-format frame and split it into series (order of first appearance)."""
    if not isinstance(history, pd.DataFrame):
        raise KronosInputError("history", f"must be a pandas DataFrame, got {type(history).__name__}")
    if history.empty:
        raise KronosInputError("history", "must contain at least one row")
    missing = [c for c in (TIMESTAMP, *PRICE_COLUMNS) if c not in history.columns]
    if missing:
        raise KronosInputError(
            ", ".join(missing), f"required column missing (got columns {list(history.columns)})")
    frame = history.reset_index(drop=True)
    if SERIES_ID in frame.columns:
        if frame[SERIES_ID].isna().any():
            raise KronosInputError(SERIES_ID, "must not be empty")
        groups = [(sid, part) for sid, part in frame.groupby(SERIES_ID, sort=False)]
    else:
        groups = [(None, frame)]
    return [_one_series(sid, part, min_length) for sid, part in groups]


def _numeric(part: pd.DataFrame, column: str, label: object) -> np.ndarray:
    try:
        values = pd.to_numeric(part[column], errors="raise").to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise KronosInputError(column, "must be numeric", label) from exc
    bad = ~np.isfinite(values)
    if bad.any():
        raise KronosInputError(
            column, f"must not contain NaN or infinite values ({int(bad.sum())} rows)", label)
    return values


def _present(part: pd.DataFrame, column: str) -> bool:
    return column in part.columns and not part[column].isna().all()


def _one_series(series_id: object | None, part: pd.DataFrame, min_length: int) -> Series:
    label = series_id if series_id is not None else "<single>"
    if len(part) < min_length:
        raise KronosInputError("history", f"needs at least {min_length} candles, got {len(part)}", label)
    timestamps = parse_timestamps(part[TIMESTAMP], TIMESTAMP, label)
    check_increasing(timestamps, TIMESTAMP, label)
    prices = np.stack([_numeric(part, c, label) for c in PRICE_COLUMNS], axis=1)  # [L, 4]
    if _present(part, VOLUME):
        volume = _numeric(part, VOLUME, label)
        amount = (_numeric(part, AMOUNT, label) if _present(part, AMOUNT)
                  else volume * prices.mean(axis=1))
    else:
        volume = np.zeros(len(part))
        amount = np.zeros(len(part))
    candles = np.concatenate([prices, volume[:, None], amount[:, None]], axis=1).astype(np.float32)
    return Series(series_id, timestamps, candles)


def parse_timestamps(values: pd.Series, field: str, label: object) -> pd.DatetimeIndex:
    if values.isna().any():
        raise KronosInputError(field, "must not contain empty timestamps", label)
    try:
        return pd.DatetimeIndex(pd.to_datetime(values))
    except (ValueError, TypeError) as exc:
        raise KronosInputError(field, f"not parseable as datetimes ({exc})", label) from exc


def check_increasing(timestamps: pd.DatetimeIndex, field: str, label: object) -> None:
    deltas = np.diff(timestamps.asi8)
    if (deltas <= 0).any():
        i = int(np.argmax(deltas <= 0))
        kind = "duplicate" if deltas[i] == 0 else "decreasing"
        raise KronosInputError(
            field,
            f"must be strictly increasing; {kind} timestamp at row {i + 1} ({timestamps[i + 1]})",
            label)


def normalise(candles: np.ndarray, clip: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """candles [L, 6] float32 -> (clipped z-scores [L, 6], mean [6], std [6]).

    Population std (ddof 0) over every candle supplied; z = (x - mean) / (std + 1e-5).
    """
    mean = candles.mean(axis=0)
    std = candles.std(axis=0)
    z = np.clip((candles - mean) / (std + NORM_EPS), -clip, clip)
    return z.astype(np.float32), mean, std


def denormalise(z: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """z [..., 6] -> candles [..., 6] (float32 arithmetic, as upstream)."""
    return (z.astype(np.float32) * (std + NORM_EPS) + mean).astype(np.float32)
