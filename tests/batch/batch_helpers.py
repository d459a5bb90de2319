"""Helpers of the batch tests: candle tables with good and bad series, and the tiny model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from model_package.data import random_walk_candles

TINY_MAX_CONTEXT = 128


@dataclass(frozen=True)
class BatchRegistry:
    """The MLflow server of the batch tests and the champion's version."""

    url: str  # tracking and registry
    version: str


# The bad series of `mixed_candles` and the field each one is refused for.
BAD_FIELDS = {
    "bad-short": "history",  # one candle
    "bad-nan": "close",  # a NaN close
    "bad-duplicate": "timestamp",  # two rows with one timestamp
    "bad-no-time": "timestamp",  # an empty timestamp
    "bad-price": "low",  # a negative low (strict candles)
    "bad-high": "high",  # high below open
}


def good_ids(count: int) -> list[str]:
    return [f"s{i:03d}" for i in range(count)]


def mixed_candles(good: int = 194, seed: int = 0) -> pd.DataFrame:
    """`good` valid series of mixed lengths (4 .. 170 candles: some longer than the tiny
    model's context), the bad series of BAD_FIELDS, all rows shuffled across series."""
    rng = np.random.default_rng(seed)
    frames = []
    for i, series_id in enumerate(good_ids(good)):
        length = int(rng.integers(4, 171))
        frames.append(random_walk_candles(length, seed=1000 + i, series_id=series_id, freq="5min"))
    frames.append(random_walk_candles(1, seed=1, series_id="bad-short"))
    nan = random_walk_candles(30, seed=2, series_id="bad-nan")
    nan.loc[7, "close"] = np.nan
    duplicate = random_walk_candles(30, seed=3, series_id="bad-duplicate")
    duplicate.loc[12, "timestamp"] = duplicate.loc[11, "timestamp"]
    no_time = random_walk_candles(30, seed=4, series_id="bad-no-time")
    no_time.loc[5, "timestamp"] = pd.NaT
    price = random_walk_candles(30, seed=5, series_id="bad-price")
    price.loc[9, "low"] = -1.0
    high = random_walk_candles(30, seed=6, series_id="bad-high")
    high.loc[3, "high"] = high.loc[3, "open"] * 0.5
    frames += [nan, duplicate, no_time, price, high]
    table = pd.concat(frames, ignore_index=True)
    return table.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def one_series(table: pd.DataFrame, series_id: str) -> pd.DataFrame:
    """The rows of one series, in time order (as a user would send them to the pyfunc)."""
    rows = table[table["series_id"] == series_id]
    return rows.sort_values("timestamp").reset_index(drop=True)
