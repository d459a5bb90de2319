"""prepare_request: param coercion (what REST and gRPC clients can send), defaults, limits
and the MlflowException the pyfunc raises for bad input (real forecaster, tiny weights)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from model_package import KronosForecaster, KronosInputError
from model_package.pyfunc import KronosPyfuncModel, prepare_request, run_request, sampling_params
from model_package.settings import ModelSettings
from model_package.signature import DEFAULT_PRED_LEN

MAX_CONTEXT = 64


@pytest.fixture(scope="module")
def forecaster(tiny_checkpoints) -> KronosForecaster:
    tokenizer_dir, model_dir = tiny_checkpoints
    return KronosForecaster.from_pretrained(tokenizer_dir, model_dir, max_context=MAX_CONTEXT,
                                            device="cpu")


@pytest.fixture
def history(candles) -> pd.DataFrame:
    return pd.concat([candles(40, seed=1, series_id="A"), candles(30, seed=2, series_id="B")],
                     ignore_index=True)


def test_defaults_when_no_params():
    params = sampling_params(None)
    assert (params.pred_len, params.temperature, params.top_k, params.top_p) == (
        DEFAULT_PRED_LEN, 1.0, 0, 0.9)
    assert (params.sample_count, params.seed, params.quantiles, params.freq) == (1, None, (), None)


def test_transport_types_are_coerced():
    params = sampling_params({"pred_len": 5.0, "temperature": "0.7", "top_k": "3",
                              "top_p": 1, "sample_count": np.int64(4), "seed": "42",
                              "quantiles": "0.1, 0.9", "freq": "B", "content_type": "pd"})
    assert (params.pred_len, params.temperature, params.top_k, params.top_p) == (5, 0.7, 3, 1.0)
    assert (params.sample_count, params.seed, params.quantiles, params.freq) == (
        4, 42, (0.1, 0.9), "B")
    assert isinstance(params.pred_len, int) and isinstance(params.temperature, float)
    assert sampling_params({"quantiles": "[0.25, 0.75]"}).quantiles == (0.25, 0.75)
    assert sampling_params({"quantiles": np.array([0.5])}).quantiles == (0.5,)
    assert sampling_params({"seed": "", "freq": ""}).seed is None
    assert sampling_params({"seed": None, "freq": None}).freq is None


@pytest.mark.parametrize(("params", "field", "rule"), [
    ({"pred_len": 2.5}, "pred_len", "must be an integer"),
    ({"pred_len": "ten"}, "pred_len", "must be an integer"),
    ({"pred_len": True}, "pred_len", "must be an integer"),
    ({"pred_len": 0}, "pred_len", "must be >= 1"),
    ({"temperature": "hot"}, "temperature", "must be a number"),
    ({"temperature": 0}, "temperature", "finite number > 0"),
    ({"top_p": "1.5"}, "top_p", "must be in (0, 1]"),
    ({"quantiles": "0.1,x"}, "quantiles", "must be a number"),
    ({"quantiles": [1.5]}, "quantiles", "must be in (0, 1)"),
    ({"quantiles": "[0.1"}, "quantiles", "not a JSON list"),
    ({"pred_lenn": 3}, "pred_lenn", "unknown param"),
])
def test_bad_params_name_field_and_rule(params, field, rule):
    with pytest.raises(KronosInputError) as info:
        sampling_params(params)
    assert info.value.field == field
    assert rule in info.value.rule


@pytest.mark.parametrize(("settings", "params", "message"), [
    (ModelSettings(max_pred_len=8), {"pred_len": 9}, "pred_len: must be <= 8 (max_pred_len), got 9"),
    (ModelSettings(), {"pred_len": MAX_CONTEXT + 1},
     f"pred_len: must be <= {MAX_CONTEXT} (model max_context), got {MAX_CONTEXT + 1}"),
    (ModelSettings(max_sample_count=4), {"sample_count": 5},
     "sample_count: must be <= 4 (max_sample_count), got 5"),
    (ModelSettings(max_series_per_request=1), {},
     "series_id: must be <= 1 (max_series_per_request), got 2"),
    (ModelSettings(max_history_candles=35), {},
     "series 'A', history: must be <= 35 (max_history_candles), got 40"),
    (ModelSettings(max_quantiles=1), {"quantiles": [0.1, 0.9]},
     "quantiles: must be <= 1 (max_quantiles), got 2"),
])
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


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda df: df.drop(columns="close"), "close: required column missing"),
    (lambda df: df.assign(open=df["open"].where(df.index != 3)), "series 'A', open: must not contain NaN"),
    (lambda df: df.iloc[::-1].reset_index(drop=True), "timestamp: must be strictly increasing"),
])
def test_pyfunc_predict_turns_input_errors_into_invalid_parameter(forecaster, history, mutate,
                                                                 needle):
    model = KronosPyfuncModel()
    model.forecaster, model.settings = forecaster, ModelSettings()
    with pytest.raises(MlflowException) as info:
        model.predict(None, mutate(history), {"pred_len": 2})
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    assert needle in info.value.message
