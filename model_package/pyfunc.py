"""The Kronos MLflow pyfunc: artifacts `tokenizer` and `model` in, forecast frames out.

Logged as models-from-code (`model_package/pyfunc_entry.py`, see `log_model.py`). Servers
that batch requests themselves call the two public pieces directly:

    request = prepare_request(model.forecaster, history, params, settings)  # validates
    outputs, stats = generate(forecaster.tokenizer, forecaster.model, request.inputs,
                              forecaster.max_context, forecaster.mode)
    frame = forecaster.finish(request, outputs).frame
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc.model import PythonModel, PythonModelContext

from .errors import KronosInputError
from .forecaster import KronosForecaster, PreparedRequest, SamplingParams
from .frames import SERIES_ID
from .kronos import generate
from .settings import ModelSettings
from .signature import PARAM_SPECS

TOKENIZER_ARTIFACT = "tokenizer"
MODEL_ARTIFACT = "model"
MAX_CONTEXT_KEY = "max_context"  # key of the logged model_config

# Request-level keys that MLServer's V2 protocol may pass along with the params.
TRANSPORT_PARAMS = frozenset({"content_type", "headers"})


# -- params -----------------------------------------------------------------------------------

def _as_int(name: str, value: object) -> int:
    """An integer from int, integral float (5.0) or a decimal string ("5")."""
    if isinstance(value, (bool, np.bool_)):
        raise KronosInputError(name, f"must be an integer, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if math.isfinite(number) and number.is_integer():
                return int(number)
    raise KronosInputError(name, f"must be an integer, got {value!r}")


def _as_float(name: str, value: object) -> float:
    """A float from int, float or a numeric string ("0.9")."""
    if isinstance(value, (bool, np.bool_)):
        raise KronosInputError(name, f"must be a number, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise KronosInputError(name, f"must be a number, got {value!r}")


def _as_float_list(name: str, value: object) -> tuple[float, ...]:
    """A list of floats from a list/array, a JSON list string or "0.1,0.9"."""
    if value is None:
        return ()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return ()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise KronosInputError(name, f"not a JSON list of numbers: {value!r}") from exc
        else:
            value = text.split(",")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise KronosInputError(name, f"must be a list of numbers, got {value!r}")
    return tuple(_as_float(name, item) for item in value)


def _as_optional_str(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise KronosInputError(name, f"must be a string, got {value!r}")
    return value.strip() or None


def sampling_params(params: Mapping[str, Any] | None) -> SamplingParams:
    """Coerce request params to their signature types, fill defaults and validate.

    Accepts what every transport can send: ints as integral floats (5.0) or strings ("5"),
    floats as strings ("0.9"), quantiles as a list, a JSON list or "0.1,0.9"; None or ""
    for `seed`/`freq` means "not given". Unknown names are refused (typos would otherwise
    be silently ignored), except the V2 transport keys `content_type` and `headers`.
    """
    given = {k: v for k, v in (params or {}).items() if k not in TRANSPORT_PARAMS}
    unknown = sorted(set(given) - set(PARAM_SPECS))
    if unknown:
        raise KronosInputError(", ".join(unknown),
                               f"unknown param (known: {', '.join(PARAM_SPECS)})")
    values = {name: default for name, (_, default, _) in PARAM_SPECS.items()}
    values.update({k: v for k, v in given.items() if v is not None})
    seed = values["seed"]
    if isinstance(seed, str) and not seed.strip():
        seed = None
    return SamplingParams(
        pred_len=_as_int("pred_len", values["pred_len"]),
        temperature=_as_float("temperature", values["temperature"]),
        top_k=_as_int("top_k", values["top_k"]),
        top_p=_as_float("top_p", values["top_p"]),
        sample_count=_as_int("sample_count", values["sample_count"]),
        seed=None if seed is None else _as_int("seed", seed),
        quantiles=_as_float_list("quantiles", values["quantiles"]),
        freq=_as_optional_str("freq", values["freq"]),
    )


# -- limits -----------------------------------------------------------------------------------

def _over(field: str, limit_name: str, limit: int, value: int, series: object | None = None
          ) -> KronosInputError:
    return KronosInputError(field, f"must be <= {limit} ({limit_name}), got {value}", series)


def check_limits(forecaster: KronosForecaster, history: pd.DataFrame, params: SamplingParams,
                 settings: ModelSettings) -> None:
    """Refuse requests over the configured limits (cheap: counts rows, builds nothing)."""
    max_pred_len = min(settings.max_pred_len, forecaster.max_context)
    if params.pred_len > max_pred_len:
        name = "max_pred_len" if max_pred_len == settings.max_pred_len else "model max_context"
        raise _over("pred_len", name, max_pred_len, params.pred_len)
    if params.sample_count > settings.max_sample_count:
        raise _over("sample_count", "max_sample_count", settings.max_sample_count,
                    params.sample_count)
    if len(params.quantiles) > settings.max_quantiles:
        raise _over("quantiles", "max_quantiles", settings.max_quantiles, len(params.quantiles))
    if not isinstance(history, pd.DataFrame):
        raise KronosInputError("history", f"must be a pandas DataFrame, got {type(history).__name__}")
    if SERIES_ID in history.columns:
        sizes = history.groupby(SERIES_ID, sort=False, dropna=True).size()
    else:
        sizes = pd.Series([len(history)], index=[None])
    if len(sizes) > settings.max_series_per_request:
        raise _over(SERIES_ID, "max_series_per_request", settings.max_series_per_request,
                    len(sizes))
    if len(sizes) and sizes.max() > settings.max_history_candles:
        label = sizes.idxmax()
        raise _over("history", "max_history_candles", settings.max_history_candles,
                    int(sizes.max()), label if label is not None else "<single>")


def prepare_request(forecaster: KronosForecaster, model_input: pd.DataFrame,
                    params: Mapping[str, Any] | None, settings: ModelSettings) -> PreparedRequest:
    """Validate one request (params, limits, candles) and build its generation inputs.

    Raises KronosInputError naming the series, the field and the rule.
    """
    sampling = sampling_params(params)
    check_limits(forecaster, model_input, sampling, settings)
    return forecaster.prepare(model_input, sampling)


def run_request(forecaster: KronosForecaster, request: PreparedRequest) -> pd.DataFrame:
    """Generate one prepared request and return its forecast frame."""
    outputs, forecaster.last_stats = generate(forecaster.tokenizer, forecaster.model,
                                              request.inputs, forecaster.max_context,
                                              forecaster.mode)
    return forecaster.finish(request, outputs).frame


def invalid_input(exc: KronosInputError) -> MlflowException:
    """The MlflowException that `mlflow models serve` turns into HTTP 400."""
    return MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE)


# -- the pyfunc -------------------------------------------------------------------------------

class KronosPyfuncModel(PythonModel):
    """MLflow pyfunc around a KronosForecaster built from the logged checkpoint artifacts."""

    forecaster: KronosForecaster
    settings: ModelSettings

    def load_context(self, context: PythonModelContext) -> None:
        """Load tokenizer and model from the artifacts; settings from KRONOS_* variables."""
        self.settings = ModelSettings()
        max_context = (context.model_config or {}).get(MAX_CONTEXT_KEY)
        self.forecaster = KronosForecaster.from_pretrained(
            tokenizer=context.artifacts[TOKENIZER_ARTIFACT],
            model=context.artifacts[MODEL_ARTIFACT],
            max_context=int(max_context) if max_context is not None else None,
            device=self.settings.device, mode=self.settings.generation_mode)

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Forecast every series of `model_input` (long format) with the sampling params."""
        try:
            request = prepare_request(self.forecaster, model_input, params, self.settings)
        except KronosInputError as exc:
            raise invalid_input(exc) from exc
        return run_request(self.forecaster, request)
