"""Live accuracy: the forecasts the server answered, the candles that came true later, and
their scores per model version and horizon bucket.

`store` keeps both in SQL (sqlite file by default, PostgreSQL in the compose stack) and joins
them; `accuracy` turns the joined rows into MAE, MASE, directional accuracy, CRPS and band
coverage. Neither needs MLServer.
"""

from __future__ import annotations

from .accuracy import HORIZON_BUCKETS, METRICS, accuracy_table, horizon_bucket
from .store import BAND, LIVE_LEVELS, QUANTILE_COLUMNS, ForecastRecord, LiveStore, level_column

__all__ = [
    "BAND",
    "HORIZON_BUCKETS",
    "LIVE_LEVELS",
    "METRICS",
    "QUANTILE_COLUMNS",
    "ForecastRecord",
    "LiveStore",
    "accuracy_table",
    "horizon_bucket",
    "level_column",
]
