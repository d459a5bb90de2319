"""prepare_request: param coercion (what REST and gRPC clients can send), defaults, limits
and the MlflowException the pyfunc raises for bad input (real forecaster, tiny weights)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from model_package import KronosForecaster, KronosInputError, SamplingParams
from model_package.pyfunc import KronosPyfuncModel, prepare_request, run_request, sampling_params
from model_package.settings import ModelSettings
from model_package.signature import DEFAULT_PRED_LEN, PARAM_SPECS

MAX_CONTEXT = 64


@pytest.fixture(scope="module")
def forecaster(tiny_checkpoints) -> KronosForecaster:
    tokenizer_dir, model_dir = tiny_checkpoints
    return KronosForecaster.from_pretrained(tokenizer_dir, model_dir, max_context=MAX_CONTEXT, device="cpu")


@pytest.fixture
def history(candles) -> pd.DataFrame:
    return pd.concat([candles(40, seed=1, series_id="A"), candles(30, seed=2, series_id="B")], ignore_index=True)


def test_defaults_when_no_params():
    params = sampling_params(None)
    assert (params.pred_len, params.temperature, params.top_k, params.top_p) == (DEFAULT_PRED_LEN, 1.0, 0, 0.9)
    assert (params.sample_count, params.seed, params.quantiles, params.freq) == (1, None, (), None)
    assert params.strict_candles is True
    assert params == SamplingParams() == sampling_params({})


def test_signature_defaults_are_the_sampling_params_defaults():
    """One source of truth: PARAM_SPECS is derived from SamplingParams' fields."""
    fields = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    assert list(PARAM_SPECS) == list(fields)
    for name, (_, default, shape) in PARAM_SPECS.items():
        assert default == (list(fields[name]) if shape else fields[name]), name
    assert fields["pred_len"] == DEFAULT_PRED_LEN


def test_transport_types_are_coerced():
    params = sampling_params(
        {
            "pred_len": 5.0,
            "temperature": "0.7",
            "top_k": "3",
            "top_p": 1,
            "sample_count": np.int64(4),
            "seed": "42",
            "quantiles": "0.1, 0.9",
            "freq": "B",
            "content_type": "pd",
        }
    )
    assert (params.pred_len, params.temperature, params.top_k, params.top_p) == (5, 0.7, 3, 1.0)
    assert (params.sample_count, params.seed, params.quantiles, params.freq) == (4, 42, (0.1, 0.9), "B")
    assert isinstance(params.pred_len, int) and isinstance(params.temperature, float)
    assert sampling_params({"quantiles": "[0.25, 0.75]"}).quantiles == (0.25, 0.75)
    assert sampling_params({"quantiles": np.array([0.5])}).quantiles == (0.5,)
    assert sampling_params({"seed": "", "freq": ""}).seed is None
    assert sampling_params({"seed": None, "freq": None}).freq is None
    assert sampling_params({"seed": str(2**64 - 1)}).seed == 2**64 - 1
    assert sampling_params({"seed": 2**64 - 1}).seed == 2**64 - 1
    assert sampling_params({"top_k": "2147483647"}).top_k == 2**31 - 1
    for value, expected in ((False, False), ("false", False), ("TRUE", True), ("0", False), (1, True)):
        assert sampling_params({"strict_candles": value}).strict_candles is expected
        assert sampling_params({"repair_candles": value}).repair_candles is expected
    assert sampling_params({}).repair_candles is False


