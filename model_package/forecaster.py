"""KronosForecaster: long-format candle DataFrames in, forecast DataFrames out.

    f = KronosForecaster.from_pretrained("NeoQuasar/Kronos-Tokenizer-base", "NeoQuasar/Kronos-small")
    forecast = f.predict(history, pred_len=24, sample_count=20, quantiles=[0.1, 0.5, 0.9])

`prepare` / `finish` split a call in two so that a server can run the series of several
requests in one generation pass and still hand each request its own frame.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .calendar import calendar_features, infer_future_timestamps
from .errors import KronosInputError
from .frames import (
    CANDLE_COLUMNS,
    SERIES_ID,
    TIMESTAMP,
    Series,
    check_increasing,
    denormalise,
    normalise,
    parse_timestamps,
    split_series,
)
from .kronos import (
    GENERATION_MODES,
    GenerationStats,
    Kronos,
    KronosTokenizer,
    SeriesInput,
    SeriesOutput,
    count_parameters,
    generate,
    load_model,
    load_tokenizer,
    preset_by_name,
    preset_for_config,
)
from .kronos.presets import DEFAULT_MAX_CONTEXT
from .kronos.sampling import splitmix64

PATH = "path"


@dataclass(frozen=True)
class SamplingParams:
    """Validated generation settings of one request."""

    pred_len: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.9
    sample_count: int = 1
    seed: int | None = None
    quantiles: tuple[float, ...] = ()
    freq: str | None = None

    def __post_init__(self) -> None:
        _check_int("pred_len", self.pred_len, minimum=1)
        _check_int("top_k", self.top_k, minimum=0)
        _check_int("sample_count", self.sample_count, minimum=1)
        if not _is_real(self.temperature) or not self.temperature > 0 or math.isinf(self.temperature):
            raise KronosInputError("temperature", f"must be a finite number > 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise KronosInputError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=None)
        for q in self.quantiles:
            if not _is_real(q) or not 0 < q < 1:
                raise KronosInputError("quantiles", f"levels must be in (0, 1), got {q!r}")
        if len(set(self.quantiles)) != len(self.quantiles):
            raise KronosInputError("quantiles", "levels must be distinct")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and not math.isnan(float(value))


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise KronosInputError(name, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise KronosInputError(name, f"must be >= {minimum}, got {value}")


def quantile_column(column: str, level: float) -> str:
    """Name of a quantile column: close, 0.1 -> close_q0.1."""
    return f"{column}_q{level:g}"


def series_seed(seed: int, index: int) -> int:
    """Seed of the index-th series of a request drawn with `seed` (distinct per series)."""
    mixed = splitmix64(np.array([(seed & 0xFFFFFFFFFFFFFFFF) ^ (index * 0x9E3779B97F4A7C15
                                                                & 0xFFFFFFFFFFFFFFFF)],
                                dtype=np.uint64))
    return int(mixed[0])


@dataclass
class PreparedSeries:
    """What generation needs for one series, and what turns its paths back into prices."""

    series: Series
    future: pd.DatetimeIndex
    mean: np.ndarray  # [6]
    std: np.ndarray  # [6]
    inputs: SeriesInput


@dataclass
class PreparedRequest:
    """A validated request: its series ready for generation and its output settings."""

    params: SamplingParams
    series: list[PreparedSeries]
    has_series_id: bool

    @property
    def inputs(self) -> list[SeriesInput]:
        return [s.inputs for s in self.series]


@dataclass
class Forecast:
    """One request's outcome: the forecast frame and, optionally, the paths."""

    frame: pd.DataFrame
    paths: list[np.ndarray] = field(default_factory=list)  # per series [S, P, 6] prices


