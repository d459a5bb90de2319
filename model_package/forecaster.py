"""KronosForecaster: long-format candle DataFrames in, forecast DataFrames out.

    f = KronosForecaster.from_pretrained("NeoQuasar/Kronos-Tokenizer-base", "NeoQuasar/Kronos-small")
    forecast = f.predict(history, pred_len=24, sample_count=20, quantiles=[0.1, 0.5, 0.9])

`prepare` / `finish` split a call in two so that a server can run the series of several
requests in one generation pass and still hand each request its own frame.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .calendar import calendar_features, check_future, infer_future_timestamps, parse_timestamps
from .errors import KronosInputError, brief, checked_int, checked_real
from .frames import (
    CANDLE_COLUMNS,
    SERIES_ID,
    TIMESTAMP,
    Series,
    denormalise,
    normalise,
    repair_candles,
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
    resolve_checkpoint,
)
from .kronos.checkpoint import weights_sha256
from .kronos.precision import DEFAULT_PRECISION, check_precision, precision_note, set_precision
from .kronos.presets import DEFAULT_MAX_CONTEXT
from .kronos.sampling import splitmix64
from .trading_calendar import calendar_future_timestamps, check_calendar

PATH = "path"
ANSWER_ATTR = "kronos"  # forecast frames' .attrs key holding `KronosForecaster.answer_facts`
DRAWN_SEED_BITS = 63  # a drawn seed fits gRPC's int64 parameters and JSON integers alike

logger = logging.getLogger("kronos.forecaster")


# Ranges of the integer params (documented in the README's params table). The server's
# limits (model_package/settings.py) cap pred_len and sample_count further.
INT_PARAM_MAX = 2**31 - 1
SEED_MAX = 2**64 - 1  # seeds are 64-bit: 0 .. 2**64 - 1, each gives its own draws
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-6, 1e6  # logits / temperature stay finite in float32
DEFAULT_PRED_LEN = 10


@dataclass(frozen=True)
class SamplingParams:
    """Validated generation settings of one request. The field defaults are the defaults of
    every entry point: `KronosForecaster.predict`, the pyfunc's signature (`PARAM_SPECS`)
    and its param coercion all read them from here."""

    pred_len: int = DEFAULT_PRED_LEN  # forecast steps per series, 1 .. INT_PARAM_MAX
    temperature: float = 1.0  # logits are divided by it, TEMPERATURE_MIN .. TEMPERATURE_MAX
    top_k: int = 0  # 0 = off, 1 = greedy, 0 .. INT_PARAM_MAX (above the vocabulary: all kept)
    top_p: float = 0.9  # nucleus mass in (0, 1]; ignored when top_k > 0
    sample_count: int = 1  # sampled paths per series (output = their mean), 1 .. INT_PARAM_MAX
    seed: int | None = None  # None = fresh randomness; 0 .. SEED_MAX
    quantiles: tuple[float, ...] = ()  # levels in (0, 1) -> {column}_q{level} columns
    freq: str | None = None  # pandas offset alias ("B", "5min"); None = inferred per series
    calendar: str | None = None  # exchange calendar ("XNYS", "24/7"): future bars on its sessions
    strict_candles: bool = True  # prices > 0, low <= open, close <= high, volume/amount >= 0
    repair_candles: bool = False  # forecast paths made well-formed: see frames.repair_candles

    def __post_init__(self) -> None:
        # Validate, and store plain Python types (numpy scalars and lists come in too).
        set_ = object.__setattr__
        set_(self, "pred_len", checked_int("pred_len", self.pred_len, 1, INT_PARAM_MAX))
        set_(self, "top_k", checked_int("top_k", self.top_k, 0, INT_PARAM_MAX))
        set_(self, "sample_count", checked_int("sample_count", self.sample_count, 1, INT_PARAM_MAX))
        temperature = checked_real("temperature", self.temperature)
        if not TEMPERATURE_MIN <= temperature <= TEMPERATURE_MAX:
            raise KronosInputError(
                "temperature", f"must be in [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}], got {temperature!r}"
            )
        set_(self, "temperature", temperature)
        top_p = checked_real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise KronosInputError("top_p", f"must be in (0, 1], got {top_p!r}")
        set_(self, "top_p", top_p)
        if self.seed is not None:
            set_(self, "seed", checked_int("seed", self.seed, 0, SEED_MAX))
        set_(self, "quantiles", _checked_levels(self.quantiles))
        if self.freq is not None and not isinstance(self.freq, str):
            raise KronosInputError("freq", f"must be a string (pandas offset alias), got {brief(self.freq)}")
        set_(self, "calendar", check_calendar(self.calendar))
        if not isinstance(self.strict_candles, (bool, np.bool_)):
            raise KronosInputError("strict_candles", f"must be true or false, got {brief(self.strict_candles)}")
        set_(self, "strict_candles", bool(self.strict_candles))
        if not isinstance(self.repair_candles, (bool, np.bool_)):
            raise KronosInputError("repair_candles", f"must be true or false, got {brief(self.repair_candles)}")
        set_(self, "repair_candles", bool(self.repair_candles))


def _checked_levels(levels: object) -> tuple[float, ...]:
    """Quantile levels: finite, in (0, 1), distinct, with distinct column names."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, (tuple, list, np.ndarray)):
        raise KronosInputError("quantiles", f"must be a list of numbers, got {brief(levels)}")
    checked = tuple(checked_real("quantiles", q) for q in levels)
    for q in checked:
        if not 0 < q < 1:
            raise KronosInputError("quantiles", f"levels must be in (0, 1), got {q!r}")
    names: dict[str, float] = {}
    for q in checked:
        name = quantile_column("close", q)
        if name in names:
            what = "must be distinct" if names[name] == q else "must give distinct column names"
            raise KronosInputError("quantiles", f"levels {what}, got {names[name]!r} and {q!r} ({name})")
        names[name] = q
    return checked


