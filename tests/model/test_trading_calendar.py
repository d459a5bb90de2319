"""Future timestamps on exchange trading calendars (model_package.trading_calendar), checked
against real exchange_calendars schedules: holidays, half days, lunch breaks, DST, labels."""

from __future__ import annotations

import pandas as pd
import pytest

from model_package import trading_calendar
from model_package.errors import KronosInputError
from model_package.trading_calendar import calendar_future_timestamps, calendar_names, check_calendar


def _day(date: str, first: str, last: str, freq: str = "5min") -> pd.DatetimeIndex:
    return pd.date_range(f"{date} {first}", f"{date} {last}", freq=freq)


def _stamps(*values: str) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(list(values))


# -- names ------------------------------------------------------------------------------------


def test_names_cases_and_aliases() -> None:
    assert {"XNYS", "XSHG", "24/7", "24/5"} <= set(calendar_names())
    assert check_calendar(None) is None and check_calendar("") is None
    assert check_calendar("XNYS") == "XNYS"
    assert check_calendar("xshg") == "XSHG"
    assert check_calendar("nyse") == "XNYS"  # an exchange_calendars alias
    assert check_calendar("24/7") == "24/7"


@pytest.mark.parametrize("name", ["XYZ", "NYSE2", 42, "x" * 10_000])
def test_unknown_calendar_refused(name: object) -> None:
    with pytest.raises(KronosInputError) as info:
        check_calendar(name)
    assert info.value.field == "calendar"
    assert len(str(info.value)) < 300
    if isinstance(name, str) and len(name) < 10:
        assert f"unknown calendar '{name}'" in str(info.value) and "XNYS" in str(info.value)


def test_unknown_calendar_refused_by_the_generator() -> None:
    with pytest.raises(KronosInputError) as info:
        calendar_future_timestamps(_stamps("2024-07-01"), 3, "XYZ")
    assert info.value.field == "calendar"


# -- intraday -----------------------------------------------------------------------------------


def test_xnys_start_labels_half_day_and_holiday() -> None:
    history = _day("2024-07-02", "09:30", "15:55")
    future = calendar_future_timestamps(history, 50, "XNYS")
    half_day = _day("2024-07-03", "09:30", "12:55")  # closes 13:00
    assert future[: len(half_day)].equals(half_day)
    assert future[len(half_day)] == pd.Timestamp("2024-07-05 09:30")  # July 4 closed
    assert future[-1] == pd.Timestamp("2024-07-05 10:05")


def test_xnys_end_labels() -> None:
    history = _day("2024-07-02", "09:35", "16:00")
    future = calendar_future_timestamps(history, 43, "XNYS")
    assert future.equals(pd.DatetimeIndex(list(_day("2024-07-03", "09:35", "13:00")) + ["2024-07-05 09:35"]))


def test_continues_inside_the_session_on_its_grid() -> None:
    history = _day("2024-07-02", "09:30", "11:00")
    future = calendar_future_timestamps(history, 3, "XNYS")
    assert future.equals(_stamps("2024-07-02 11:05", "2024-07-02 11:10", "2024-07-02 11:15"))


def test_xshg_lunch_break_start_and_end_labels() -> None:
    start_labels = _day("2024-07-02", "09:30", "11:25")
    assert calendar_future_timestamps(start_labels, 2, "XSHG").equals(_stamps("2024-07-02 13:00", "2024-07-02 13:05"))
    end_labels = _day("2024-07-02", "09:35", "11:30")
    assert calendar_future_timestamps(end_labels, 2, "XSHG").equals(_stamps("2024-07-02 13:05", "2024-07-02 13:10"))
    afternoon = _day("2024-07-02", "13:05", "15:00")  # end labels, a whole session before it
    history = end_labels.append(afternoon)
    assert calendar_future_timestamps(history, 1, "XSHG")[0] == pd.Timestamp("2024-07-03 09:35")


def test_dst_changes_keep_local_opening_time() -> None:
    before_spring = _day("2024-03-08", "09:30", "15:55")  # Friday, EST; Monday is EDT
    assert calendar_future_timestamps(before_spring, 1, "XNYS")[0] == pd.Timestamp("2024-03-11 09:30")
    before_autumn = _day("2024-11-01", "09:30", "15:55")  # Friday, EDT; Monday is EST
    future = calendar_future_timestamps(before_autumn, 79, "XNYS")
    assert future[0] == pd.Timestamp("2024-11-04 09:30") and future[-1] == pd.Timestamp("2024-11-05 09:30")