class KronosForecaster:
    """A Kronos tokenizer + predictor pair with pandas in and out. Always in eval mode."""

    def __init__(self, tokenizer: KronosTokenizer, model: Kronos, max_context: int,
                 device: str | torch.device = "auto", mode: str = "fast", clip: float = 5.0,
                 source: dict | None = None) -> None:
        if mode not in GENERATION_MODES:
            raise ValueError(f"mode must be one of {GENERATION_MODES}, got {mode!r}")
        if max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {max_context}")
        self.device = resolve_device(device)
        self.tokenizer = tokenizer.to(self.device).eval()
        self.model = model.to(self.device).eval()
        self.max_context = int(max_context)
        self.mode = mode
        self.clip = clip
        self.source = dict(source or {})
        self.last_stats = GenerationStats()

    @classmethod
    def from_pretrained(cls, tokenizer: str | Path | None = None,
                        model: str | Path = "NeoQuasar/Kronos-small",
                        max_context: int | None = None, device: str | torch.device = "auto",
                        *, revision: str | None = None, tokenizer_revision: str | None = None,
                        cache_dir: str | Path | None = None, mode: str = "fast"
                        ) -> KronosForecaster:
        """Load both parts from local directories or Hugging Face hub ids.

        `tokenizer=None` picks the tokenizer the named model was published with
        (`NeoQuasar/Kronos-small` -> `NeoQuasar/Kronos-Tokenizer-base`); `max_context=None`
        uses the published context of that model shape (2048 for mini, 512 otherwise).
        """
        preset = preset_by_name(str(model))
        if tokenizer is None:
            if preset is None:
                raise ValueError(f"tokenizer not given and {model!r} is not a published Kronos "
                                 "model; pass the tokenizer directory or hub id")
            tokenizer = preset.tokenizer_id
        kronos_model = load_model(model, revision=revision, cache_dir=cache_dir)
        kronos_tokenizer = load_tokenizer(tokenizer, revision=tokenizer_revision, cache_dir=cache_dir)
        if max_context is None:
            shape = preset if preset is not None else preset_for_config(kronos_model.config)
            max_context = shape.max_context if shape is not None else DEFAULT_MAX_CONTEXT
        source = {"tokenizer": str(tokenizer), "model": str(model),
                  "tokenizer_revision": tokenizer_revision, "model_revision": revision}
        return cls(kronos_tokenizer, kronos_model, max_context, device, mode, source=source)

    def describe(self) -> dict:
        """Shapes and sizes, for model metadata."""
        return {
            "max_context": self.max_context,
            "model_config": self.model.config.to_dict(),
            "tokenizer_config": self.tokenizer.config.to_dict(),
            "model_parameters": count_parameters(self.model),
            "tokenizer_parameters": count_parameters(self.tokenizer),
            **{f"source_{k}": v for k, v in self.source.items() if v is not None},
        }

    # -- the public calls ------------------------------------------------------------------

    def predict(self, history: pd.DataFrame, pred_len: int,
                future_timestamps: pd.DataFrame | None = None, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 0.9, sample_count: int = 1,
                seed: int | None = None, quantiles: Sequence[float] | None = None,
                freq: str | None = None) -> pd.DataFrame:
        """Forecast `pred_len` candles per series: the mean over `sample_count` sampled
        paths, plus `{column}_q{level}` columns for each quantile level.

        Greedy decoding is `top_k=1`. `seed` makes sampling reproducible; without it each
        call draws fresh randomness (the global torch RNG is never used).
        """
        params = SamplingParams(pred_len, temperature, top_k, top_p, sample_count, seed,
                                tuple(quantiles or ()), freq)
        request = self.prepare(history, params, future_timestamps)
        outputs, self.last_stats = generate(self.tokenizer, self.model, request.inputs,
                                            self.max_context, self.mode)
        return self.finish(request, outputs).frame

    def predict_paths(self, history: pd.DataFrame, pred_len: int,
                      future_timestamps: pd.DataFrame | None = None, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 0.9, sample_count: int = 1,
                      seed: int | None = None, freq: str | None = None) -> pd.DataFrame:
        """Every sampled path, long format: series_id (when given), `path`, timestamp and
        the six columns. With the same arguments, `predict` returns the mean of these."""
        params = SamplingParams(pred_len, temperature, top_k, top_p, sample_count, seed, (), freq)
        request = self.prepare(history, params, future_timestamps)
        outputs, self.last_stats = generate(self.tokenizer, self.model, request.inputs,
                                            self.max_context, self.mode)
        return paths_frame(request, self.finish(request, outputs).paths)

    # -- the two halves of a call ----------------------------------------------------------

    def prepare(self, history: pd.DataFrame, params: SamplingParams,
                future_timestamps: pd.DataFrame | None = None) -> PreparedRequest:
        """Validate a request and build its generation inputs (raises KronosInputError)."""
        if params.pred_len > self.max_context:
            raise KronosInputError(
                "pred_len", f"must be <= the model context ({self.max_context}), got {params.pred_len}")
        all_series = split_series(history)
        has_series_id = SERIES_ID in history.columns
        futures = _future_by_series(future_timestamps, all_series, params, has_series_id)
        base_seed = params.seed if params.seed is not None else secrets.randbits(63)
        prepared = []
        for index, series in enumerate(all_series):
            future = futures[index]
            z, mean, std = normalise(series.candles, self.clip)
            stamps = np.concatenate([calendar_features(series.timestamps), calendar_features(future)])
            inputs = SeriesInput(
                candles=torch.from_numpy(z), stamps=torch.from_numpy(stamps),
                pred_len=params.pred_len, sample_count=params.sample_count,
                temperature=float(params.temperature), top_k=int(params.top_k),
                top_p=float(params.top_p), seed=series_seed(base_seed, index),
            )
            prepared.append(PreparedSeries(series, future, mean, std, inputs))
        return PreparedRequest(params, prepared, has_series_id)

    def finish(self, request: PreparedRequest, outputs: Sequence[SeriesOutput | None]) -> Forecast:
        """Turn generated paths into the request's forecast frame (prices, mean, quantiles)."""
        frames, all_paths = [], []
        levels = request.params.quantiles
        for prepared, output in zip(request.series, outputs, strict=True):
            if output is None:
                raise RuntimeError(f"series {prepared.series.label!r} was not generated")
            paths = denormalise(output.paths.float().cpu().numpy(), prepared.mean, prepared.std)
            all_paths.append(paths)  # [S, P, 6]
            columns: dict[str, np.ndarray] = {}
            if request.has_series_id:
                columns[SERIES_ID] = np.array([prepared.series.series_id] * len(prepared.future),
                                              dtype=object)
            columns[TIMESTAMP] = prepared.future
            mean = paths.mean(axis=0)  # [P, 6]
            for j, name in enumerate(CANDLE_COLUMNS):
                columns[name] = mean[:, j].astype(np.float64)
            if levels:
                qs = np.quantile(paths, levels, axis=0)  # [Q, P, 6]
                for j, name in enumerate(CANDLE_COLUMNS):
                    for k, level in enumerate(levels):
                        columns[quantile_column(name, level)] = qs[k, :, j].astype(np.float64)
            frames.append(pd.DataFrame(columns))
        return Forecast(pd.concat(frames, ignore_index=True), all_paths)


