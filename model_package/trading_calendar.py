"""Future timestamps that follow an exchange's trading calendar (exchange_calendars).

Rules:
- `calendar` names an exchange_calendars calendar (`XNYS`, `XSHG`, ...), exactly, in any
  letter case, or by one of its aliases (`NYSE`, `SSE`, ...); `24/7` never closes.
- Timestamps (history and future) are tz-naive wall time in the calendar's time zone.
- Spacing: `freq` when given (`D`, `B`, `C`, `24h` mean daily; fixed offsets under a day
  are intraday; other offsets are refused), else the most common gap among the last 64
  history timestamps (a mode of 1-4 days in bars all at one time of day is daily).
- Daily: the next sessions after the last timestamp's date, at its time of day.
- Intraday: bars on each trading period's grid (open..close, or open..break_start and
  break_end..close on exchanges with a lunch break; early closes included): bars labelled by
  their start (the default) are `start + k*step < end`, k >= 0; bars labelled by their end are
  the same bars plus `step` (`start + k*step <= end`, k >= 1, when `step` divides the period;
  else a last bar that runs past the close is kept, as in exchange_calendars'
  `trading_index(closed="right")`). End labels are chosen when more of the last 1024 history
  timestamps fall on a period's last end label than on a period's open (times that are both,
  on 24/5 or CMES, do not count). The period holding
  the last bar continues its grid (`last + k*step`); a last timestamp outside every period
  continues at the next period's grid.
- `24/7`: `last + k*step` (daily: every day), no schedule needed.
- The result obeys `calendar.check_future` and does not depend on today's date.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from .calendar import TIMESTAMP_MAX, check_future
from .errors import KronosInputError, brief, cut

DAY = pd.Timedelta(days=1)
MAX_YEARS = 50  # calendar years a horizon may span
_RECENT = 64  # history gaps read for the spacing
_LABEL_WINDOW = 1024  # history timestamps read for the labelling (start or end)


@functools.cache
def calendar_names() -> tuple[str, ...]:
    """Canonical calendar names known to exchange_calendars (includes '24/7', '24/5')."""
    import exchange_calendars as xc

    return tuple(sorted(xc.get_calendar_names(include_aliases=False)))


@functools.cache
def _lookup() -> dict[str, str]:
    """Upper-cased names and aliases -> canonical name."""
    import exchange_calendars as xc

    table = {name.upper(): name for name in calendar_names()}
    for alias, name in xc.aliases_to_names().items():
        table.setdefault(alias.upper(), name)
    return table


def check_calendar(name: object) -> str | None:
    """None or "" -> None; a known name or alias (any case) -> canonical name; else KronosInputError."""
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise KronosInputError("calendar", f"must be a calendar name (str), got {brief(name)}")
    canonical = _lookup().get(name.strip().upper())
    if canonical is not None:
        return canonical
    close = difflib.get_close_matches(name.upper(), list(_lookup()), n=3)
    hint = f"did you mean {', '.join(dict.fromkeys(_lookup()[c] for c in close))}? " if close else ""
    raise KronosInputError(
        "calendar",
        f"unknown calendar {brief(name, 40)}; {hint}known: XNYS, XSHG, XHKG, XLON, XTKS, XFRA, CMES, ... "
        f"({len(calendar_names())} calendars and aliases such as NYSE in exchange_calendars), or 24/7",
    )


def calendar_future_timestamps(
    history: pd.DatetimeIndex, pred_len: int, calendar: str, freq: str | None = None, series: object | None = None
) -> pd.DatetimeIndex:
    """`pred_len` timestamps [pred_len] after `history` (sorted, unique, naive local time) on
    `calendar`'s trading sessions; see the module rules. Bad input -> KronosInputError."""
    index = pd.DatetimeIndex(history)
    if len(index) == 0 or pred_len < 1:
        raise KronosInputError("calendar", "needs at least one history timestamp and pred_len >= 1", series)
    name = check_calendar(calendar)
    if name is None:
        raise KronosInputError("calendar", "no calendar named", series)
    last = pd.Timestamp(index[-1]).as_unit("ns")
    step, daily = _spacing(index, freq, series)
    if name == "24/7":
        try:
            future = pd.date_range(last, periods=pred_len + 1, freq=DAY if daily else step)[1:]
        except (OverflowError, pd.errors.OutOfBoundsDatetime) as exc:
            raise KronosInputError(
                "calendar", f"{pred_len} timestamps after {last} would pass {TIMESTAMP_MAX}", series
            ) from exc
    elif daily:
        future = _sessions_after(name, last, pred_len, series)
    else:
        future = _bars_after(name, index, last, step, pred_len, series)
    return check_future(future, last, pred_len, "calendar", series)


