"""Property-based test of the validation layer (hypothesis): whatever params and candle
frames a client sends, `prepare_request` either raises KronosInputError or returns a
request whose forecast has only finite values and future timestamps strictly after the
last history timestamp, strictly increasing. Never another exception type.

Profiles (tests/conftest.py): the default `kronos` profile is derandomized, 150 examples a
test (the suite stays fast and repeatable); `pytest --hypothesis-profile=explore` searches
with fresh randomness and 2000 examples a test.
"""

from __future__ import annotations

import contextlib
import string
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from model_package import KronosForecaster, KronosInputError
from model_package.data import random_walk_candles
from model_package.frames import CANDLE_COLUMNS
from model_package.pyfunc import prepare_request, run_request
from model_package.settings import ModelSettings
from model_package.signature import PARAM_SPECS

# Small limits keep every accepted request cheap on the tiny model.
LIMITS = ModelSettings(
    max_pred_len=10, max_sample_count=3, max_quantiles=4, max_history_candles=40, max_series_per_request=3
)
# The fixtures `candles` (a pure function) and `forecaster` are safe to share between examples;
# the number of examples comes from the profile.
SHARED_FIXTURES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def forecaster(tiny_checkpoints) -> KronosForecaster:
    return KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=32, device="cpu")


# -- strategies -------------------------------------------------------------------------------

ANY_VALUE = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e-300, 1e300, 0.5, 2.0]),
    st.text(max_size=8),
    st.sampled_from(
        [
            "nan",
            "inf",
            "-inf",
            "1e400",
            "5",
            "0.5",
            "2.0",
            "-1",
            "",
            " ",
            "true",
            "false",
            "B",
            "D",
            "5min",
            "h",
            "-1D",
            "0D",
            "1000YE",
            "1000000D",
            "[0.1, 0.9]",
            "0.1,0.9",
            "[[[[",
            "1" * 5000,
            str(2**64),
        ]
    ),
    st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=3), st.none()), max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.none(),
    st.booleans(),
)

GOOD_VALUE = {
    "pred_len": st.integers(1, 3),
    "temperature": st.floats(1e-6, 1e6),
    "top_k": st.integers(0, 2**31 - 1),
    "top_p": st.floats(1e-9, 1.0, exclude_min=True),
    "sample_count": st.integers(1, 3),
    "seed": st.integers(0, 2**64 - 1),
    "quantiles": st.lists(st.floats(0.01, 0.99), max_size=4, unique=True),
    "freq": st.sampled_from([None, "B", "D", "5min", "h", "W-MON", "2262D"]),
    "calendar": st.sampled_from([None, "", "XNYS", "xshg", "24/7", "NYSE", "XMOON"]),
    "strict_candles": st.booleans(),
    "repair_candles": st.booleans(),
}


def _mostly_good(name: str) -> st.SearchStrategy[Any]:
    """A good value 5 times in 6, anything otherwise (so that some requests get accepted)."""
    return st.integers(0, 5).flatmap(lambda i: ANY_VALUE if i == 0 else GOOD_VALUE[name])


KNOWN_PARAMS = st.fixed_dictionaries({}, optional={name: _mostly_good(name) for name in PARAM_SPECS})
# Now and then an unknown name (a typo, a non-string key) or a bare garbage value per name.
PARAMS = st.one_of(
    KNOWN_PARAMS,
    KNOWN_PARAMS,
    KNOWN_PARAMS,
    KNOWN_PARAMS,
    st.tuples(KNOWN_PARAMS, st.sampled_from(["pred_lenn", 7, "", "seed "]), ANY_VALUE).map(
        lambda t: {**t[0], t[1]: t[2]}
    ),
    st.fixed_dictionaries({}, optional={name: ANY_VALUE for name in PARAM_SPECS}),
)

CELL = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0.0, -1.0, 1e15, 1e16, -1e300, 1e-300]),
    st.text(string.printable, max_size=6),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)

TIMESTAMP_CELL = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True),
    st.datetimes(),
    st.text(max_size=12),
    st.sampled_from(["2024-01-01", "2262-04-11 23:50", "NaT", "1500-01-01", "2024-01-01T00:00+01:00", "x"]),
    st.none(),
)


MUTATIONS = (
    "cell",
    "timestamp_cell",
    "swap_rows",
    "duplicate_timestamp",
    "numeric_timestamps",
    "text_timestamps",
    "timezone",
    "drop_column",
    "duplicate_column",
    "series_id_cell",
    "all_nan_column",
    "shuffle",
)