def test_hourly_bars_start_at_the_open() -> None:
    history = _day("2024-07-01", "09:30", "15:30", freq="h")
    future = calendar_future_timestamps(history, 8, "XNYS")
    assert future.equals(pd.DatetimeIndex(list(_day("2024-07-02", "09:30", "15:30", freq="h")) + ["2024-07-03 09:30"]))


def test_last_timestamp_outside_the_session() -> None:
    after_close = _stamps("2024-07-05 19:00", "2024-07-05 19:05")
    assert calendar_future_timestamps(after_close, 1, "XNYS")[0] == pd.Timestamp("2024-07-08 09:30")
    weekend = _stamps("2024-07-06 10:00", "2024-07-06 10:05")
    assert calendar_future_timestamps(weekend, 1, "XNYS")[0] == pd.Timestamp("2024-07-08 09:30")
    before_open = _stamps("2024-07-08 08:00", "2024-07-08 08:05")
    assert calendar_future_timestamps(before_open, 1, "XNYS")[0] == pd.Timestamp("2024-07-08 09:30")


@pytest.mark.parametrize("name", ["XNYS", "XSHG", "XHKG", "XTKS", "XLON", "XDUB"])
@pytest.mark.parametrize("closed", ["left", "right"])
@pytest.mark.parametrize("period", ["5min", "7min", "1h"])
def test_matches_exchange_calendars_trading_index(name: str, closed: str, period: str) -> None:
    """Start labels are trading_index(closed="left"), end labels trading_index(closed="right")."""
    import exchange_calendars as xc

    cal = xc.get_calendar(name, start="2023-12-01", end="2024-12-31")
    bars = cal.trading_index("2024-01-04", "2024-06-28", period, intervals=False, closed=closed)
    bars = pd.DatetimeIndex(bars).tz_convert(cal.tz).tz_localize(None)
    cut, pred_len = 150, 250
    assert len(bars) >= cut + pred_len
    future = calendar_future_timestamps(bars[:cut], pred_len, name)
    assert future.equals(bars[cut : cut + pred_len].as_unit("ns"))


@pytest.mark.parametrize("name", ["24/5", "CMES"])
@pytest.mark.parametrize("closed", ["left", "right"])
def test_back_to_back_sessions_labelled_from_the_weekend(name: str, closed: str) -> None:
    """Where a close is the next open, the labels show at weekends (history spans one)."""
    import exchange_calendars as xc

    cal = xc.get_calendar(name, start="2023-12-01", end="2024-12-31")
    bars = cal.trading_index("2024-01-04", "2024-03-28", "1h", intervals=False, closed=closed)
    bars = pd.DatetimeIndex(bars).tz_convert(cal.tz).tz_localize(None)
    future = calendar_future_timestamps(bars[:120], 300, name)
    assert future.equals(bars[120:420].as_unit("ns"))


# -- daily --------------------------------------------------------------------------------------


def test_daily_skips_holidays_and_weekends() -> None:
    history = pd.date_range("2024-07-01", "2024-07-03")
    assert calendar_future_timestamps(history, 3, "XNYS").equals(_stamps("2024-07-05", "2024-07-08", "2024-07-09"))
    fridays_and_mondays = _stamps("2024-06-28", "2024-07-01")  # a 3-day gap is still daily
    assert calendar_future_timestamps(fridays_and_mondays, 1, "XNYS")[0] == pd.Timestamp("2024-07-02")


def test_daily_keeps_the_time_of_day() -> None:
    history = _stamps("2024-07-02 16:00", "2024-07-03 16:00")
    assert calendar_future_timestamps(history, 2, "XNYS").equals(_stamps("2024-07-05 16:00", "2024-07-08 16:00"))


