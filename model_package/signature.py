"""The explicit MLflow signature of the Kronos pyfunc, its params and an input example.

Input (long format, one row per candle): `series_id` string (optional), `timestamp`
datetime (timezone-naive), `open`/`high`/`low`/`close` double, `volume`/`amount` double
(optional).

Output: `series_id` (when the input has it), `timestamp`, and the six candle columns as
doubles (mean over the sampled paths). When the `quantiles` param is given, one extra
double column `{column}_q{level}` per candle column and level follows (e.g. `close_q0.1`);
these are not in the output schema because their names depend on the request.

Params (all optional): see `PARAM_SPECS`, derived from `SamplingParams` (its fields, their
types and defaults: one source of truth). `seed` and `freq` default to None, meaning
"fresh randomness" and "infer the spacing from each series".
"""

from __future__ import annotations

import dataclasses
from typing import cast

import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import DataType
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from .forecaster import DEFAULT_PRED_LEN, SamplingParams
from .frames import AMOUNT, CANDLE_COLUMNS, PRICE_COLUMNS, SERIES_ID, TIMESTAMP, VOLUME

__all__ = ["DEFAULT_PRED_LEN", "PARAM_SPECS", "input_example", "kronos_signature"]

# SamplingParams field annotation -> (MLflow type, shape); shape (-1,) marks a list param.
_MLFLOW_TYPES: dict[str, tuple[DataType, tuple[int, ...] | None]] = {
    "int": (DataType.long, None),
    "int | None": (DataType.long, None),
    "float": (DataType.double, None),
    "bool": (DataType.boolean, None),
    "str | None": (DataType.string, None),
    "tuple[float, ...]": (DataType.double, (-1,)),
}


def _param_specs() -> dict[str, tuple[DataType, object, tuple[int, ...] | None]]:
    specs = {}
    for item in dataclasses.fields(SamplingParams):
        dtype, shape = _MLFLOW_TYPES[str(item.type)]
        default: object = item.default
        if shape is not None:
            default = list(cast(tuple, item.default))  # MLflow wants a list
        specs[item.name] = (dtype, default, shape)
    return specs


# name -> (type, default, shape), in SamplingParams' field order (meanings: its comments).
PARAM_SPECS: dict[str, tuple[DataType, object, tuple[int, ...] | None]] = _param_specs()


def input_schema() -> Schema:
    """The candle columns a request carries."""
    return Schema(
        [
            ColSpec(DataType.string, SERIES_ID, required=False),
            ColSpec(DataType.datetime, TIMESTAMP),
            *[ColSpec(DataType.double, name) for name in PRICE_COLUMNS],
            ColSpec(DataType.double, VOLUME, required=False),
            ColSpec(DataType.double, AMOUNT, required=False),
        ]
    )


def output_schema() -> Schema:
    """The fixed forecast columns (quantile columns come on top, see the module doc)."""
    return Schema(
        [
            ColSpec(DataType.string, SERIES_ID, required=False),
            ColSpec(DataType.datetime, TIMESTAMP),
            *[ColSpec(DataType.double, name) for name in CANDLE_COLUMNS],
        ]
    )


def param_schema() -> ParamSchema:
    """The sampling params with their types and defaults."""
    return ParamSchema(
        [ParamSpec(name, dtype, default, shape) for name, (dtype, default, shape) in PARAM_SPECS.items()]
    )


def kronos_signature() -> ModelSignature:
    """The model signature: input, output and params schemas."""
    return ModelSignature(inputs=input_schema(), outputs=output_schema(), params=param_schema())


def input_example(last: int = 64) -> tuple[pd.DataFrame, dict[str, object]]:
    """The last `last` daily S&P 500 candles (from `arch`) and example params."""
    from .data import load_index

    history = load_index("SP500", last=last)
    return history, {"pred_len": 5, "sample_count": 4, "seed": 7, "quantiles": [0.1, 0.9]}