@st.composite
def candle_frames(draw: st.DrawFn) -> pd.DataFrame:
    """A few random-walk series at random scales (up to past the magnitude bound, negative
    too), then a few random mutations."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    parts = []
    for k in range(draw(st.integers(1, 3))):
        start = draw(
            st.sampled_from(
                ["2024-01-02 09:30", "2024-01-01", "2024-01-05", "2262-04-01", "1677-09-22", "2262-04-11 23:00"]
            )
        )
        freq = draw(st.sampled_from(["5min", "h", "D", "B", "17s"]))
        length = draw(st.sampled_from([1, *range(2, 13)]))
        try:
            part = random_walk_candles(length, rng, start=start, freq=freq)
        except (ValueError, OverflowError):  # the generator itself ran past 2262
            part = random_walk_candles(length, rng, start="2024-01-01", freq=freq)
        scale = 10.0 ** draw(st.integers(-6, 17)) / 100 * draw(st.sampled_from([1, 1, 1, 1, 1, -1]))
        for column in ("open", "high", "low", "close"):
            part[column] *= scale
        part.insert(0, "series_id", draw(st.sampled_from([f"S{k}", k, "S0"])))
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True)
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        # a mutation may not apply to this frame (its column dropped, already tz-aware)
        with contextlib.suppress(KeyError, TypeError, ValueError, OverflowError):
            frame = _mutate(frame, mutation, draw)
    return frame


def _mutate(frame: pd.DataFrame, mutation: str, draw: st.DrawFn) -> pd.DataFrame:
    frame = frame.copy()
    row = draw(st.integers(0, len(frame) - 1))
    if mutation == "cell":
        column = draw(st.sampled_from(list(CANDLE_COLUMNS)))
        frame[column] = frame[column].astype(object)
        frame.at[row, column] = draw(CELL)
    elif mutation == "timestamp_cell":
        frame["timestamp"] = frame["timestamp"].astype(object)
        frame.at[row, "timestamp"] = draw(TIMESTAMP_CELL)
    elif mutation == "swap_rows":
        other = draw(st.integers(0, len(frame) - 1))
        frame.iloc[[row, other]] = frame.iloc[[other, row]].to_numpy()
    elif mutation == "duplicate_timestamp" and row > 0:
        frame.at[row, "timestamp"] = frame.at[row - 1, "timestamp"]
    elif mutation == "numeric_timestamps":
        frame["timestamp"] = np.arange(len(frame)) * draw(st.sampled_from([1, 60, 86_400, 10**9, 0.5]))
    elif mutation == "text_timestamps":
        frame["timestamp"] = pd.DatetimeIndex(frame["timestamp"]).strftime(
            draw(st.sampled_from(["%Y-%m-%d %H:%M:%S", "%d/%m/%Y", "%Y%m%d", "%H:%M"]))
        )
    elif mutation == "timezone":
        frame["timestamp"] = pd.DatetimeIndex(frame["timestamp"]).tz_localize("UTC")
    elif mutation == "drop_column":
        frame = frame.drop(columns=draw(st.sampled_from(["series_id", "timestamp", "open", "volume", "amount"])))
    elif mutation == "duplicate_column":
        column = draw(st.sampled_from(list(frame.columns)))
        frame = pd.concat([frame, frame[[column]]], axis=1)
    elif mutation == "series_id_cell" and "series_id" in frame.columns:
        frame["series_id"] = frame["series_id"].astype(object)
        frame.at[row, "series_id"] = draw(
            st.one_of(st.none(), st.booleans(), st.floats(), st.lists(st.integers()), st.text(max_size=3))
        )
    elif mutation == "all_nan_column":
        frame[draw(st.sampled_from(["volume", "amount", "close"]))] = np.nan
    elif mutation == "shuffle":
        frame = frame.sample(frac=1.0, random_state=draw(st.integers(0, 99))).reset_index(drop=True)
    return frame


# -- the property -----------------------------------------------------------------------------


def _note(what: str) -> None:
    """The mix of outcomes, shown by `pytest --hypothesis-show-statistics`."""
    if currently_in_test_context():
        event(what)


def _refuses_or_forecasts_well(forecaster: KronosForecaster, history: object, params: Any) -> bool:
    """True when accepted (and the forecast checked), False when refused cleanly."""
    try:
        request = prepare_request(forecaster, history, params, LIMITS)
    except KronosInputError as exc:
        assert exc.field and exc.rule and len(str(exc)) < 600, exc
        _note(f"refused: {exc.field[:30]}")
        return False
    _note("accepted")
    frame = run_request(forecaster, request)  # a KronosInputError here would be a bug too
    values = frame.drop(columns=[c for c in ("series_id", "timestamp") if c in frame.columns])
    assert np.isfinite(values.to_numpy(dtype=np.float64)).all(), frame
    assert len(frame) == sum(len(s.future) for s in request.series)
    for prepared in request.series:
        future, last = prepared.future, prepared.series.timestamps[-1]
        assert len(future) == request.params.pred_len
        assert future[0] > last and future.is_monotonic_increasing and future.is_unique
    assert list(pd.DatetimeIndex(frame["timestamp"])) == [t for s in request.series for t in s.future]
    return True


@SHARED_FIXTURES
@given(params=PARAMS)
def test_any_params_are_refused_cleanly_or_forecast_finite(forecaster, candles, params):
    history = pd.concat([candles(12, seed=1, series_id="A"), candles(9, seed=2, series_id="B")], ignore_index=True)
    _refuses_or_forecasts_well(forecaster, history, params)


@SHARED_FIXTURES
@given(
    history=candle_frames(),
    pred_len=st.integers(1, 3),
    strict=st.booleans(),
    freq=st.sampled_from([None, None, None, "B", "-1D", "0D", "30D"]),
)
def test_any_candle_frame_is_refused_cleanly_or_forecast_finite(forecaster, history, pred_len, strict, freq):
    params = {"pred_len": pred_len, "top_k": 1, "strict_candles": strict, "freq": freq}
    _refuses_or_forecasts_well(forecaster, history, params)


@pytest.mark.parametrize("history", [None, [], {"close": [1.0]}, "timestamp,open", pd.Series([1.0])])
def test_non_frames_are_refused(forecaster, history):
    assert _refuses_or_forecasts_well(forecaster, history, {}) is False


def test_the_strategies_reach_accepted_requests(forecaster, candles):
    """Guard against a property that only ever sees refusals: plain inputs are accepted."""
    history = pd.concat([candles(12, seed=1, series_id="A"), candles(9, seed=2, series_id="B")], ignore_index=True)
    assert _refuses_or_forecasts_well(forecaster, history, {"pred_len": 2, "seed": 2**64 - 1, "quantiles": [0.1, 0.9]})
