"""Calendar features of candle timestamps and inference of future timestamps."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import KronosInputError

# Column order of the stamp tensor the model expects.
CALENDAR_FIELDS = ("minute", "hour", "weekday", "day", "month")


def calendar_features(timestamps: pd.Series | pd.DatetimeIndex) -> np.ndarray:
    """timestamps [T] -> float32 [T, 5] (minute, hour, weekday Mon=0, day, month), taken
    from the local wall time of tz-aware values."""
    index = pd.DatetimeIndex(timestamps)
    fields = (index.minute, index.hour, index.dayofweek, index.day, index.month)
    return np.stack([np.asarray(f) for f in fields], axis=1).astype(np.float32)


def infer_future_timestamps(history: pd.Series, pred_len: int, freq: str | None = None,
                            series: object | None = None) -> pd.DatetimeIndex:
    """The next `pred_len` timestamps after `history` (sorted, unique).

    With `freq` (a pandas offset alias such as "5min", "h", "B") that spacing is used.
    Otherwise the series' own spacing: a regular frequency pandas recognises (business
    days included), else weekdays-only daily data continue on business days, else the
    most common gap repeats.
    """
    index = pd.DatetimeIndex(history)
    last = index[-1]
    if freq is not None:
        try:
            offset = pd.tseries.frequencies.to_offset(freq)
        except ValueError as exc:
            raise KronosInputError("freq", f"not a pandas frequency: {freq!r}", series) from exc
        return pd.date_range(last, periods=pred_len + 1, freq=offset)[1:]
    recent = index[-64:]
    inferred = pd.infer_freq(recent) if len(recent) >= 3 else None
    if inferred is not None:
        return pd.date_range(last, periods=pred_len + 1, freq=inferred)[1:]
    gaps = pd.Series(recent[1:] - recent[:-1])
    step = gaps.mode().iloc[0]
    weekdays_only = bool((index.dayofweek < 5).all())
    if step == pd.Timedelta(days=1) and weekdays_only and _is_midnight_aligned(index):
        return pd.date_range(last, periods=pred_len + 1, freq="B")[1:]
    return pd.DatetimeIndex([last + step * (i + 1) for i in range(pred_len)])


def _is_midnight_aligned(index: pd.DatetimeIndex) -> bool:
    """All timestamps at the same time of day (daily bars)."""
    return len(set(index.time)) == 1
