"""Calendar features of candle timestamps; reading and checking timestamps; inference of
future timestamps.

Timestamp rules (history and future alike):
- datetimes or date/time strings; numbers are refused (they would read as nanoseconds
  after 1970), so are empty values and text that is not a date;
- timezone-naive, the exchange's local wall time (the model's calendar features are
  wall-clock fields); timezone-aware values are refused with a hint to convert them;
- within pandas' nanosecond range (`TIMESTAMP_MIN` .. `TIMESTAMP_MAX`, 1677-09-21 ..
  2262-04-11), under pandas 2 and 3 alike (pandas 3 can hold more, pandas 2 cannot);
- strictly increasing within a series.
Future timestamps, whatever produced them (`freq`, the inferred spacing, or given), must be
`pred_len` strictly increasing values that start after the last history timestamp.

The code does not assume a datetime resolution (pandas 3 defaults to microseconds).
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from .errors import KronosInputError, brief, cut

# Column order of the stamp tensor the model expects.
CALENDAR_FIELDS = ("minute", "hour", "weekday", "day", "month")

TIMESTAMP_MIN = pd.Timestamp.min.ceil("s")  # 1677-09-21 00:12:44
TIMESTAMP_MAX = pd.Timestamp.max.floor("s")  # 2262-04-11 23:47:16


def calendar_features(timestamps: pd.Series | pd.DatetimeIndex) -> np.ndarray:
    """timestamps [T] -> float32 [T, 5] (minute, hour, weekday Mon=0, day, month)."""
    index = pd.DatetimeIndex(timestamps)
    fields = (index.minute, index.hour, index.day_of_week, index.day, index.month)
    return np.stack([np.asarray(f) for f in fields], axis=1).astype(np.float32)


# -- reading and checking ---------------------------------------------------------------------

_DATETIME_TYPES = (str, dt.datetime, dt.date, np.datetime64)


def parse_timestamps(values: pd.Series, field: str, label: object, rows: np.ndarray | None = None) -> pd.DatetimeIndex:
    """Timestamps of one series -> DatetimeIndex (naive, any resolution).

    `rows` are the request-frame row numbers of `values` (for messages); default 0, 1, ...
    """
    rows = np.arange(len(values)) if rows is None else rows
    missing = np.asarray(values.isna())
    if missing.any():
        raise KronosInputError(field, f"must not be empty, got an empty value at row {rows[missing.argmax()]}", label)
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype(object)
    kind = values.dtype
    if pd.api.types.is_numeric_dtype(kind) or pd.api.types.is_bool_dtype(kind):
        raise KronosInputError(
            field,
            f"must hold datetimes or date/time strings, got numbers ({kind}) such as "
            f"{brief(values.iloc[0])} at row {rows[0]}",
            label,
        )
    if pd.api.types.is_object_dtype(kind):
        for i, value in enumerate(values):
            if not isinstance(value, _DATETIME_TYPES):
                raise KronosInputError(
                    field,
                    f"must hold datetimes or date/time strings, got {type(value).__name__} "
                    f"{brief(value)} at row {rows[i]}",
                    label,
                )
    try:
        index = pd.DatetimeIndex(pd.to_datetime(values))
    except (ValueError, TypeError, OverflowError) as exc:
        raise KronosInputError(field, f"not parseable as datetimes ({cut(str(exc), 120)})", label) from exc
    if index.tz is not None:
        raise KronosInputError(
            field,
            f"must be timezone-naive (exchange local time), got timezone {index.tz}; "
            "convert with .dt.tz_convert(zone).dt.tz_localize(None)",
            label,
        )
    if index.isna().any():  # "NaT" strings
        raise KronosInputError(field, f"must not be empty, got NaT at row {rows[int(index.isna().argmax())]}", label)
    check_in_range(index, field, label, rows)
    return index


def check_in_range(index: pd.DatetimeIndex, field: str, label: object, rows: np.ndarray | None = None) -> None:
    """Every timestamp within TIMESTAMP_MIN .. TIMESTAMP_MAX."""
    outside = np.asarray((index < TIMESTAMP_MIN) | (index > TIMESTAMP_MAX))
    if outside.any():
        i = int(outside.argmax())
        row = rows[i] if rows is not None else i
        raise KronosInputError(
            field, f"must lie within {TIMESTAMP_MIN} .. {TIMESTAMP_MAX}, got {index[i]} at row {row}", label
        )


def check_increasing(timestamps: pd.DatetimeIndex, field: str, label: object, rows: np.ndarray | None = None) -> None:
    """Strictly increasing (any resolution: only the signs of the steps are read)."""
    ticks = timestamps.to_numpy().view(np.int64)  # in the index's own unit (ns, us, ...)
    bad = ticks[1:] <= ticks[:-1]  # compared, not subtracted: no overflow
    if bad.any():
        i = int(np.argmax(bad))
        kind = "duplicate" if ticks[i + 1] == ticks[i] else "decreasing"
        row = rows[i + 1] if rows is not None else i + 1
        raise KronosInputError(
            field, f"must be strictly increasing; {kind} timestamp at row {row} ({timestamps[i + 1]})", label
        )


def check_future(
    future: pd.DatetimeIndex, last: pd.Timestamp, pred_len: int, field: str, label: object
) -> pd.DatetimeIndex:
    """The future timestamps rule: `pred_len` strictly increasing values, all after `last`
    and not past TIMESTAMP_MAX."""
    if len(future) != pred_len:
        raise KronosInputError(field, f"gives {len(future)} future timestamps, need pred_len={pred_len}", label)
    if future[0] <= last:
        raise KronosInputError(
            field, f"future timestamps must start after the last history timestamp ({last}), got {future[0]}", label
        )
    check_increasing(future, field, label)
    if future[-1] > TIMESTAMP_MAX:
        raise _past_the_limit(field, pred_len, last, label)
    return future


def _past_the_limit(field: str, pred_len: int, last: pd.Timestamp, label: object) -> KronosInputError:
    return KronosInputError(
        field, f"{pred_len} future timestamps after {last} would pass {TIMESTAMP_MAX} (the supported range)", label
    )


# -- future timestamps ------------------------------------------------------------------------


def infer_future_timestamps(
    history: pd.DatetimeIndex, pred_len: int, freq: str | None = None, series: object | None = None
) -> pd.DatetimeIndex:
    """The next `pred_len` timestamps after `history` (sorted, unique).

    With `freq` (a pandas offset alias such as "5min", "h", "B") that spacing is used.
    Otherwise the series' own spacing: a regular frequency pandas recognises (business
    days included), else weekdays-only daily data continue on business days, else the
    most common gap repeats. Whatever produced them, the result obeys `check_future`;
    spacings that cannot (zero or negative steps, horizons past 2262) are refused, on
    `freq` when it was given, else on `pred_len`.
    """
    index = pd.DatetimeIndex(history)
    last = index[-1]
    field = "freq" if freq is not None else "pred_len"
    try:
        future = _future(index, pred_len, freq, series)
    except KronosInputError:
        raise
    except (OverflowError, pd.errors.OutOfBoundsDatetime) as exc:
        raise _past_the_limit(field, pred_len, last, series) from exc
    except Exception as exc:  # pandas raises many kinds for unusable offsets (0D: ZeroDivisionError)
        raise KronosInputError(
            field,
            f"cannot generate {pred_len} timestamps after {last}"
            f"{f' with freq {brief(freq)}' if freq is not None else ''} "
            f"({type(exc).__name__}: {cut(str(exc), 80)})",
            series,
        ) from exc
    return check_future(future, last, pred_len, field, series)


def _future(index: pd.DatetimeIndex, pred_len: int, freq: str | None, series: object | None) -> pd.DatetimeIndex:
    last = index[-1]
    if freq is not None:
        try:
            offset = pd.tseries.frequencies.to_offset(freq)
        except (ValueError, TypeError) as exc:
            raise KronosInputError("freq", f"not a pandas frequency: {brief(freq)}", series) from exc
        return pd.date_range(last, periods=pred_len + 1, freq=offset)[1:]
    recent = index[-64:]
    # pandas' inferred frequency as an offset (pd.infer_freq returns a string and warns in 3.1)
    inferred = pd.DatetimeIndex(recent, freq="infer").freq if len(recent) >= 3 else None
    if inferred is not None:
        return pd.date_range(last, periods=pred_len + 1, freq=inferred)[1:]
    gaps = pd.Series(recent[1:] - recent[:-1])
    step = gaps.mode().iloc[0]
    weekdays_only = bool((index.day_of_week < 5).all())
    if step == pd.Timedelta(days=1) and weekdays_only and _is_midnight_aligned(index):
        return pd.date_range(last, periods=pred_len + 1, freq="B")[1:]
    return pd.DatetimeIndex([last + step * (i + 1) for i in range(pred_len)])


def _is_midnight_aligned(index: pd.DatetimeIndex) -> bool:
    """All timestamps at the same time of day (daily bars)."""
    return len(set(index.time)) == 1
