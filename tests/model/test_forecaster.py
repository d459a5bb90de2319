"""KronosForecaster on DataFrames: batching, seeds, quantiles, timestamps, input errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from model_package import KronosForecaster, KronosInputError
from model_package.frames import CANDLE_COLUMNS


@pytest.fixture(scope="module")
def forecaster(tiny_checkpoints) -> KronosForecaster:
    return KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=40, device="cpu")


def test_mixed_length_batch_equals_each_series_alone(forecaster, candles):
    lengths = {"A": 12, "B": 37, "C": 55, "D": 3}  # C and A+horizon exceed the context
    history = pd.concat(
        [candles(n, seed=i, series_id=sid) for i, (sid, n) in enumerate(lengths.items())], ignore_index=True
    )
    together = forecaster.predict(history, pred_len=9, top_k=1)
    assert list(together["series_id"].unique()) == list(lengths)
    for sid in lengths:
        alone = forecaster.predict(history[history.series_id == sid], pred_len=9, top_k=1)
        part = together[together.series_id == sid].reset_index(drop=True)
        np.testing.assert_allclose(part[list(CANDLE_COLUMNS)], alone[list(CANDLE_COLUMNS)], rtol=1e-5)
        assert (part.timestamp == alone.timestamp).all()


def test_seed_reproducible_and_different_seeds_differ(forecaster, candles):
    history = candles(30)
    kwargs = dict(pred_len=6, temperature=1.0, top_p=0.9, sample_count=4)
    a = forecaster.predict(history, seed=11, **kwargs)
    b = forecaster.predict(history, seed=11, **kwargs)
    c = forecaster.predict(history, seed=12, **kwargs)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a[list(CANDLE_COLUMNS)], c[list(CANDLE_COLUMNS)])


def test_sampling_leaves_the_global_rng_alone(forecaster, candles):
    state = torch.get_rng_state()
    forecaster.predict(candles(20), pred_len=3, sample_count=3)
    assert torch.equal(state, torch.get_rng_state())


def test_quantiles_are_ordered_and_mean_matches_paths(forecaster, candles):
    history = candles(25, series_id="X")
    levels = [0.1, 0.5, 0.9]
    out = forecaster.predict(history, pred_len=5, sample_count=16, seed=3, quantiles=levels)
    for column in CANDLE_COLUMNS:
        q = out[[f"{column}_q{lv}" for lv in levels]].to_numpy()
        assert (np.diff(q, axis=1) >= 0).all(), column
    assert (out["close_q0.9"] > out["close_q0.1"]).any()
    paths = forecaster.predict_paths(history, pred_len=5, sample_count=16, seed=3)
    assert sorted(paths["path"].unique()) == list(range(16))
    mean = paths.groupby("timestamp")[list(CANDLE_COLUMNS)].mean().reset_index(drop=True)
    np.testing.assert_allclose(out[list(CANDLE_COLUMNS)], mean, rtol=1e-5)


def test_missing_volume_and_amount_rules(forecaster, candles):
    ohlc = forecaster.predict(candles(20, volume=False), pred_len=3, top_k=1)
    assert np.abs(ohlc[["volume", "amount"]].to_numpy()).max() < 1e-3
    no_amount = candles(20, amount=False)
    derived = no_amount.assign(amount=no_amount.volume * no_amount[["open", "high", "low", "close"]].mean(axis=1))
    pd.testing.assert_frame_equal(
        forecaster.predict(no_amount, pred_len=3, top_k=1), forecaster.predict(derived, pred_len=3, top_k=1)
    )


def test_future_timestamps_inferred_from_each_series(forecaster, candles):
    daily = candles(30, start="2024-01-01", freq="B", series_id="daily")  # weekends skipped
    intraday = candles(30, start="2024-01-02 09:30", freq="5min", series_id="bars")
    out = forecaster.predict(pd.concat([daily, intraday]), pred_len=7, top_k=1)
    daily_future = pd.DatetimeIndex(out[out.series_id == "daily"].timestamp)
    assert (daily_future.day_of_week < 5).all()
    assert daily_future[0] == pd.Timestamp("2024-02-12")  # the Monday after Friday 2024-02-09
    bars = pd.DatetimeIndex(out[out.series_id == "bars"].timestamp)
    assert (bars[1:] - bars[:-1] == pd.Timedelta("5min")).all()  # any datetime resolution
    assert bars[0] == intraday.timestamp.iloc[-1] + pd.Timedelta("5min")


def test_business_days_with_holidays_still_continue_on_business_days(forecaster, candles):
    days = pd.bdate_range("2024-01-01", periods=40).delete([10, 25])  # two holidays
    history = candles(38).assign(timestamp=days)
    future = pd.DatetimeIndex(forecaster.predict(history, pred_len=10, top_k=1).timestamp)
    assert (future.day_of_week < 5).all() and future[0] > days[-1]


def test_explicit_freq_and_future_timestamps(forecaster, candles):
    history = candles(20, freq="h")
    out = forecaster.predict(history, pred_len=4, top_k=1, freq="30min")
    future = pd.DatetimeIndex(out.timestamp)
    assert (future[1:] - future[:-1] == pd.Timedelta("30min")).all()
    given = pd.DataFrame({"timestamp": pd.date_range("2030-01-01", periods=4, freq="D")})
    out = forecaster.predict(history, pred_len=4, top_k=1, future_timestamps=given)
    assert (out.timestamp.to_numpy() == given.timestamp.to_numpy()).all()


def _error(forecaster, history, **kwargs) -> KronosInputError:
    with pytest.raises(KronosInputError) as err:
        forecaster.predict(history, **{"pred_len": 3, **kwargs})
    return err.value


def test_input_errors_name_series_field_and_rule(forecaster, candles):
    good = pd.concat([candles(10, series_id="ok"), candles(10, seed=2, series_id="bad")], ignore_index=True)
    err = _error(forecaster, good.drop(columns=["close"]))
    assert err.field == "close" and "required column missing" in str(err)

    nan = good.copy()
    nan.loc[15, "high"] = np.nan
    err = _error(forecaster, nan)
    assert (err.series, err.field) == ("bad", "high") and "NaN" in err.rule

    inf = good.copy()
    inf.loc[3, "volume"] = np.inf
    assert (_error(forecaster, inf).series, _error(forecaster, inf).field) == ("ok", "volume")

    unsorted = good.copy()
    unsorted.loc[[12, 13], "timestamp"] = unsorted.loc[[13, 12], "timestamp"].to_numpy()
    err = _error(forecaster, unsorted)
    assert (err.series, err.field) == ("bad", "timestamp") and "decreasing" in err.rule

    dup = good.copy()
    dup.loc[4, "timestamp"] = dup.loc[3, "timestamp"]
    assert "duplicate" in _error(forecaster, dup).rule

    err = _error(forecaster, good[good.series_id == "ok"].head(1))
    assert err.field == "history" and "at least 2" in err.rule
    text = good.astype({"open": object})
    text.loc[0, "open"] = "abc"
    assert _error(forecaster, text).field == "open"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pred_len": 0}, "pred_len"),
        ({"pred_len": 41}, "pred_len"),  # longer than the context (40)
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"sample_count": 0}, "sample_count"),
        ({"top_k": -1}, "top_k"),
        ({"quantiles": [0.5, 1.0]}, "quantiles"),
        ({"quantiles": [0.0]}, "quantiles"),
        ({"freq": "fortnightly-ish"}, "freq"),
    ],
)
def test_parameter_errors(forecaster, candles, kwargs, field):
    assert _error(forecaster, candles(10), **kwargs).field == field


def test_future_timestamp_errors(forecaster, candles):
    history = candles(10)
    few = pd.DataFrame({"timestamp": pd.date_range("2030-01-01", periods=2)})
    assert "pred_len=3 rows" in _error(forecaster, history, future_timestamps=few).rule
    early = pd.DataFrame({"timestamp": pd.date_range(history.timestamp.iloc[-1], periods=3, freq="min")})
    assert "after the last history" in _error(forecaster, history, future_timestamps=early).rule
