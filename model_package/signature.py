"""The explicit MLflow signature of the Kronos pyfunc, its params and an input example.

Input (long format, one row per candle): `series_id` string (optional), `timestamp`
datetime (timezone-naive), `open`/`high`/`low`/`close` double, `volume`/`amount` double
(optional).

Output: `series_id` (when the input has it), `timestamp`, and the six candle columns as
doubles (mean over the sampled paths). When the `quantiles` param is given, one extra
double column `{column}_q{level}` per candle column and level follows (e.g. `close_q0.1`);
these are not in the output schema because their names depend on the request.

Params (all optional): see `PARAM_SPECS`. `seed` and `freq` default to None, meaning
"fresh randomness" and "infer the spacing from each series".
"""

from __future__ import annotations

import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import DataType
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from .frames import AMOUNT, CANDLE_COLUMNS, PRICE_COLUMNS, SERIES_ID, TIMESTAMP, VOLUME

DEFAULT_PRED_LEN = 10

# name -> (type, default, shape); shape (-1,) marks a list param.
PARAM_SPECS: dict[str, tuple[DataType, object, tuple[int, ...] | None]] = {
    "pred_len": (DataType.long, DEFAULT_PRED_LEN, None),  # forecast steps per series
    "temperature": (DataType.double, 1.0, None),  # > 0; logits are divided by it
    "top_k": (DataType.long, 0, None),  # 0 = off; 1 = greedy
    "top_p": (DataType.double, 0.9, None),  # nucleus mass in (0, 1]; ignored when top_k > 0
    "sample_count": (DataType.long, 1, None),  # sampled paths per series (output = mean)
    "seed": (DataType.long, None, None),  # None = fresh randomness
    "quantiles": (DataType.double, [], (-1,)),  # levels in (0, 1) -> {column}_q{level} columns
    "freq": (DataType.string, None, None),  # pandas offset alias ("B", "5min"); None = infer
}


def input_schema() -> Schema:
    """The candle columns a request carries."""
    return Schema([
        ColSpec(DataType.string, SERIES_ID, required=False),
        ColSpec(DataType.datetime, TIMESTAMP),
        *[ColSpec(DataType.double, name) for name in PRICE_COLUMNS],
        ColSpec(DataType.double, VOLUME, required=False),
        ColSpec(DataType.double, AMOUNT, required=False),
    ])


def output_schema() -> Schema:
    """The fixed forecast columns (quantile columns come on top, see the module doc)."""
    return Schema([
        ColSpec(DataType.string, SERIES_ID, required=False),
        ColSpec(DataType.datetime, TIMESTAMP),
        *[ColSpec(DataType.double, name) for name in CANDLE_COLUMNS],
    ])


def param_schema() -> ParamSchema:
    """The sampling params with their types and defaults."""
    return ParamSchema([ParamSpec(name, dtype, default, shape)
                        for name, (dtype, default, shape) in PARAM_SPECS.items()])


def kronos_signature() -> ModelSignature:
    """The model signature: input, output and params schemas."""
    return ModelSignature(inputs=input_schema(), outputs=output_schema(), params=param_schema())


def input_example(last: int = 64) -> tuple[pd.DataFrame, dict[str, object]]:
    """The last `last` daily S&P 500 candles (from `arch`) and example params."""
    from .data import load_index

    history = load_index("SP500", last=last)
    return history, {"pred_len": 5, "sample_count": 4, "seed": 7, "quantiles": [0.1, 0.9]}
