"""Serving settings of the Kronos pyfunc: device, generation mode and request limits.

Read from the environment with the prefix `KRONOS_` (for example `KRONOS_DEVICE=cpu`,
`KRONOS_MAX_PRED_LEN=128`). A request over a limit is refused with a `KronosInputError`
that names the field, the limit and the value, before any generation work starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ModelSettings(BaseSettings):
    """What a loaded Kronos pyfunc may be asked to do (all limits are per request)."""

    model_config = SettingsConfigDict(env_prefix="KRONOS_", extra="ignore")

    device: str = Field("auto", description='"auto" (cuda when available, else cpu), "cpu", "cuda:0"...')
    generation_mode: Literal["fast", "reference", "rolling"] = Field(
        "fast", description="generator implementation (see model_package.kronos.generation)")
    max_history_candles: int = Field(4096, ge=2, description="candles per series")
    max_pred_len: int = Field(
        512, ge=1, description="forecast steps per series; also capped by the model's max_context")
    max_series_per_request: int = Field(64, ge=1, description="distinct series_id values")
    max_sample_count: int = Field(64, ge=1, description="sampled paths per series")
    max_quantiles: int = Field(32, ge=0, description="quantile levels per request")
