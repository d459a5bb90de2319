"""Settings of the Kronos MLServer runtime, read from `KRONOS_*` environment variables.

The batch shape (`max_batch_size` series, `max_batch_time` seconds) lives in the model's
`model-settings.json`, where MLServer users look for it; everything else is here.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServingSettings(BaseSettings):
    """Runtime knobs (environment prefix `KRONOS_`)."""

    model_config = SettingsConfigDict(env_prefix="KRONOS_", extra="ignore")

    model_uri: str = Field("models:/kronos@champion",
                           description="MLflow model URI; an alias is resolved at load")
    queue_capacity_series: int = Field(
        256, ge=1, description="series allowed to wait for the generation worker; beyond: 503")
    default_deadline_s: float = Field(
        300.0, gt=0, description="per-request deadline; clients may lower it (timeout_s)")
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 503 overload")
    alias_poll_s: float = Field(
        0.0, ge=0, description="seconds between alias checks; 0 = only on explicit reload")
    warmup: bool = Field(True, description="run one small forecast before reporting ready")
    stall_s: float = Field(
        120.0, gt=0, description="a running worker without a generation step for this long is stuck")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch default")
    max_request_rows: int = Field(200_000, ge=2, description="history rows per request")