@pytest.mark.parametrize(
    ("params", "field", "rule"),
    [
        ({"pred_len": 2.5}, "pred_len", "must be an integer"),
        ({"pred_len": "ten"}, "pred_len", "must be an integer"),
        ({"pred_len": True}, "pred_len", "must be an integer"),
        ({"pred_len": 0}, "pred_len", "must be >= 1"),
        ({"temperature": "hot"}, "temperature", "must be a number"),
        ({"temperature": 0}, "temperature", "must be in [1e-06, 1e+06]"),
        ({"temperature": "nan"}, "temperature", "must be a finite number"),
        ({"temperature": "inf"}, "temperature", "must be a finite number"),
        ({"temperature": "-Infinity"}, "temperature", "must be a finite number"),
        ({"temperature": 10**400}, "temperature", "must be a finite number"),
        ({"temperature": [1.0]}, "temperature", "must be a number"),
        ({"top_p": "nan"}, "top_p", "must be a finite number"),
        ({"pred_len": 2**63}, "pred_len", "must be <= 2147483647"),
        ({"pred_len": "1" * 5000}, "pred_len", "must be an integer"),
        ({"pred_len": 1e300}, "pred_len", "not exact"),
        ({"pred_len": "nan"}, "pred_len", "must be an integer"),
        ({"top_k": 2**63}, "top_k", "must be <= 2147483647"),
        ({"top_k": -(2**70)}, "top_k", "must be >= 0"),
        ({"sample_count": 0}, "sample_count", "must be >= 1"),
        ({"seed": 2**64}, "seed", "must be <= 18446744073709551615"),
        ({"seed": str(2**64)}, "seed", "must be <= 18446744073709551615"),
        ({"seed": -1}, "seed", "must be >= 0"),
        ({"seed": 1.8446744073709552e19}, "seed", "not exact"),
        ({"seed": [1]}, "seed", "must be an integer"),
        ({"quantiles": "nan"}, "quantiles", "must be a finite number"),
        ({"quantiles": [0.5, 0.5]}, "quantiles", "levels must be distinct"),
        ({"quantiles": {"a": 1}}, "quantiles", "must be a list of numbers"),
        ({"quantiles": "[" * 100000}, "quantiles", "not a JSON list"),
        ({"freq": 5}, "freq", "must be a string"),
        ({"strict_candles": "maybe"}, "strict_candles", "must be true or false"),
        ({"strict_candles": 2}, "strict_candles", "must be true or false"),
        ({"repair_candles": "yes please"}, "repair_candles", "must be true or false"),
        ({"top_p": "1.5"}, "top_p", "must be in (0, 1]"),
        ({"quantiles": "0.1,x"}, "quantiles", "must be a number"),
        ({"quantiles": [1.5]}, "quantiles", "must be in (0, 1)"),
        ({"quantiles": "[0.1"}, "quantiles", "not a JSON list"),
        ({"pred_lenn": 3}, "pred_lenn", "unknown param"),
    ],
)
def test_bad_params_name_field_and_rule(params, field, rule):
    with pytest.raises(KronosInputError) as info:
        sampling_params(params)
    assert info.value.field == field
    assert rule in info.value.rule
    assert len(str(info.value)) < 300  # a huge value is not echoed back whole


@pytest.mark.parametrize("params", [["pred_len", 3], "pred_len=3", 7])
def test_params_must_be_a_mapping(params):
    with pytest.raises(KronosInputError) as info:
        sampling_params(params)
    assert info.value.field == "params"


def test_unknown_param_names_of_any_type_are_refused():
    with pytest.raises(KronosInputError, match="unknown param"):
        sampling_params({1: 2, "x" * 10_000: 3})


@pytest.mark.parametrize(
    ("settings", "params", "message"),
    [
        (ModelSettings(max_pred_len=8), {"pred_len": 9}, "pred_len: must be <= 8 (max_pred_len), got 9"),
        (
            ModelSettings(),
            {"pred_len": MAX_CONTEXT + 1},
            f"pred_len: must be <= {MAX_CONTEXT} (model max_context), got {MAX_CONTEXT + 1}",
        ),
        (
            ModelSettings(max_sample_count=4),
            {"sample_count": 5},
            "sample_count: must be <= 4 (max_sample_count), got 5",
        ),
        (ModelSettings(max_series_per_request=1), {}, "series_id: must be <= 1 (max_series_per_request), got 2"),
        (ModelSettings(max_history_candles=35), {}, "series 'A', history: must be <= 35 (max_history_candles), got 40"),
        (ModelSettings(max_quantiles=1), {"quantiles": [0.1, 0.9]}, "quantiles: must be <= 1 (max_quantiles), got 2"),
        (
            ModelSettings(),
            {"quantiles": [i / 100 for i in range(1, 34)]},
            "quantiles: must be <= 32 (max_quantiles), got 33",
        ),
    ],
)
def test_limits_name_field_limit_and_value(forecaster, history, settings, params, message):
    with pytest.raises(KronosInputError) as info:
        prepare_request(forecaster, history, params, settings)
    assert str(info.value) == message


