"""Settings of the Kronos MLServer runtime, read from `KRONOS_*` environment variables.

The batch shape (`max_batch_size` series, `max_batch_time` seconds) lives in the model's
`model-settings.json`, where MLServer users look for it; everything else is here. The
pyfunc's own settings (device, request limits, per-request budget) are
`model_package.settings.ModelSettings`; `check_server_environment` refuses any other
`KRONOS_*` variable at start-up.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_package.settings import ENV_PREFIX, MIB, ModelSettings, check_environment

# Variables of other programs of the project that may share an environment with the server.
OTHER_NAMESPACES = ("KRONOS_GATEWAY_",)


class ServingSettings(BaseSettings):
    """Runtime knobs (environment prefix `KRONOS_`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    model_uri: str = Field("models:/kronos@champion", description="MLflow model URI; an alias is resolved at load")
    running_budget_mb: float = Field(
        2048, gt=0, description="memory of all generations running at once (MiB, request costs)"
    )
    queue_budget_mb: float = Field(
        4096, gt=0, description="cost of the requests waiting for the worker (MiB); beyond: 503"
    )
    default_deadline_s: float = Field(300.0, gt=0, description="per-request deadline; clients may lower it (timeout_s)")
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with every 503")
    alias_poll_s: float = Field(0.0, ge=0, description="seconds between alias checks; 0 = only on explicit reload")
    warmup: bool = Field(True, description="run one small forecast before reporting ready")
    stall_s: float = Field(120.0, gt=0, description="a running worker without a generation step for this long is stuck")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch default")
    max_request_rows: int = Field(200_000, ge=2, description="history rows per request")
    log_level: str = Field("INFO", description="level of the kronos.* loggers")

    @property
    def running_budget_bytes(self) -> int:
        return int(self.running_budget_mb * MIB)

    @property
    def queue_budget_bytes(self) -> int:
        return int(self.queue_budget_mb * MIB)

    @model_validator(mode="after")
    def _budgets_fit(self) -> ServingSettings:
        request_mb = ModelSettings().max_request_memory_mb
        for name in ("running_budget_mb", "queue_budget_mb"):
            if getattr(self, name) < request_mb:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be >= max_request_memory_mb "
                    f"({request_mb}): the largest allowed request must fit"
                )
        return self


def check_server_environment() -> None:
    """Refuse unknown `KRONOS_*` variables (typos) before the server serves anything."""
    check_environment(ModelSettings, ServingSettings, other_namespaces=OTHER_NAMESPACES)