def test_sp500_history_from_1999_matches_its_own_dates() -> None:
    sp500 = pytest.importorskip("arch.data.sp500").load().index
    for cut in (10, 700, 2000, 3400):  # 1999; after 2001-09-11; 2007 Ford day; 2012 Sandy
        future = calendar_future_timestamps(sp500[:cut], 250, "XNYS")
        assert future.equals(pd.DatetimeIndex(sp500[cut : cut + 250]).as_unit("ns").rename(None))


def test_pandas3_resolution_accepted() -> None:
    history = _day("2024-07-02", "09:30", "15:55").as_unit("us")
    assert calendar_future_timestamps(history, 1, "XNYS")[0] == pd.Timestamp("2024-07-03 09:30")
    daily = pd.date_range("2024-07-01", "2024-07-03").as_unit("s")
    assert calendar_future_timestamps(daily, 1, "XNYS")[0] == pd.Timestamp("2024-07-05")


# -- freq ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("freq", ["D", "B", "C", "1D", "24h"])
def test_daily_freqs(freq: str) -> None:
    future = calendar_future_timestamps(_stamps("2024-07-03"), 2, "XNYS", freq=freq)
    assert future.equals(_stamps("2024-07-05", "2024-07-08"))


def test_intraday_freq_overrides_the_history() -> None:
    history = _stamps("2024-07-02 15:00")
    future = calendar_future_timestamps(history, 3, "XNYS", freq="30min")
    assert future.equals(_stamps("2024-07-02 15:30", "2024-07-03 09:30", "2024-07-03 10:00"))


@pytest.mark.parametrize("freq", ["W", "MS", "2D", "not a freq"])
def test_other_freqs_refused(freq: str) -> None:
    with pytest.raises(KronosInputError) as info:
        calendar_future_timestamps(_stamps("2024-07-03"), 2, "XNYS", freq=freq, series="A")
    assert info.value.field == "freq" and info.value.series == "A"


def test_one_intraday_timestamp_needs_freq() -> None:
    with pytest.raises(KronosInputError, match="pass freq") as info:
        calendar_future_timestamps(_stamps("2024-07-03 10:00"), 2, "XNYS")
    assert info.value.field == "calendar"
    assert calendar_future_timestamps(_stamps("2024-07-03"), 1, "XNYS")[0] == pd.Timestamp("2024-07-05")


def test_weekly_history_refused() -> None:
    with pytest.raises(KronosInputError, match="neither intraday nor daily"):
        calendar_future_timestamps(pd.date_range("2024-01-05", periods=10, freq="W-FRI"), 2, "XNYS")


# -- 24/7 and limits ----------------------------------------------------------------------------


def test_24_7_runs_through_weekends() -> None:
    history = pd.date_range("2024-07-05 20:00", periods=5, freq="2h")  # Friday evening
    future = calendar_future_timestamps(history, 24, "24/7")
    assert future.equals(pd.date_range("2024-07-06 06:00", periods=24, freq="2h").as_unit("ns"))
    daily = calendar_future_timestamps(_stamps("2024-07-05", "2024-07-06"), 2, "24/7")
    assert daily.equals(_stamps("2024-07-07", "2024-07-08"))


def test_horizons_past_the_calendar_refused() -> None:
    with pytest.raises(KronosInputError, match="50 years") as info:
        calendar_future_timestamps(_stamps("2024-07-03"), 10**6, "XNYS")
    assert info.value.field == "calendar"
    with pytest.raises(KronosInputError, match="no XSHG schedule for 2027") as info:  # XSHG holidays end in 2026
        calendar_future_timestamps(_stamps("2026-12-30"), 10, "XSHG", series="A")
    assert info.value.field == "calendar" and info.value.series == "A"
    with pytest.raises(KronosInputError) as info:
        calendar_future_timestamps(_stamps("2262-04-01"), 30, "24/7")
    assert info.value.field == "calendar"


def test_result_does_not_depend_on_the_cache() -> None:
    history = _day("2024-12-31", "09:30", "15:55")
    first = calendar_future_timestamps(history, 200, "XNYS")
    again = calendar_future_timestamps(history, 200, "XNYS")
    trading_calendar._year.cache_clear()
    fresh = calendar_future_timestamps(history, 200, "XNYS")
    assert first.equals(again) and first.equals(fresh)
    assert first[0] == pd.Timestamp("2025-01-02 09:30")  # across the year end, New Year closed