def test_settings_come_from_kronos_environment(monkeypatch):
    monkeypatch.setenv("KRONOS_MAX_PRED_LEN", "7")
    monkeypatch.setenv("KRONOS_DEVICE", "cpu")
    settings = ModelSettings()
    assert (settings.max_pred_len, settings.device, settings.generation_mode) == (7, "cpu", "fast")


def test_integer_prices_are_accepted(forecaster, history):
    columns = ("open", "high", "low", "close", "volume", "amount")
    as_ints = history.astype({c: np.int64 for c in columns})
    params = {"pred_len": 3, "top_k": 1}
    got = run_request(forecaster, prepare_request(forecaster, as_ints, params, ModelSettings()))
    want = forecaster.predict(as_ints.astype({c: np.float64 for c in columns}), 3, top_k=1)
    pd.testing.assert_frame_equal(got, want)
    assert list(got["series_id"].unique()) == ["A", "B"] and len(got) == 6


def test_prepared_request_matches_forecaster(forecaster, history):
    params = {"pred_len": "4", "top_k": 1.0, "quantiles": "0.5"}
    got = run_request(forecaster, prepare_request(forecaster, history, params, ModelSettings()))
    want = forecaster.predict(history, 4, top_k=1, quantiles=[0.5])
    pd.testing.assert_frame_equal(got, want)
    assert "close_q0.5" in got.columns


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda df: df.drop(columns="close"), "close: required column missing"),
        (lambda df: df.assign(open=df["open"].where(df.index != 3)), "series 'A', open: must not contain NaN"),
        (lambda df: df.iloc[::-1].reset_index(drop=True), "timestamp: must be strictly increasing"),
        (lambda df: df.assign(close=-df["close"]), "series 'A', close: must be > 0 (strict_candles), got -"),
        (lambda df: df.assign(close=1e300), "close: magnitude must be <= 1e+15"),
        (lambda df: df.assign(timestamp=range(len(df))), "timestamp: must hold datetimes or date/time strings"),
        (lambda df: df.assign(series_id=[["A"]] * len(df)), "series_id: must be strings or integers"),
        (lambda df: pd.concat([df, df[["open"]]], axis=1), "open: column given more than once"),
    ],
)
def test_pyfunc_predict_turns_input_errors_into_invalid_parameter(forecaster, history, mutate, needle):
    model = KronosPyfuncModel()
    model.forecaster, model.settings = forecaster, ModelSettings()
    with pytest.raises(MlflowException) as info:
        model.predict(None, mutate(history), {"pred_len": 2})
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    assert needle in info.value.message


def test_pyfunc_strict_candles_opt_out(forecaster, history):
    model = KronosPyfuncModel()
    model.forecaster, model.settings = forecaster, ModelSettings()
    spread = history.assign(**{c: history[c] - 100.0 for c in ("open", "high", "low", "close")})
    with pytest.raises(MlflowException, match="strict_candles"):
        model.predict(None, spread, {"pred_len": 2, "top_k": 1})
    out = model.predict(None, spread, {"pred_len": 2, "top_k": 1, "strict_candles": False})
    assert np.isfinite(out[["open", "high", "low", "close"]].to_numpy()).all() and len(out) == 4


def test_pyfunc_repair_candles_gives_well_formed_bars(forecaster, history):
    """The optional post-processing: every sampled path is repaired before the mean and the
    quantiles, so all of them are well-formed bars; without it the raw forecast is returned."""
    model = KronosPyfuncModel()
    model.forecaster, model.settings = forecaster, ModelSettings()
    params = {"pred_len": 6, "sample_count": 4, "seed": 3, "quantiles": [0.1, 0.9]}
    raw = model.predict(None, history, params)
    repaired = model.predict(None, history, {**params, "repair_candles": True})
    for suffix in ("", "_q0.1", "_q0.9"):
        o, h, lo, c = (repaired[f"{name}{suffix}"] for name in ("open", "high", "low", "close"))
        assert (h >= np.maximum(o, c)).all() and (lo <= np.minimum(o, c)).all()
        assert (repaired[f"volume{suffix}"] >= 0).all() and (repaired[f"amount{suffix}"] >= 0).all()
    # open and close are never moved; high, low, volume only ever move outwards
    assert np.allclose(raw[["open", "close"]], repaired[["open", "close"]])
    assert (repaired["high"] >= raw["high"] - 1e-9).all() and (repaired["low"] <= raw["low"] + 1e-9).all()