def paths_frame(request: PreparedRequest, paths: list[np.ndarray]) -> pd.DataFrame:
    """Long frame of every path: series_id (when given), path, timestamp, six columns."""
    frames = []
    for prepared, series_paths in zip(request.series, paths, strict=True):
        S, P, _ = series_paths.shape
        columns: dict[str, object] = {}
        if request.has_series_id:
            columns[SERIES_ID] = [prepared.series.series_id] * (S * P)
        columns[PATH] = np.repeat(np.arange(S), P)
        columns[TIMESTAMP] = np.tile(prepared.future.to_numpy(), S)
        flat = series_paths.reshape(S * P, 6).astype(np.float64)
        for j, name in enumerate(CANDLE_COLUMNS):
            columns[name] = flat[:, j]
        frames.append(pd.DataFrame(columns))
    return pd.concat(frames, ignore_index=True)


def _future_by_series(future_timestamps: pd.DataFrame | None, all_series: list[Series],
                      params: SamplingParams, has_series_id: bool) -> list[pd.DatetimeIndex]:
    """Future timestamps per series: given (validated) or inferred from the history."""
    if future_timestamps is None:
        return [infer_future_timestamps(s.timestamps, params.pred_len, params.freq, s.label)
                for s in all_series]
    field_name = "future_timestamps"
    if not isinstance(future_timestamps, pd.DataFrame) or TIMESTAMP not in future_timestamps:
        raise KronosInputError(field_name, f"must be a DataFrame with a {TIMESTAMP!r} column")
    if has_series_id and SERIES_ID not in future_timestamps:
        raise KronosInputError(field_name, f"needs a {SERIES_ID!r} column like the history")
    result = []
    for s in all_series:
        if has_series_id:
            rows = future_timestamps[future_timestamps[SERIES_ID] == s.series_id][TIMESTAMP]
        else:
            rows = future_timestamps[TIMESTAMP]
        if len(rows) != params.pred_len:
            raise KronosInputError(
                field_name, f"needs pred_len={params.pred_len} rows per series, got {len(rows)}", s.label)
        future = parse_timestamps(rows.reset_index(drop=True), field_name, s.label)
        check_increasing(future, field_name, s.label)
        if future[0] <= s.timestamps[-1]:
            raise KronosInputError(
                field_name, f"must start after the last history timestamp ({s.timestamps[-1]})", s.label)
        result.append(future)
    return result


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as torch understands it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
