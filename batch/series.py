"""Forecast one group of whole series: pandas in, pandas out, no Spark.

Spark hands `forecast_group` all candles of a few hundred series at a time (rows in any
order). Each series is checked and prepared alone, so one bad series becomes one row of
the errors output and never stops the others; the good ones are generated together,
`chunk_series` at a time, through the forecaster's own batching.

Per series:
1. rows are sorted by timestamp (a distributed table has no row order; the timestamps
   must parse, be naive and be unique);
2. `as_of`: the history is the candles at or before the cut-off; those after it are the
   realised values, written beside the forecast (`realised_{column}`, matched by timestamp);
3. `last`: only the last N candles of the history are kept;
4. the forecaster's own rules apply (`KronosForecaster.prepare`: too short, NaN, prices...);
5. the series is seeded by its id (`batch.options.id_seed`), whatever shares its chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from model_package.calendar import parse_timestamps
from model_package.errors import KronosInputError
from model_package.forecaster import ANSWER_ATTR, KronosForecaster, PreparedRequest, quantile_column
from model_package.frames import CANDLE_COLUMNS, SERIES_ID, TIMESTAMP
from model_package.kronos import generate

from .options import BatchOptions, id_seed

MODEL_VERSION = "model_version"
# Replay columns (text): the series' own seed (decimal; up to 2**64 - 1, beyond Spark's
# long), the sha256 of the predictor's weights file, and the job's sampling params as JSON
# without the seed. `pyfunc.predict(history, params={**json.loads(params), "seed": int(seed)})`
# of the same history and version gives the same rows.
SEED, WEIGHTS_DIGEST, PARAMS = "seed", "weights_digest", "params"
TEXT_COLUMNS = (MODEL_VERSION, SEED, WEIGHTS_DIGEST, PARAMS)
REALISED_PREFIX = "realised_"
FIELD, RULE = "field", "rule"
ERROR_COLUMNS = (SERIES_ID, FIELD, RULE)


def realised_column(column: str) -> str:
    return f"{REALISED_PREFIX}{column}"


def forecast_columns(quantiles: Sequence[float], with_realised: bool) -> list[str]:
    """Columns of the forecasts output, in order."""
    columns = [SERIES_ID, TIMESTAMP, *CANDLE_COLUMNS]
    columns += [quantile_column(c, q) for c in CANDLE_COLUMNS for q in quantiles]
    if with_realised:
        columns += [realised_column(c) for c in CANDLE_COLUMNS]
    return [*columns, *TEXT_COLUMNS]


@dataclass
class GroupResult:
    """What one group of series gave: forecast rows and error rows (`ERROR_COLUMNS`)."""

    forecasts: pd.DataFrame
    errors: pd.DataFrame


@dataclass
class _Ready:
    """A checked series waiting for generation."""

    series_id: object
    request: PreparedRequest  # this series alone, seeded by its id
    realised: pd.DataFrame | None  # rows after as_of, indexed by timestamp


def forecast_group(forecaster: KronosForecaster, candles: pd.DataFrame, options: BatchOptions) -> GroupResult:
    """Forecast every series of `candles` (long format with `series_id`, rows in any order)."""
    ready: list[_Ready] = []
    errors: list[tuple[object, str, str]] = []
    missing = candles[SERIES_ID].isna()
    if missing.any():
        errors.append((None, SERIES_ID, f"must not be empty, got {int(missing.sum())} rows without one"))
    for series_id, part in candles[~missing].groupby(SERIES_ID, sort=True):
        try:
            ready.append(_prepare(forecaster, series_id, part, options))
        except KronosInputError as exc:
            errors.append((series_id, exc.field, exc.rule))
    frames = []
    for chunk in _chunks(ready, options.chunk_series):
        outputs, forecaster.last_stats = generate(
            forecaster.tokenizer,
            forecaster.model,
            [item.request.series[0].inputs for item in chunk],
            forecaster.max_context,
            forecaster.mode,
        )
        for item, output in zip(chunk, outputs, strict=True):
            try:
                frame = forecaster.finish(item.request, [output]).frame
            except KronosInputError as exc:  # a forecast that is not finite
                errors.append((item.series_id, exc.field, exc.rule))
                continue
            frames.append(_with_extras(frame, item.realised, options))
    columns = forecast_columns(options.params.quantiles, options.as_of is not None)
    forecasts = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return GroupResult(forecasts[columns], pd.DataFrame(errors, columns=list(ERROR_COLUMNS)))


def _prepare(forecaster: KronosForecaster, series_id: object, part: pd.DataFrame, options: BatchOptions) -> _Ready:
    """Sort, cut and check one series (raises KronosInputError naming field and rule)."""
    stamps = parse_timestamps(part[TIMESTAMP].reset_index(drop=True), TIMESTAMP, series_id)
    order = np.argsort(stamps.to_numpy(), kind="stable")
    history = part.iloc[order].reset_index(drop=True)
    history[TIMESTAMP] = stamps[order]
    realised = None
    if options.as_of is not None:
        after = (history[TIMESTAMP] > options.as_of).to_numpy()
        realised = history[after].drop_duplicates(TIMESTAMP).set_index(TIMESTAMP)
        history = history[~after].reset_index(drop=True)
        if history.empty:
            raise KronosInputError("history", f"has no candle at or before as_of ({options.as_of})", series_id)
    if options.last is not None:
        history = history.tail(options.last).reset_index(drop=True)
    params = replace(options.params, seed=id_seed(options.params.seed, series_id))  # type: ignore[arg-type]
    request = forecaster.prepare(history, params)
    return _Ready(series_id, request, realised)


def _with_extras(frame: pd.DataFrame, realised: pd.DataFrame | None, options: BatchOptions) -> pd.DataFrame:
    """The realised candles beside the forecast (by timestamp), the model version and the
    replay columns (from the answer facts `finish` put in the frame's attrs)."""
    if options.as_of is not None:
        future = pd.DatetimeIndex(frame[TIMESTAMP])
        for column in CANDLE_COLUMNS:
            values = np.full(len(frame), np.nan)
            if realised is not None and column in realised.columns:
                matched = pd.to_numeric(realised[column], errors="coerce").reindex(future)
                values = matched.to_numpy(dtype=np.float64)
            frame[realised_column(column)] = values
    facts = frame.attrs[ANSWER_ATTR]
    frame[MODEL_VERSION] = options.model_version
    frame[SEED] = str(facts["seed"])
    frame[WEIGHTS_DIGEST] = facts["weights_digest"]
    frame[PARAMS] = json.dumps({k: v for k, v in facts["params"].items() if k != SEED}, sort_keys=True)
    return frame


def _chunks(items: list[_Ready], size: int) -> Iterator[list[_Ready]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