def _spacing(index: pd.DatetimeIndex, freq: str | None, series: object) -> tuple[pd.Timedelta, bool]:
    """(step, daily) from `freq`, else from the history's most common recent gap."""
    if freq is not None:
        try:
            offset = pd.tseries.frequencies.to_offset(freq)
        except (ValueError, TypeError) as exc:
            raise KronosInputError("freq", f"not a pandas frequency: {brief(freq)}", series) from exc
        if isinstance(offset, (pd.offsets.BusinessDay, pd.offsets.CustomBusinessDay)) and offset.n == 1:
            return DAY, True
        try:
            step = pd.Timedelta(offset)
        except (ValueError, TypeError):
            step = pd.Timedelta(0)
        if pd.Timedelta(0) < step <= DAY:
            return step, step == DAY
        raise KronosInputError("freq", f"{brief(freq)}: a calendar needs intraday or daily spacing", series)
    last = index[-1]
    if len(index) == 1:
        if last == last.normalize():
            return DAY, True
        raise KronosInputError("calendar", f"one history timestamp ({last}) gives no spacing; pass freq", series)
    recent = index[-_RECENT - 1 :]
    gaps = pd.Series(recent[1:] - recent[:-1])
    gaps = gaps[gaps > pd.Timedelta(0)]
    if gaps.empty:
        raise KronosInputError("calendar", "history timestamps must increase", series)
    step = pd.Timedelta(gaps.mode().iloc[0])
    if step < DAY:
        return step, False
    if step == DAY or (step <= 4 * DAY and len(set(recent.time)) == 1):
        return DAY, True
    raise KronosInputError("calendar", f"history spacing {step} is neither intraday nor daily; pass freq", series)


