"""Long-format candle frames: validation, splitting into series, feature preparation.

Input columns: optional `series_id`, `timestamp`, `open`, `high`, `low`, `close`, optional
`volume`, optional `amount`. Missing-column rules (as upstream Kronos): without volume,
volume and amount are 0; without amount, amount = volume x mean(open, high, low, close).
A column present in the frame but entirely empty for one series counts as missing for it.

Candle rules (errors name the series, the column, the rule, the value and the row of the
request frame, counted from 0):
- each column given once; `series_id` values are strings or integers, never empty;
- candle values are numbers (not booleans), finite, and of magnitude <= `MAX_ABS_VALUE`
  (1e15): normalisation runs in float32, and beyond that bound the mean, std and z-scores
  of a long history stop being finite or exact;
- with `strict_candles` (the default): prices > 0, low <= open, close <= high (so
  low <= high), volume and amount >= 0. `strict_candles=False` skips exactly these checks,
  for instruments whose prices can be zero or negative (spreads, oil futures in 2020) or
  whose bars are not ordered OHLC.
Timestamp rules: see `calendar.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .calendar import check_increasing, parse_timestamps
from .errors import KronosInputError, brief, cut

SERIES_ID = "series_id"
TIMESTAMP = "timestamp"
PRICE_COLUMNS = ("open", "high", "low", "close")
VOLUME, AMOUNT = "volume", "amount"
CANDLE_COLUMNS = (*PRICE_COLUMNS, VOLUME, AMOUNT)
NORM_EPS = 1e-5
# Largest |candle value| accepted: float32 squares of 2e15 (a deviation from the mean) summed
# over a million candles stay below float32's 3.4e38, so mean, std and z-scores are finite.
MAX_ABS_VALUE = 1e15
STRICT = "strict_candles"


@dataclass
class Series:
    """One series of a request: raw candles [L, 6] float32 and its timestamps."""

    series_id: object | None  # None when the frame has no series_id column
    timestamps: pd.DatetimeIndex
    candles: np.ndarray  # [L, 6] float32

    @property
    def label(self) -> object:
        return self.series_id if self.series_id is not None else "<single>"


def check_frame(history: object) -> pd.DataFrame:
    """The frame-level rules (type, rows, columns, series ids); cheap, builds nothing."""
    if not isinstance(history, pd.DataFrame):
        raise KronosInputError("history", f"must be a pandas DataFrame, got {type(history).__name__}")
    if history.empty:
        raise KronosInputError("history", "must contain at least one row")
    names = list(history.columns)
    duplicated = sorted({str(c) for c in names if names.count(c) > 1})
    if duplicated:
        raise KronosInputError(", ".join(duplicated), "column given more than once")
    missing = [c for c in (TIMESTAMP, *PRICE_COLUMNS) if c not in history.columns]
    if missing:
        raise KronosInputError(", ".join(missing), f"required column missing (got columns {brief(names, 200)})")
    if SERIES_ID in history.columns:
        _check_series_ids(history[SERIES_ID])
    return history


def _check_series_ids(ids: pd.Series) -> None:
    empty = np.asarray(ids.isna())
    if empty.any():
        raise KronosInputError(SERIES_ID, f"must not be empty, got an empty value at row {int(empty.argmax())}")
    if pd.api.types.is_bool_dtype(ids.dtype) or pd.api.types.is_float_dtype(ids.dtype):
        raise KronosInputError(SERIES_ID, f"must be strings or integers, got {ids.dtype} values")
    if pd.api.types.is_object_dtype(ids.dtype):
        for row, value in enumerate(ids):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
                raise KronosInputError(
                    SERIES_ID, f"must be strings or integers, got {type(value).__name__} {brief(value)} at row {row}"
                )


def split_series(history: pd.DataFrame, min_length: int = 2, strict: bool = True) -> list[Series]:
    """Validate a long-format frame and split it into series (order of first appearance).

    `strict` applies the strict_candles rules (see the module doc)."""
    frame = check_frame(history).reset_index(drop=True)
    groups: list[tuple[object | None, pd.DataFrame]] = [(None, frame)]
    if SERIES_ID in frame.columns:
        groups = [(sid, part) for sid, part in frame.groupby(SERIES_ID, sort=False)]
    return [_one_series(sid, part, min_length, strict) for sid, part in groups]


def _numeric(part: pd.DataFrame, column: str, label: object) -> np.ndarray:
    """One candle column as float64 [L]: numbers only, finite, |x| <= MAX_ABS_VALUE."""
    raw = part[column]
    rows = part.index.to_numpy()
    if pd.api.types.is_bool_dtype(raw.dtype):
        raise KronosInputError(column, f"must be numeric, got booleans at row {rows[0]}", label)
    if pd.api.types.is_object_dtype(raw.dtype):
        for i, value in enumerate(raw):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, str, np.number)):
                raise KronosInputError(
                    column, f"must be numeric, got {type(value).__name__} {brief(value)} at row {rows[i]}", label
                )
    try:
        values = pd.to_numeric(raw, errors="raise").to_numpy(dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as exc:
        raise KronosInputError(column, f"must be numeric ({cut(str(exc), 80)})", label) from exc
    bad = ~np.isfinite(values)
    if bad.any():
        raise KronosInputError(
            column,
            f"must not contain NaN or infinite values ({int(bad.sum())} rows, first at row {rows[bad.argmax()]})",
            label,
        )
    check_magnitude(values, column, label, rows)
    return values


def _present(part: pd.DataFrame, column: str) -> bool:
    return column in part.columns and not part[column].isna().all()


def _one_series(series_id: object | None, part: pd.DataFrame, min_length: int, strict: bool) -> Series:
    label = series_id if series_id is not None else "<single>"
    if len(part) < min_length:
        raise KronosInputError("history", f"needs at least {min_length} candles, got {len(part)}", label)
    rows = part.index.to_numpy()
    timestamps = parse_timestamps(part[TIMESTAMP], TIMESTAMP, label, rows)
    check_increasing(timestamps, TIMESTAMP, label, rows)
    prices = np.stack([_numeric(part, c, label) for c in PRICE_COLUMNS], axis=1)  # [L, 4]
    if strict:
        check_strict_prices(prices, label, rows)
    if _present(part, VOLUME):
        volume = _numeric(part, VOLUME, label)
        if _present(part, AMOUNT):
            amount = _numeric(part, AMOUNT, label)
        else:
            amount = volume * prices.mean(axis=1)
            check_magnitude(amount, AMOUNT, label, rows, "derived as volume x mean price")
        if strict:
            _check_non_negative(volume, VOLUME, label, rows)
            _check_non_negative(amount, AMOUNT, label, rows)
    else:
        volume = np.zeros(len(part))
        amount = np.zeros(len(part))
    candles = np.concatenate([prices, volume[:, None], amount[:, None]], axis=1).astype(np.float32)
    return Series(series_id, timestamps, candles)


def check_strict_prices(prices: np.ndarray, label: object, rows: np.ndarray) -> None:
    """prices [L, 4] open, high, low, close: all > 0, low <= open, close <= high."""
    for j, name in enumerate(PRICE_COLUMNS):
        bad = prices[:, j] <= 0
        if bad.any():
            i = int(bad.argmax())
            raise KronosInputError(name, f"must be > 0 ({STRICT}), got {prices[i, j]:g} at row {rows[i]}", label)
    open_, high, low, close = prices.T
    bad = high < low
    if bad.any():
        i = int(bad.argmax())
        raise KronosInputError(
            "high", f"must be >= low ({STRICT}), got high {high[i]:g} < low {low[i]:g} at row {rows[i]}", label
        )
    for name, values in (("open", open_), ("close", close)):
        bad = (values < low) | (values > high)
        if bad.any():
            i = int(bad.argmax())
            raise KronosInputError(
                name,
                f"must be within [low, high] ({STRICT}), got {values[i]:g} outside "
                f"[{low[i]:g}, {high[i]:g}] at row {rows[i]}",
                label,
            )


def _check_non_negative(values: np.ndarray, name: str, label: object, rows: np.ndarray) -> None:
    bad = values < 0
    if bad.any():
        i = int(bad.argmax())
        raise KronosInputError(name, f"must be >= 0 ({STRICT}), got {values[i]:g} at row {rows[i]}", label)


def check_magnitude(values: np.ndarray, name: str, label: object, rows: np.ndarray, how: str = "") -> None:
    """Every |value| within MAX_ABS_VALUE (`how` says how a derived column was made)."""
    huge = np.abs(values) > MAX_ABS_VALUE
    if huge.any():
        i = int(huge.argmax())
        raise KronosInputError(
            name,
            f"magnitude must be <= {MAX_ABS_VALUE:g} (float32 normalisation), got {values[i]:g}"
            f"{f' ({how})' if how else ''} at row {rows[i]}",
            label,
        )


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


def repair_candles(candles: np.ndarray) -> np.ndarray:
    """Forecast candles [..., 6] made well-formed (optional post-processing, off by default):
    high >= max(open, close), low <= min(open, close), volume and amount >= 0. Only values
    that break a rule move, each to the nearest value that keeps it. Applied to every
    sampled path, the means and quantiles over paths are then well-formed too."""
    out = candles.copy()
    open_, close = out[..., 0], out[..., 3]
    out[..., 1] = np.maximum(out[..., 1], np.maximum(open_, close))
    out[..., 2] = np.minimum(out[..., 2], np.minimum(open_, close))
    out[..., 4:6] = np.maximum(out[..., 4:6], 0)
    return out