def quantile_column(column: str, level: float) -> str:
    """Name of a quantile column: close, 0.1 -> close_q0.1."""
    return f"{column}_q{level:g}"


_DEFAULTS = SamplingParams()  # the defaults, as predict's keyword defaults read them

_MASK64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN64 = 0x9E3779B97F4A7C15


def series_seed(seed: int, index: int) -> int:
    """Seed of the index-th series of a request drawn with `seed` (0 .. SEED_MAX).

    For one index this is a bijection of the seed (splitmix64 of seed XOR an odd multiple
    of the index), so every seed in range gives its own draws, and the series of one
    request get distinct seeds."""
    seed, index = int(seed), int(index)
    if not 0 <= seed <= SEED_MAX or index < 0:
        raise ValueError(f"seed must be in 0..{SEED_MAX} and index >= 0, got {seed}, {index}")
    mixed = splitmix64(np.array([seed ^ ((index * _GOLDEN64) & _MASK64)], dtype=np.uint64))
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
    seed: int  # the base seed used: params.seed, or the one drawn for this request (63 bits)

    @property
    def inputs(self) -> list[SeriesInput]:
        return [s.inputs for s in self.series]

    def replay_params(self) -> dict[str, Any]:
        """Every sampling param of this request, defaults and the seed used included, as
        JSON-ready values that `sampling_params` (pyfunc, server) accepts back: sent again
        with the same history to the same weights, they give the same answer."""
        values = dataclasses.asdict(self.params)
        values["seed"] = self.seed
        values["quantiles"] = list(self.params.quantiles)
        return values


@dataclass
class Forecast:
    """One request's outcome: the forecast frame and, optionally, the paths."""

    frame: pd.DataFrame
    paths: list[np.ndarray] = field(default_factory=list)  # per series [S, P, 6] prices