@functools.lru_cache(maxsize=256)
def _year(name: str, year: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One calendar year: session labels [S], trading-period starts and ends [P] (read-only
    datetime64[ns], naive local time, sorted; one period per session, two with a lunch break)."""
    import exchange_calendars as xc

    try:
        cal: Any = xc.get_calendar(name, start=f"{year}-01-01", end=f"{year}-12-31")
    except Exception as exc:  # outside the calendar's range: ValueError, OutOfBoundsDatetime, ...
        why = cut(f"{type(exc).__name__}: {exc}", 150)
        raise KronosInputError("calendar", f"exchange_calendars has no {name} schedule for {year} ({why})") from exc
    table = cal.schedule

    def local(column: str) -> np.ndarray:
        return table[column].dt.tz_convert(cal.tz).dt.tz_localize(None).to_numpy("datetime64[ns]")

    opens, pauses, resumes, closes = local("open"), local("break_start"), local("break_end"), local("close")
    lunch, nat = ~np.isnat(pauses), np.datetime64("NaT", "ns")
    start = np.stack([opens, np.where(lunch, resumes, nat)], axis=1).ravel()  # morning, afternoon
    end = np.stack([np.where(lunch, pauses, closes), np.where(lunch, closes, nat)], axis=1).ravel()
    keep = ~np.isnat(start)
    arrays = table.index.to_numpy("datetime64[ns]"), start[keep], end[keep]
    for array in arrays:
        array.setflags(write=False)  # shared by every caller through the cache
    return arrays


def _schedule(name: str, year: int, series: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_year`, its refusal naming the series."""
    try:
        return _year(name, year)
    except KronosInputError as exc:
        raise KronosInputError(exc.field, exc.rule, series) from exc


def _years(last: pd.Timestamp, pred_len: int, per_year: int, series: object) -> Iterator[int]:
    """Calendar years from `last`'s on; refuses a horizon needing more than MAX_YEARS
    (at once when `per_year`, an upper bound of future timestamps a year, says so)."""
    refusal = KronosInputError(
        "calendar", f"pred_len={pred_len} after {last} needs more than {MAX_YEARS} years of calendar", series
    )
    if pred_len > per_year * MAX_YEARS:
        raise refusal
    yield from range(last.year, last.year + MAX_YEARS + 1)
    raise refusal


def _sessions_after(name: str, last: pd.Timestamp, pred_len: int, series: object) -> pd.DatetimeIndex:
    """The next `pred_len` session dates after `last`'s date, at `last`'s time of day."""
    day = last.normalize().to_datetime64()
    found: list[np.ndarray] = []
    for year in _years(last, pred_len, 366, series):
        sessions = _schedule(name, year, series)[0]
        found.append(sessions[sessions > day])
        if sum(map(len, found)) >= pred_len:
            break
    return pd.DatetimeIndex(np.concatenate(found)[:pred_len]) + (last - last.normalize())


def _bars_after(
    name: str, index: pd.DatetimeIndex, last: pd.Timestamp, step: pd.Timedelta, pred_len: int, series: object
) -> pd.DatetimeIndex:
    """The next `pred_len` intraday bars after `last` on the calendar's trading periods."""
    s = step.as_unit("ns").value  # int nanoseconds
    shift = s if _labelled_by_end(name, index, s) else 0  # end label = start label + step
    t = last.value - shift  # start of the last history bar
    per_year = 366 * (DAY.value // s + 2)
    found: list[np.ndarray] = []
    for year in _years(last, pred_len, per_year, series):
        start, end = (a.view(np.int64) for a in _schedule(name, year, series)[1:])
        holds, after = (start <= t) & (t < end), start > t
        first, count = start.copy(), (end - start + s - 1) // s  # bars start + k*s < end
        first[holds], count[holds] = t + s, (end[holds] - t - 1) // s  # bars t + k*s < end, k >= 1
        use = (holds | after) & (count > 0)
        first, count = first[use], count[use]
        k = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)  # 0.. within each period
        found.append(np.repeat(first, count) + k * s + shift)
        if sum(map(len, found)) >= pred_len:
            break
    return pd.DatetimeIndex(np.concatenate(found)[:pred_len].view("datetime64[ns]"))


def _labelled_by_end(name: str, index: pd.DatetimeIndex, step_ns: int) -> bool:
    """Bars labelled by their end: more recent history timestamps on a period's last end
    label (its close when the step divides the period) than on a period's open (counting
    only times that are not both)."""
    recent = index[-_LABEL_WINDOW:].as_unit("ns")
    stamps = recent.to_numpy().view(np.int64)
    on_start = on_end = 0
    for year in range(max(recent[0].year, recent[-1].year - 1), recent[-1].year + 1):
        try:
            start, end = (a.view(np.int64) for a in _year(name, year)[1:])
        except KronosInputError:  # history outside the calendar's range: no evidence there
            continue
        last_end = start + (end - start + step_ns - 1) // step_ns * step_ns
        # where one period's close is the next one's open (24/5, CMES) only weekends tell
        on_start += int(np.isin(stamps, np.setdiff1d(start, last_end)).sum())
        on_end += int(np.isin(stamps, np.setdiff1d(last_end, start)).sum())
    return on_end > on_start
