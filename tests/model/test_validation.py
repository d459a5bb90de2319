"""The validation rules of the model layer, one table row each: every bad input is a
KronosInputError naming the series, the field and the rule (never another exception, never
a forecast with NaN or timestamps out of order)."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pandas as pd
import pytest
import torch

from model_package import KronosForecaster, KronosInputError, SamplingParams
from model_package.calendar import TIMESTAMP_MAX
from model_package.forecaster import INT_PARAM_MAX, SEED_MAX, series_seed
from model_package.frames import CANDLE_COLUMNS, MAX_ABS_VALUE, normalise
from model_package.kronos import SeriesOutput
from model_package.kronos.sampling import path_keys, uniforms


@pytest.fixture(scope="module")
def forecaster(tiny_checkpoints) -> KronosForecaster:
    return KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=40, device="cpu")


@pytest.fixture
def two_series(candles) -> pd.DataFrame:
    """Rows 0-9: series 'A'; rows 10-19: series 'B' (daily)."""
    return pd.concat(
        [
            candles(10, seed=1, series_id="A", start="2024-01-01", freq="D"),
            candles(10, seed=2, series_id="B", start="2024-01-01", freq="D"),
        ],
        ignore_index=True,
    )


def _refused(forecaster, history, params=None, future_timestamps=None) -> KronosInputError:
    with pytest.raises(KronosInputError) as info:
        forecaster.prepare(history, params or SamplingParams(pred_len=3), future_timestamps)
    return info.value


def _set(column, row, value):
    def mutate(df):
        df = df.astype({column: object}) if not isinstance(value, float) else df
        df.loc[row, column] = value
        return df

    return mutate


# -- candles --------------------------------------------------------------------------------------

CANDLE_CASES = [
    # (mutation, series, field, message fragment)
    (_set("close", 15, -3.0), "B", "close", "must be > 0 (strict_candles), got -3 at row 15"),
    (_set("open", 2, 0.0), "A", "open", "must be > 0 (strict_candles), got 0 at row 2"),
    (lambda df: df.assign(high=df["low"] * 0.5), "A", "high", "must be >= low (strict_candles)"),
    (_set("open", 12, 1e6), "B", "open", "must be within [low, high] (strict_candles), got 1e+06"),
    (_set("close", 3, 1e-3), "A", "close", "must be within [low, high] (strict_candles)"),
    (_set("volume", 4, -1.0), "A", "volume", "must be >= 0 (strict_candles), got -1 at row 4"),
    (_set("amount", 11, -5.0), "B", "amount", "must be >= 0 (strict_candles), got -5 at row 11"),
    (_set("close", 5, 1e300), "A", "close", "magnitude must be <= 1e+15 (float32 normalisation), got 1e+300"),
    (_set("volume", 5, 2e15), "A", "volume", "magnitude must be <= 1e+15"),
    (
        lambda df: df.drop(columns="amount").assign(volume=1e14),
        "A",
        "amount",
        "magnitude must be <= 1e+15 (float32 normalisation), got 1.0",
    ),
    (_set("close", 5, np.nan), "A", "close", "must not contain NaN or infinite values (1 rows, first at row 5)"),
    (_set("low", 6, "inf"), "A", "low", "must not contain NaN or infinite values"),
    (_set("high", 6, "abc"), "A", "high", "must be numeric"),
    (_set("high", 6, [1.0]), "A", "high", "must be numeric, got list [1.0] at row 6"),
    (_set("open", 6, True), "A", "open", "must be numeric, got bool True at row 6"),
    (lambda df: df.assign(open=True), "A", "open", "must be numeric, got booleans"),
]


@pytest.mark.parametrize(("mutate", "series", "field", "fragment"), CANDLE_CASES)
def test_candle_rules(forecaster, two_series, mutate, series, field, fragment):
    err = _refused(forecaster, mutate(two_series.copy()))
    assert (err.series, err.field) == (series, field)
    assert fragment in err.rule


def test_message_names_series_field_rule_value_and_row(forecaster, two_series):
    err = _refused(forecaster, _set("close", 15, -3.0)(two_series))
    assert str(err) == "series 'B', close: must be > 0 (strict_candles), got -3 at row 15"


@pytest.mark.parametrize(
    "mutate",
    [
        _set("close", 15, -3.0),
        _set("open", 2, 0.0),
        lambda df: df.assign(high=df["low"] * 0.5),
        _set("open", 12, 1e6),
        _set("volume", 4, -1.0),
        _set("amount", 11, -5.0),
    ],
)
def test_strict_candles_false_skips_only_sign_and_ordering(forecaster, two_series, mutate):
    history = mutate(two_series.copy())
    loose = SamplingParams(pred_len=3, top_k=1, strict_candles=False)
    forecast = forecaster.predict(history, pred_len=3, top_k=1, strict_candles=False)
    assert np.isfinite(forecast[list(CANDLE_COLUMNS)].to_numpy()).all()
    assert len(forecaster.prepare(history, loose).series) == 2
    # the other rules still hold without strict_candles
    with pytest.raises(KronosInputError, match="magnitude"):
        forecaster.prepare(_set("close", 1, -1e16)(history), loose)
    with pytest.raises(KronosInputError, match="NaN"):
        forecaster.prepare(_set("close", 1, np.nan)(history), loose)


def test_negative_prices_forecast_when_strict_candles_is_off(forecaster, candles):
    spread = candles(30).assign(**{c: lambda d, c=c: d[c] - 101.0 for c in ("open", "high", "low", "close")})
    assert (spread["close"] < 0).any()
    with pytest.raises(KronosInputError, match="strict_candles"):
        forecaster.predict(spread, pred_len=2, top_k=1)
    out = forecaster.predict(spread, pred_len=2, top_k=1, strict_candles=False)
    assert np.isfinite(out[list(CANDLE_COLUMNS)].to_numpy()).all()


def test_the_magnitude_bound_keeps_normalisation_finite():
    """The longest history the default limits allow, values at +-MAX_ABS_VALUE (largest std)."""
    L = 4096
    candles = np.where(np.arange(L)[:, None] % 2 == 0, MAX_ABS_VALUE, -MAX_ABS_VALUE) * np.ones((L, 6))
    z, mean, std = normalise(candles.astype(np.float32), clip=5.0)
    assert np.isfinite(z).all() and np.isfinite(mean).all() and np.isfinite(std).all()
    assert np.allclose(std, MAX_ABS_VALUE, rtol=1e-3)


def test_values_at_the_bound_forecast_finite(forecaster, candles):
    history = candles(30)
    history[["open", "high", "low", "close"]] *= 0.9 * MAX_ABS_VALUE / 100
    history["amount"] = history["volume"]
    out = forecaster.predict(history, pred_len=3, sample_count=2, seed=1)
    assert np.isfinite(out[list(CANDLE_COLUMNS)].to_numpy()).all()


def test_non_finite_forecasts_are_refused_not_returned(forecaster, candles):
    request = forecaster.prepare(candles(10), SamplingParams(pred_len=2))
    nan_paths = SeriesOutput(
        paths=torch.full((1, 2, 6), float("nan")),
        input_s1=torch.zeros(1),
        input_s2=torch.zeros(1),
        window_s1=torch.zeros(1),
        window_s2=torch.zeros(1),
    )
    with pytest.raises(KronosInputError, match="not finite"):
        forecaster.finish(request, [nan_paths])


# -- frame shape and series ids ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "field", "fragment"),
    [
        (lambda df: pd.concat([df, df[["close"]]], axis=1), "close", "column given more than once"),
        (lambda df: df.drop(columns=["timestamp"]), "timestamp", "required column missing"),
        (_set("series_id", 3, None), "series_id", "must not be empty, got an empty value at row 3"),
        (_set("series_id", 3, ["A"]), "series_id", "must be strings or integers, got list"),
        (_set("series_id", 3, True), "series_id", "must be strings or integers, got bool"),
        (lambda df: df.assign(series_id=1.5), "series_id", "must be strings or integers"),
        (lambda df: df.head(0), "history", "at least one row"),
        (lambda df: df.head(11), "history", "needs at least 2 candles, got 1"),
    ],
)
def test_frame_rules(forecaster, two_series, mutate, field, fragment):
    err = _refused(forecaster, mutate(two_series.copy()))
    assert err.field == field and fragment in err.rule


def test_integer_series_ids_are_kept(forecaster, two_series):
    history = two_series.assign(series_id=two_series["series_id"].map({"A": 7, "B": 8}))
    out = forecaster.predict(history, pred_len=2, top_k=1)
    assert list(out["series_id"].unique()) == [7, 8]


# -- timestamps -------------------------------------------------------------------------------------

TIMESTAMP_CASES = [
    (lambda df: df.assign(timestamp=np.arange(len(df)) * 86_400 + 1_704_067_200), "got numbers (int64)"),
    (lambda df: df.assign(timestamp=np.arange(len(df)) * 1.5), "got numbers (float64)"),
    (lambda df: df.assign(timestamp=[True] * len(df)), "got numbers (bool)"),
    (_set("timestamp", 4, 1_704_067_200), "must hold datetimes or date/time strings, got int 1704067200 at row 4"),
    (_set("timestamp", 4, "not a date"), "not parseable as datetimes"),
    (_set("timestamp", 4, "NaT"), "must not be empty, got NaT at row 4"),
    (_set("timestamp", 4, None), "must not be empty, got an empty value at row 4"),
    (lambda df: df.assign(timestamp=df["timestamp"].dt.tz_localize("Europe/Paris")), "must be timezone-naive"),
    (lambda df: df.assign(timestamp=df["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S+01:00")), "must be timezone-naive"),
    (_set("timestamp", 4, "1500-01-01"), "1500-01-01"),  # out of range (pandas 3) / unparseable (pandas 2)
    (_set("timestamp", 4, pd.Timestamp("2024-01-04")), "must be strictly increasing; duplicate timestamp at row 4"),
    (_set("timestamp", 4, pd.Timestamp("2023-01-01")), "must be strictly increasing; decreasing timestamp at row 4"),
]


@pytest.mark.parametrize(("mutate", "fragment"), TIMESTAMP_CASES)
def test_timestamp_rules(forecaster, two_series, mutate, fragment):
    err = _refused(forecaster, mutate(two_series.copy()))
    assert (err.series, err.field) == ("A", "timestamp")
    assert fragment in err.rule


def test_date_strings_and_datetime_objects_are_accepted(forecaster, candles):
    history = candles(10, start="2024-01-01", freq="D")
    as_text = history.assign(timestamp=history["timestamp"].dt.strftime("%Y-%m-%d"))
    as_objects = history.assign(timestamp=pd.Series([t.to_pydatetime() for t in history["timestamp"]], dtype=object))
    want = forecaster.predict(history, pred_len=2, top_k=1)
    for variant in (as_text, as_objects):
        pd.testing.assert_frame_equal(forecaster.predict(variant, pred_len=2, top_k=1), want, check_dtype=False)


# -- future timestamps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("freq", "fragment"),
    [
        ("0D", "cannot generate 3 timestamps after"),
        ("0min", "cannot generate 3 timestamps after"),
        ("1000YE", "would pass"),
        ("-1D", "future timestamps must start after the last history timestamp"),
        ("-5min", "future timestamps must start after the last history timestamp"),
        ("0B", "gives 0 future timestamps, need pred_len=3"),
        ("1000000D", "timestamps after"),  # pandas 2: cannot generate; pandas 3: would pass
        ("fortnightly-ish", "not a pandas frequency"),
    ],
)
def test_freq_rules(forecaster, candles, freq, fragment):
    err = _refused(forecaster, candles(10), SamplingParams(pred_len=3, freq=freq))
    assert err.field == "freq" and fragment in err.rule, err


def test_good_freqs_give_increasing_timestamps_after_the_history(forecaster, candles):
    history = candles(10, start="2024-01-05", freq="D")
    for freq in ("B", "5min", "h", "W-MON", "2262D"):
        request = forecaster.prepare(history, SamplingParams(pred_len=3, freq=freq))
        future = request.series[0].future
        assert future.is_monotonic_increasing and future.is_unique and future[0] > history["timestamp"].iloc[-1]


@pytest.mark.parametrize(
    ("start", "freq", "params", "field"),
    [
        ("2262-03-20", "D", SamplingParams(pred_len=30), "pred_len"),  # inferred daily spacing overflows
        ("2262-03-20", "B", SamplingParams(pred_len=30), "pred_len"),
        ("2262-04-11 22:00", "5min", SamplingParams(pred_len=30), "pred_len"),  # past 23:47:16
        ("2262-03-20", "D", SamplingParams(pred_len=3, freq="30D"), "freq"),
    ],
)
def test_horizons_past_the_timestamp_limit(forecaster, candles, start, freq, params, field):
    history = candles(10, start=start, freq=freq)
    err = _refused(forecaster, history, params)
    assert err.field == field and "would pass" in err.rule and str(TIMESTAMP_MAX) in err.rule


def test_given_future_timestamps_follow_the_same_rules(forecaster, candles):
    history = candles(10, start="2024-01-01", freq="D")
    future = pd.DataFrame({"timestamp": pd.date_range("2024-02-01", periods=3, freq="D")})
    assert len(forecaster.prepare(history, SamplingParams(pred_len=3), future).series) == 1
    cases = {
        "decreasing": future.iloc[::-1].reset_index(drop=True),
        "numbers": pd.DataFrame({"timestamp": [1, 2, 3]}),
        "timezone": future.assign(timestamp=future["timestamp"].dt.tz_localize("UTC")),
        "before the history": pd.DataFrame({"timestamp": pd.date_range("2023-01-01", periods=3)}),
    }
    fragments = {
        "decreasing": "strictly increasing",
        "numbers": "got numbers",
        "timezone": "timezone-naive",
        "before the history": "start after the last history",
    }
    for name, frame in cases.items():
        err = _refused(forecaster, history, SamplingParams(pred_len=3), frame)
        assert err.field == "future_timestamps" and fragments[name] in err.rule, (name, err)


# -- sampling params ---------------------------------------------------------------------------------

PARAM_CASES = [
    ({"pred_len": 0}, "pred_len", "must be >= 1, got 0"),
    ({"pred_len": INT_PARAM_MAX + 1}, "pred_len", f"must be <= {INT_PARAM_MAX}"),
    ({"pred_len": 2.0}, "pred_len", "must be an integer"),
    ({"pred_len": True}, "pred_len", "must be an integer"),
    ({"top_k": -1}, "top_k", "must be >= 0"),
    ({"top_k": 2**63}, "top_k", f"must be <= {INT_PARAM_MAX}"),
    ({"top_k": 10**100}, "top_k", "must be <= "),
    ({"sample_count": 0}, "sample_count", "must be >= 1"),
    ({"sample_count": 2**40}, "sample_count", f"must be <= {INT_PARAM_MAX}"),
    ({"seed": -1}, "seed", "must be >= 0, got -1"),
    ({"seed": 2**64}, "seed", f"must be <= {SEED_MAX}"),
    ({"seed": "7"}, "seed", "must be an integer"),
    ({"temperature": float("nan")}, "temperature", "must be a finite number"),
    ({"temperature": float("inf")}, "temperature", "must be a finite number"),
    ({"temperature": 0.0}, "temperature", "must be in [1e-06, 1e+06]"),
    ({"temperature": 1e7}, "temperature", "must be in [1e-06, 1e+06]"),
    ({"temperature": 10**400}, "temperature", "must be a finite number"),
    ({"temperature": "1.0"}, "temperature", "must be a number"),
    ({"top_p": float("nan")}, "top_p", "must be a finite number"),
    ({"top_p": 0.0}, "top_p", "must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p", "must be in (0, 1]"),
    ({"quantiles": (float("nan"),)}, "quantiles", "must be a finite number"),
    ({"quantiles": (1.0,)}, "quantiles", "levels must be in (0, 1)"),
    ({"quantiles": (0.5, 0.5)}, "quantiles", "levels must be distinct"),
    ({"quantiles": (0.1, 0.1000000001)}, "quantiles", "must give distinct column names"),
    ({"quantiles": (True,)}, "quantiles", "must be a number"),
    ({"quantiles": "0.5"}, "quantiles", "must be a list of numbers"),
    ({"freq": 5}, "freq", "must be a string"),
    ({"strict_candles": "yes"}, "strict_candles", "must be true or false"),
]


@pytest.mark.parametrize(("kwargs", "field", "fragment"), PARAM_CASES)
def test_sampling_param_ranges(kwargs, field, fragment):
    with pytest.raises(KronosInputError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field and fragment in info.value.rule, info.value


def test_params_are_stored_as_plain_python_types():
    params = SamplingParams(
        pred_len=np.int64(3),
        temperature=np.float32(0.5),
        seed=np.uint64(2**64 - 1),
        quantiles=[np.float64(0.5)],
        strict_candles=np.bool_(False),
    )
    assert type(params.pred_len) is int and type(params.temperature) is float
    assert params.seed == 2**64 - 1 and type(params.seed) is int
    assert params.quantiles == (0.5,) and params.strict_candles is False


def test_huge_top_k_keeps_every_token(forecaster, candles):
    history = candles(20)
    out = forecaster.predict(history, pred_len=3, top_k=INT_PARAM_MAX, top_p=0.5, seed=4, sample_count=2)
    same = forecaster.predict(history, pred_len=3, top_k=0, top_p=1.0, seed=4, sample_count=2)
    pd.testing.assert_frame_equal(out, same)  # top_k above the vocabulary: nothing filtered


def test_extreme_temperatures_give_finite_forecasts(forecaster, candles):
    for temperature in (1e-6, 1e6):
        out = forecaster.predict(candles(20), pred_len=3, temperature=temperature, seed=1, sample_count=2)
        assert np.isfinite(out[list(CANDLE_COLUMNS)].to_numpy()).all()


# -- seeds ----------------------------------------------------------------------------------------


def test_every_seed_in_range_gives_its_own_reproducible_draws(forecaster, candles):
    seeds = [0, 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
    keys = [series_seed(seed, 0) for seed in seeds]
    assert len(set(keys)) == len(seeds)  # no aliasing (seeds were masked to 64 bits before)
    draws = {tuple(uniforms(path_keys(k, 3), 0, 0)) for k in keys}
    assert len(draws) == len(seeds)
    history = candles(20)
    kwargs = dict(pred_len=3, sample_count=3)
    top = forecaster.predict(history, seed=2**64 - 1, **kwargs)
    pd.testing.assert_frame_equal(top, forecaster.predict(history, seed=2**64 - 1, **kwargs))
    assert not top.equals(forecaster.predict(history, seed=0, **kwargs))
    with pytest.raises(KronosInputError, match="seed"):
        forecaster.predict(history, seed=2**64, **kwargs)


def test_series_seed_is_a_bijection_per_index_and_distinct_per_series():
    rng = np.random.default_rng(0)
    seeds = [int(s) for s in rng.integers(0, 2**63, 2000, dtype=np.int64)] + [2**64 - 1 - i for i in range(100)]
    assert len({series_seed(s, 0) for s in seeds}) == len(set(seeds))
    assert len({series_seed(7, i) for i in range(1000)}) == 1000
    with pytest.raises(ValueError):
        series_seed(2**64, 0)


# -- one source of truth for defaults --------------------------------------------------------------


def test_predict_defaults_are_the_sampling_params_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    for method in (KronosForecaster.predict, KronosForecaster.predict_paths):
        for name, parameter in inspect.signature(method).parameters.items():
            if name in defaults and name != "quantiles":
                assert parameter.default == defaults[name], (method.__name__, name)
    assert inspect.signature(KronosForecaster.predict).parameters["quantiles"].default is None
    assert defaults["quantiles"] == ()


def test_repair_candles_moves_only_broken_values():
    from model_package.frames import repair_candles

    bars = np.array(
        [
            [10.0, 12.0, 9.0, 11.0, 5.0, 50.0],  # well-formed: unchanged
            [10.0, 9.5, 9.8, 11.0, -1.0, -3.0],  # high below both, low above open, negatives
        ]
    )
    fixed = repair_candles(bars)
    assert np.array_equal(fixed[0], bars[0])
    assert fixed[1].tolist() == [10.0, 11.0, 9.8, 11.0, 0.0, 0.0]
    assert bars[1, 1] == 9.5  # the input is not modified