class KronosForecaster:
    """A Kronos tokenizer + predictor pair with pandas in and out. Always in eval mode.

    `dtype` is the predictor's generation precision (`model_package.kronos.precision`):
    "float32" (default), "bfloat16" or "float16" (CUDA; bfloat16 also runs, slowly, on CPUs
    without native bfloat16) or "int8" (CPU: int8 weights in the decode steps). The model is
    converted in place; the tokenizer always stays float32. A combination the device cannot
    run raises ValueError naming `dtype_name` ("dtype", or the environment variable it came from).
    """

    def __init__(
        self,
        tokenizer: KronosTokenizer,
        model: Kronos,
        max_context: int,
        device: str | torch.device = "auto",
        mode: str = "fast",
        clip: float = 5.0,
        source: dict | None = None,
        dtype: str = DEFAULT_PRECISION,
        *,
        dtype_name: str = "dtype",
    ) -> None:
        if mode not in GENERATION_MODES:
            raise ValueError(f"mode must be one of {GENERATION_MODES}, got {mode!r}")
        if max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {max_context}")
        self.device = resolve_device(device)
        self.dtype = check_precision(dtype, self.device, dtype_name)
        note = precision_note(self.dtype, self.device)
        if note is not None:
            logger.warning(note)
        self.tokenizer = tokenizer.to(self.device).eval()
        self.model = set_precision(model.to(self.device).eval(), self.dtype, dtype_name)
        self.max_context = int(max_context)
        self.mode = mode
        self.clip = clip
        self.source = dict(source or {})
        self.last_stats = GenerationStats()

    @classmethod
    def from_pretrained(
        cls,
        tokenizer: str | Path | None = None,
        model: str | Path = "NeoQuasar/Kronos-small",
        max_context: int | None = None,
        device: str | torch.device = "auto",
        *,
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        cache_dir: str | Path | None = None,
        mode: str = "fast",
        dtype: str = DEFAULT_PRECISION,
        dtype_name: str = "dtype",
    ) -> KronosForecaster:
        """Load both parts from local directories or Hugging Face hub ids.

        `tokenizer=None` picks the tokenizer the named model was published with
        (`NeoQuasar/Kronos-small` -> `NeoQuasar/Kronos-Tokenizer-base`); `max_context=None`
        uses the published context of that model shape (2048 for mini, 512 otherwise).
        `dtype`: the generation precision (see the class); checked before anything loads.
        """
        check_precision(dtype, resolve_device(device), dtype_name)
        preset = preset_by_name(str(model))
        if tokenizer is None:
            if preset is None:
                raise ValueError(
                    f"tokenizer not given and {model!r} is not a published Kronos "
                    "model; pass the tokenizer directory or hub id"
                )
            tokenizer = preset.tokenizer_id
        kronos_model = load_model(model, revision=revision, cache_dir=cache_dir)
        kronos_tokenizer = load_tokenizer(tokenizer, revision=tokenizer_revision, cache_dir=cache_dir)
        if max_context is None:
            shape = preset if preset is not None else preset_for_config(kronos_model.config)
            max_context = shape.max_context if shape is not None else DEFAULT_MAX_CONTEXT
        source = {
            "tokenizer": str(tokenizer),
            "model": str(model),
            "tokenizer_revision": tokenizer_revision,
            "model_revision": revision,
            "tokenizer_sha256": weights_sha256(resolve_checkpoint(tokenizer, tokenizer_revision, cache_dir)),
            "model_sha256": weights_sha256(resolve_checkpoint(model, revision, cache_dir)),
        }
        return cls(
            kronos_tokenizer, kronos_model, max_context, device, mode, source=source, dtype=dtype, dtype_name=dtype_name
        )

    def describe(self) -> dict:
        """Shapes and sizes, for model metadata."""
        return {
            "max_context": self.max_context,
            "dtype": self.dtype,
            "model_config": self.model.config.to_dict(),
            "tokenizer_config": self.tokenizer.config.to_dict(),
            "model_parameters": count_parameters(self.model),
            "tokenizer_parameters": count_parameters(self.tokenizer),
            **{f"source_{k}": v for k, v in self.source.items() if v is not None},
        }

    # -- the public calls ------------------------------------------------------------------

    def predict(
        self,
        history: pd.DataFrame,
        pred_len: int = _DEFAULTS.pred_len,
        future_timestamps: pd.DataFrame | None = None,
        temperature: float = _DEFAULTS.temperature,
        top_k: int = _DEFAULTS.top_k,
        top_p: float = _DEFAULTS.top_p,
        sample_count: int = _DEFAULTS.sample_count,
        seed: int | None = _DEFAULTS.seed,
        quantiles: Sequence[float] | None = None,
        freq: str | None = _DEFAULTS.freq,
        strict_candles: bool = _DEFAULTS.strict_candles,
        repair_candles: bool = _DEFAULTS.repair_candles,
        calendar: str | None = _DEFAULTS.calendar,
    ) -> pd.DataFrame:
        """Forecast `pred_len` candles per series: the mean over `sample_count` sampled
        paths, plus `{column}_q{level}` columns for each quantile level.

        Greedy decoding is `top_k=1`. `seed` makes sampling reproducible; without it each
        call draws fresh randomness (the global torch RNG is never used). Defaults and
        ranges: `SamplingParams`. `strict_candles=False` accepts zero/negative prices and
        bars whose open/close lie outside [low, high] (see `model_package.frames`).
        `repair_candles=True` post-processes every sampled path into well-formed bars
        (`frames.repair_candles`) before the mean and quantiles are taken. `calendar`
        (an exchange calendar such as "XNYS", or "24/7") puts the future timestamps on that
        exchange's sessions: `model_package.trading_calendar`.
        """
        params = SamplingParams(
            pred_len=pred_len,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            sample_count=sample_count,
            seed=seed,
            quantiles=tuple(quantiles) if quantiles is not None else _DEFAULTS.quantiles,
            freq=freq,
            calendar=calendar,
            strict_candles=strict_candles,
            repair_candles=repair_candles,
        )
        request = self.prepare(history, params, future_timestamps)
        outputs, self.last_stats = generate(self.tokenizer, self.model, request.inputs, self.max_context, self.mode)
        return self.finish(request, outputs).frame

    def predict_paths(
        self,
        history: pd.DataFrame,
        pred_len: int = _DEFAULTS.pred_len,
        future_timestamps: pd.DataFrame | None = None,
        temperature: float = _DEFAULTS.temperature,
        top_k: int = _DEFAULTS.top_k,
        top_p: float = _DEFAULTS.top_p,
        sample_count: int = _DEFAULTS.sample_count,
        seed: int | None = _DEFAULTS.seed,
        freq: str | None = _DEFAULTS.freq,
        strict_candles: bool = _DEFAULTS.strict_candles,
        repair_candles: bool = _DEFAULTS.repair_candles,
        calendar: str | None = _DEFAULTS.calendar,
    ) -> pd.DataFrame:
        """Every sampled path, long format: series_id (when given), `path`, timestamp and
        the six columns. With the same arguments, `predict` returns the mean of these."""
        params = SamplingParams(
            pred_len=pred_len,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            sample_count=sample_count,
            seed=seed,
            freq=freq,
            calendar=calendar,
            strict_candles=strict_candles,
            repair_candles=repair_candles,
        )
        request = self.prepare(history, params, future_timestamps)
        outputs, self.last_stats = generate(self.tokenizer, self.model, request.inputs, self.max_context, self.mode)
        frame = paths_frame(request, self.finish(request, outputs).paths)
        frame.attrs[ANSWER_ATTR] = self.answer_facts(request)
        return frame

    # -- the two halves of a call ----------------------------------------------------------

    def prepare(
        self, history: pd.DataFrame, params: SamplingParams, future_timestamps: pd.DataFrame | None = None
    ) -> PreparedRequest:
        """Validate a request and build its generation inputs (raises KronosInputError)."""
        if params.pred_len > self.max_context:
            raise KronosInputError(
                "pred_len", f"must be <= the model context ({self.max_context}), got {params.pred_len}"
            )
        all_series = split_series(history, strict=params.strict_candles)
        has_series_id = SERIES_ID in history.columns
        futures = _future_by_series(future_timestamps, all_series, params, has_series_id)
        base_seed = params.seed if params.seed is not None else secrets.randbits(DRAWN_SEED_BITS)
        prepared = []
        for index, series in enumerate(all_series):
            future = futures[index]
            z, mean, std = normalise(series.candles, self.clip)
            stamps = np.concatenate([calendar_features(series.timestamps), calendar_features(future)])
            inputs = SeriesInput(
                candles=torch.from_numpy(z),
                stamps=torch.from_numpy(stamps),
                pred_len=params.pred_len,
                sample_count=params.sample_count,
                temperature=float(params.temperature),
                top_k=int(params.top_k),
                top_p=float(params.top_p),
                seed=series_seed(base_seed, index),
            )
            prepared.append(PreparedSeries(series, future, mean, std, inputs))
        return PreparedRequest(params, prepared, has_series_id, base_seed)

    def finish(self, request: PreparedRequest, outputs: Sequence[SeriesOutput | None]) -> Forecast:
        """Turn generated paths into the request's forecast frame (prices, mean, quantiles)."""
        frames, all_paths = [], []
        levels = request.params.quantiles
        for prepared, output in zip(request.series, outputs, strict=True):
            if output is None:
                raise RuntimeError(f"series {prepared.series.label!r} was not generated")
            paths = denormalise(output.paths.float().cpu().numpy(), prepared.mean, prepared.std)
            if request.params.repair_candles:
                paths = repair_candles(paths)
            if not np.isfinite(paths).all():  # never answer NaN/inf (null in JSON) forecasts
                raise KronosInputError(
                    "history",
                    "the forecast is not finite: the candle values are beyond what the "
                    "model's float32 arithmetic carries",
                    prepared.series.label,
                )
            all_paths.append(paths)  # [S, P, 6]
            columns: dict[str, np.ndarray | pd.DatetimeIndex] = {}
            if request.has_series_id:
                columns[SERIES_ID] = np.array([prepared.series.series_id] * len(prepared.future), dtype=object)
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
        frame = pd.concat(frames, ignore_index=True)
        frame.attrs[ANSWER_ATTR] = self.answer_facts(request)
        return Forecast(frame, all_paths)

    def answer_facts(self, request: PreparedRequest) -> dict[str, Any]:
        """What makes an answer replayable: the seed and params used and the weights
        (sha256 of the predictor's and tokenizer's weights files; None for a forecaster
        built from modules in memory). Forecast frames carry it in `.attrs["kronos"]`."""
        return {
            "seed": request.seed,
            "params": request.replay_params(),
            "weights_digest": self.source.get("model_sha256"),
            "tokenizer_digest": self.source.get("tokenizer_sha256"),
        }


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


def _future_by_series(
    future_timestamps: pd.DataFrame | None, all_series: list[Series], params: SamplingParams, has_series_id: bool
) -> list[pd.DatetimeIndex]:
    """Future timestamps per series: given (validated), on the params' exchange calendar, or
    inferred from the history's spacing."""
    if future_timestamps is None and params.calendar is not None:
        return [
            calendar_future_timestamps(s.timestamps, params.pred_len, params.calendar, params.freq, s.label)
            for s in all_series
        ]
    if future_timestamps is None:
        return [infer_future_timestamps(s.timestamps, params.pred_len, params.freq, s.label) for s in all_series]
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
                field_name, f"needs pred_len={params.pred_len} rows per series, got {len(rows)}", s.label
            )
        future = parse_timestamps(rows.reset_index(drop=True), field_name, s.label)
        check_future(future, s.timestamps[-1], params.pred_len, field_name, s.label)
        result.append(future)
    return result


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else as torch understands it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
