"""Load-test payloads: windows of real daily S&P 500 / NASDAQ candles as V2 requests.

Each request holds 1-`max_series` series, each a window of `min_candles`-`max_candles`
consecutive daily candles cut at a random place from one of the two indexes that ship with
the `arch` package (no network). Params mix greedy decoding (`top_k=1`) and sampling
(`temperature`, `top_p`, `sample_count`, `seed`), several horizons and, on some sampled
requests, quantiles.

The same spec is encoded two ways:
- `rest_body`: the JSON body of `POST /v2/models/kronos/infer` (pandas codec);
- `grpc_request`: a `ModelInferRequest`; gRPC parameters carry only bool/int64/string,
  so floats travel as strings and quantiles as "0.1,0.5,0.9" (the runtime coerces them).

No Locust import here: the soak script and the tests use this module too.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from serving.grpc_request import infer_request

MODEL_NAME = "kronos"
INDEXES = ("SP500", "NASDAQ")
_INDEX_FILES = {"SP500": ("sp500", "sp500.csv.gz"), "NASDAQ": ("nasdaq", "nasdaq.csv.gz")}
QUANTILE_LEVELS = (0.1, 0.5, 0.9)
Params = dict[str, Any]


@dataclass(frozen=True)
class PayloadMix:
    """What the generated requests look like (lengths in candles, horizons in steps)."""

    min_candles: int = 48
    max_candles: int = 320
    max_series: int = 3
    horizons: tuple[int, ...] = (5, 10, 20, 30)
    sample_counts: tuple[int, ...] = (1, 2, 4)
    greedy_share: float = 0.4
    quantile_share: float = 0.5  # of the sampled requests with sample_count > 1


@dataclass(frozen=True)
class Spec:
    """One request: its long-format history and its params (Python types)."""

    history: pd.DataFrame
    params: Params

    @property
    def n_series(self) -> int:
        return int(self.history["series_id"].nunique())


@lru_cache(maxsize=1)
def candle_pool() -> dict[str, pd.DataFrame]:
    """The full daily history of each index, as `model_package.data.load_index` returns it.

    Read straight from the CSV files inside the `arch` package: importing `arch` (scipy,
    statsmodels) or `model_package` (torch) would cost Locust processes seconds and memory.
    """
    spec = importlib.util.find_spec("arch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the `arch` package (real S&P 500 / NASDAQ candles) is not installed")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    pool = {}
    for name, (folder, file) in _INDEX_FILES.items():
        raw = pd.read_csv(data_dir / folder / file)
        pool[name] = pd.DataFrame(
            {
                "series_id": name,
                "timestamp": pd.DatetimeIndex(pd.to_datetime(raw["Date"])),
                **{
                    column.lower(): pd.to_numeric(raw[column], errors="coerce").to_numpy(dtype=float)
                    for column in ("Open", "High", "Low", "Close", "Volume")
                },
            }
        )
    return pool


def window(rng: random.Random, length: int, index: str | None = None) -> pd.DataFrame:
    """`length` consecutive real candles of one index, `series_id` = index@first-day."""
    pool = candle_pool()
    name = index or rng.choice(INDEXES)
    frame = pool[name]
    start = rng.randrange(0, len(frame) - length)
    part = frame.iloc[start : start + length].reset_index(drop=True)
    part["series_id"] = f"{name}@{part['timestamp'].iloc[0]:%Y-%m-%d}"
    return part


def sample_params(rng: random.Random, mix: PayloadMix) -> Params:
    """Greedy or sampled params with a random horizon (and sometimes quantiles)."""
    params: Params = {"pred_len": rng.choice(mix.horizons)}
    if rng.random() < mix.greedy_share:
        params["top_k"] = 1
        return params
    samples = rng.choice(mix.sample_counts)
    params.update(
        temperature=round(rng.uniform(0.7, 1.3), 2), top_p=0.9, sample_count=samples, seed=rng.randrange(1_000_000)
    )
    if samples > 1 and rng.random() < mix.quantile_share:
        params["quantiles"] = list(QUANTILE_LEVELS)
    return params


def make_spec(rng: random.Random, mix: PayloadMix = PayloadMix()) -> Spec:
    """A random request of 1-`max_series` series with distinct ids."""
    frames: list[pd.DataFrame] = []
    ids: set[str] = set()
    for _ in range(rng.randint(1, mix.max_series)):
        part = window(rng, rng.randint(mix.min_candles, mix.max_candles))
        sid = part["series_id"].iloc[0]
        if sid in ids:  # the same window twice: keep the request valid (distinct series)
            continue
        ids.add(sid)
        frames.append(part)
    history = pd.concat(frames, ignore_index=True)
    history = history[["series_id", "timestamp", "open", "high", "low", "close", "volume"]]
    return Spec(history, sample_params(rng, mix))


def rest_body(spec: Spec) -> dict[str, Any]:
    """The V2 REST JSON body (pandas codec: one [n, 1] input per column)."""
    frame = spec.history
    n = len(frame)
    inputs: list[dict[str, Any]] = [
        {
            "name": "series_id",
            "datatype": "BYTES",
            "shape": [n, 1],
            "parameters": {"content_type": "str"},
            "data": frame["series_id"].tolist(),
        },
        {
            "name": "timestamp",
            "datatype": "BYTES",
            "shape": [n, 1],
            "parameters": {"content_type": "datetime"},
            "data": [t.isoformat() for t in pd.DatetimeIndex(frame["timestamp"])],
        },
    ]
    for column in frame.columns[2:]:
        inputs.append(
            {"name": column, "datatype": "FP64", "shape": [n, 1], "data": frame[column].astype(float).tolist()}
        )
    return {"inputs": inputs, "parameters": {"content_type": "pd", **spec.params}}


def grpc_request(spec: Spec, model_name: str = MODEL_NAME) -> Any:
    """A `ModelInferRequest` (BYTES as UTF-8, FP64 contents, string-typed float params)."""
    return infer_request(spec.history, dict(spec.params), model_name)


def expected_rows(spec: Spec) -> int:
    """Rows of a correct forecast: pred_len per series."""
    return spec.n_series * int(spec.params["pred_len"])
