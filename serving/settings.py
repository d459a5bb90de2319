"""Settings of the Kronos MLServer runtime, read from `KRONOS_*` environment variables.

The batch shape (`max_batch_size` series, `max_batch_time` seconds) lives in the model's
`model-settings.json`, where MLServer users look for it; everything else is here. The
pyfunc's own settings (device, request limits, per-request budget) are
`model_package.settings.ModelSettings`; `check_server_environment` refuses any other
`KRONOS_*` variable at start-up.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_package.settings import ENV_PREFIX, MIB, ModelSettings, check_environment

from .launch_settings import LaunchSettings
from .live.settings import LiveSettings

# Variables of other programs of the project that may share an environment with the server.
OTHER_NAMESPACES = ("KRONOS_GATEWAY_", "KRONOS_BATCH_")


def default_model_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/kronos-serving/models`, `~/.cache/kronos-serving/models` without it
    (the temporary folder for a user without a home)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no passwd entry (some containers)
            base = tempfile.gettempdir()
    return Path(base) / "kronos-serving" / "models"


@dataclass(frozen=True)
class RegistryLimits:
    """What every registry request of the server may take: `timeout_s` to connect and
    again for each wait for data (whole seconds: MLflow's unit), then `retries` immediate
    retries (no backoff, no Retry-After wait). One alias check is one request: refused at
    once when the registry is down, `check_s` in all when it does not answer (a connection
    that never opens, or an answer that never comes; one that opens slowly and then hangs
    could take twice that)."""

    timeout_s: int
    retries: int

    @property
    def check_s(self) -> int:
        return (self.retries + 1) * self.timeout_s


class ServingSettings(BaseSettings):
    """Runtime knobs (environment prefix `KRONOS_`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    model_uri: str = Field("models:/kronos@champion", description="MLflow model URI; an alias is resolved at load")
    running_budget_mb: float = Field(
        2048,
        gt=0,
        description="memory of all generations running at once (MiB): request costs, and the bytes the row pool holds",
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
    model_cache_dir: Path = Field(
        default_factory=default_model_cache_dir,
        description="local copies of the served registry versions: a restart needs no registry",
    )
    model_cache_versions: int = Field(
        3, ge=1, description="versions kept per model in the cache besides those an alias names"
    )
    registry_timeout_s: int = Field(
        5, ge=1, description="timeout of a registry request (s, whole): to connect, and for each wait for data"
    )
    registry_retries: int = Field(1, ge=0, le=10, description="immediate retries of a failed registry request")

    @property
    def running_budget_bytes(self) -> int:
        return int(self.running_budget_mb * MIB)

    @property
    def queue_budget_bytes(self) -> int:
        return int(self.queue_budget_mb * MIB)

    @property
    def registry_limits(self) -> RegistryLimits:
        """The limits every registry request of the server gets, sized for `alias_poll_s`.

        With polling on, one check (all attempts: `(retries + 1) * timeout_s`) must fit in
        one poll interval P, so that checks never pile up and, after an outage, the check in
        flight fails within P: the next one answers, and a moved alias is served within 2 P
        (plus its load time). The timeout is first lowered to P / (retries + 1), never below
        1 s (MLflow reads whole seconds), then the retries to what still fits. Only P < 1 s
        cannot fit: a check may then take 1 s. Downloads get the same per-request timeout,
        which bounds each wait for data, not the whole transfer.
        """
        timeout_s, retries = self.registry_timeout_s, self.registry_retries
        if self.alias_poll_s <= 0:
            return RegistryLimits(timeout_s, retries)
        timeout_s = max(1, min(timeout_s, math.floor(self.alias_poll_s / (retries + 1))))
        retries = min(retries, max(0, math.floor(self.alias_poll_s / timeout_s) - 1))
        return RegistryLimits(timeout_s, retries)

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
    check_environment(ModelSettings, ServingSettings, LaunchSettings, LiveSettings, other_namespaces=OTHER_NAMESPACES)
