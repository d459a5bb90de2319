"""The Kronos MLflow pyfunc: artifacts `tokenizer` and `model` in, forecast frames out.

Logged as models-from-code (`model_package/pyfunc_entry.py`, see `log_model.py`). A server
that batches requests itself (the MLServer runtime) unwraps the python model and uses its
`forecaster` and `settings` with the validation half of `predict`:

    request = prepare_request(model.forecaster, history, params, settings)  # validates, prices
    cost = prepared_cost(model.forecaster, request)   # what its batcher budgets with

then generates many prepared requests together (`serving/cohort.py`) and turns each one's
outputs into its frame with `forecaster.finish(request, outputs)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc.model import PythonModel, PythonModelContext

from .budget import check_request_budget, request_cost
from .errors import KronosInputError, brief, cut
from .forecaster import ANSWER_ATTR, KronosForecaster, PreparedRequest, SamplingParams
from .frames import SERIES_ID, check_frame
from .kronos import generate
from .settings import ModelSettings
from .signature import PARAM_SPECS

TOKENIZER_ARTIFACT = "tokenizer"
MODEL_ARTIFACT = "model"
MAX_CONTEXT_KEY = "max_context"  # key of the logged model_config
DTYPE_VARIABLE = "KRONOS_DTYPE"  # ModelSettings.dtype, named in load errors

# Request-level keys that MLServer's V2 protocol may pass along with the params.
TRANSPORT_PARAMS = frozenset({"content_type", "headers"})


# -- params -----------------------------------------------------------------------------------
# Coercion from what the transports send to the types of SamplingParams, which then checks
# the ranges (see its field comments and the README's params table).

EXACT_FLOAT_INT = 2**53  # integral floats above this are not exact integers


def _as_int(name: str, value: object) -> int:
    """An integer from int, integral float (5.0, at most 2**53) or a decimal string ("5")."""
    if isinstance(value, (bool, np.bool_)):
        raise KronosInputError(name, f"must be an integer, got {brief(value)}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:  # also for more than 4300 digits (Python's limit)
            try:
                value = float(text)
            except ValueError:
                raise KronosInputError(name, f"must be an integer, got {brief(value)}") from None
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        if abs(float(value)) > EXACT_FLOAT_INT:
            raise KronosInputError(name, f"must be an integer; a float above 2**53 is not exact, got {brief(value)}")
        return int(value)
    raise KronosInputError(name, f"must be an integer, got {brief(value)}")


def _as_float(name: str, value: object) -> float:
    """A float from int, float or a numeric string ("0.9"); finiteness is checked later."""
    if isinstance(value, (bool, np.bool_)):
        raise KronosInputError(name, f"must be a number, got {brief(value)}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        try:
            return float(value)
        except OverflowError:  # an int beyond float range
            raise KronosInputError(name, f"must be a finite number, got {brief(value)}") from None
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise KronosInputError(name, f"must be a number, got {brief(value)}")


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
            except (ValueError, RecursionError) as exc:
                raise KronosInputError(name, f"not a JSON list of numbers: {brief(value)}") from exc
        else:
            value = text.split(",")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise KronosInputError(name, f"must be a list of numbers, got {brief(value)}")
    return tuple(_as_float(name, item) for item in value)


def _as_optional_str(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise KronosInputError(name, f"must be a string, got {brief(value)}")
    return value.strip() or None


_TRUE, _FALSE = frozenset({"true", "1"}), frozenset({"false", "0"})


def _as_bool(name: str, value: object) -> bool:
    """A boolean from bool, 0/1 or the strings "true"/"false"/"1"/"0" (any case)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise KronosInputError(name, f"must be true or false, got {brief(value)}")


def sampling_params(params: Mapping[str, Any] | None) -> SamplingParams:
    """Coerce request params to their signature types, fill defaults and validate.

    Accepts what every transport can send: ints as integral floats (5.0) or strings ("5"),
    floats as strings ("0.9"), quantiles as a list, a JSON list or "0.1,0.9", booleans as
    "true"/"false"; None or "" for `seed`/`freq`/`calendar` means "not given". Unknown names are
    refused (typos would otherwise be silently ignored), except the V2 transport keys
    `content_type` and `headers`. Defaults: `SamplingParams`.
    """
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise KronosInputError("params", f"must be an object of name -> value, got {type(params).__name__}")
    given = {k: v for k, v in params.items() if k not in TRANSPORT_PARAMS}
    unknown = sorted(
        k if isinstance(k, str) and k.isidentifier() else brief(k)  # '' and 'seed ' visible
        for k in given
        if k not in PARAM_SPECS
    )
    if unknown:
        raise KronosInputError(cut(", ".join(unknown), 120), f"unknown param (known: {', '.join(PARAM_SPECS)})")
    values = {k: v for k, v in given.items() if v is not None}
    seed = values.get("seed")
    if isinstance(seed, str) and not seed.strip():
        seed = None
    coerced: dict[str, Any] = {}
    for name in ("pred_len", "top_k", "sample_count"):
        if name in values:
            coerced[name] = _as_int(name, values[name])
    for name in ("temperature", "top_p"):
        if name in values:
            coerced[name] = _as_float(name, values[name])
    if seed is not None:
        coerced["seed"] = _as_int("seed", seed)
    if "quantiles" in values:
        coerced["quantiles"] = _as_float_list("quantiles", values["quantiles"])
    for name in ("freq", "calendar"):
        if name in values:
            coerced[name] = _as_optional_str(name, values[name])
    for name in ("strict_candles", "repair_candles"):
        if name in values:
            coerced[name] = _as_bool(name, values[name])
    return SamplingParams(**coerced)  # fills the defaults, checks the ranges


# -- limits -----------------------------------------------------------------------------------


def _over(field: str, limit_name: str, limit: int, value: int, series: object | None = None) -> KronosInputError:
    return KronosInputError(field, f"must be <= {limit} ({limit_name}), got {value}", series)


def check_limits(
    forecaster: KronosForecaster, history: pd.DataFrame, params: SamplingParams, settings: ModelSettings
) -> None:
    """Refuse requests over the configured limits and the per-request budget (cheap: counts
    rows, builds nothing)."""
    max_pred_len = min(settings.max_pred_len, forecaster.max_context)
    if params.pred_len > max_pred_len:
        name = "max_pred_len" if max_pred_len == settings.max_pred_len else "model max_context"
        raise _over("pred_len", name, max_pred_len, params.pred_len)
    if params.sample_count > settings.max_sample_count:
        raise _over("sample_count", "max_sample_count", settings.max_sample_count, params.sample_count)
    if len(params.quantiles) > settings.max_quantiles:
        raise _over("quantiles", "max_quantiles", settings.max_quantiles, len(params.quantiles))
    check_frame(history)  # type, columns and series ids, so that counting them is safe
    if SERIES_ID in history.columns:
        sizes = history.groupby(SERIES_ID, sort=False, dropna=True).size()
    else:
        sizes = pd.Series([len(history)], index=[None])
    if len(sizes) > settings.max_series_per_request:
        raise _over(SERIES_ID, "max_series_per_request", settings.max_series_per_request, len(sizes))
    if len(sizes) and sizes.max() > settings.max_history_candles:
        label = sizes.idxmax()
        raise _over(
            "history",
            "max_history_candles",
            settings.max_history_candles,
            int(sizes.max()),
            label if label is not None else "<single>",
        )
    cost = request_cost(forecaster, [int(n) for n in sizes], params.pred_len, params.sample_count, len(history))
    check_request_budget(cost, settings)


def prepare_request(
    forecaster: KronosForecaster, model_input: pd.DataFrame, params: Mapping[str, Any] | None, settings: ModelSettings
) -> PreparedRequest:
    """Validate one request (params, limits, candles) and build its generation inputs.

    Raises KronosInputError naming the series, the field and the rule.
    """
    sampling = sampling_params(params)
    check_limits(forecaster, model_input, sampling, settings)
    return forecaster.prepare(model_input, sampling)


def run_request(forecaster: KronosForecaster, request: PreparedRequest) -> pd.DataFrame:
    """Generate one prepared request and return its forecast frame."""
    outputs, forecaster.last_stats = generate(
        forecaster.tokenizer, forecaster.model, request.inputs, forecaster.max_context, forecaster.mode
    )
    return forecaster.finish(request, outputs).frame


def invalid_input(exc: KronosInputError) -> MlflowException:
    """The MlflowException that `mlflow models serve` turns into HTTP 400."""
    return MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE)


# -- the pyfunc -------------------------------------------------------------------------------


class KronosPyfuncModel(PythonModel):
    """MLflow pyfunc around a KronosForecaster built from the logged checkpoint artifacts."""

    forecaster: KronosForecaster
    settings: ModelSettings
    identity: dict[str, str]  # the logged model's model_id and run_id (from its MLmodel file)

    def load_context(self, context: PythonModelContext) -> None:
        """Load tokenizer and model from the artifacts; settings from KRONOS_* variables.

        A precision the device cannot run (`KRONOS_DTYPE=float16` on cpu, `int8` on cuda)
        raises ValueError naming KRONOS_DTYPE before the weights are read."""
        self.settings = ModelSettings()
        self.identity = model_identity(Path(context.artifacts[MODEL_ARTIFACT]))
        max_context = (context.model_config or {}).get(MAX_CONTEXT_KEY)
        self.forecaster = KronosForecaster.from_pretrained(
            tokenizer=context.artifacts[TOKENIZER_ARTIFACT],
            model=context.artifacts[MODEL_ARTIFACT],
            max_context=int(max_context) if max_context is not None else None,
            device=self.settings.device,
            mode=self.settings.generation_mode,
            dtype=self.settings.dtype,
            dtype_name=DTYPE_VARIABLE,
        )

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Forecast every series of `model_input` (long format) with the sampling params."""
        try:
            request = prepare_request(self.forecaster, model_input, params, self.settings)
            forecast = run_request(self.forecaster, request)
        except KronosInputError as exc:
            raise invalid_input(exc) from exc
        forecast.attrs[ANSWER_ATTR].update(getattr(self, "identity", {}))
        return forecast


def model_identity(model_artifact: Path) -> dict[str, str]:
    """`model_id` and `run_id` of the logged model whose `model` artifact is at
    `model_artifact` (`<model>/artifacts/model`; its MLmodel file is two levels up); empty
    when there is none (a model folder assembled by hand)."""
    mlmodel = model_artifact.resolve().parent.parent / "MLmodel"
    if not mlmodel.is_file():
        return {}
    from mlflow.models import Model

    logged = Model.load(str(mlmodel))
    found = {"model_id": logged.model_id, "run_id": logged.run_id}
    return {key: str(value) for key, value in found.items() if value}
