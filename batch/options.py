"""What one batch job is asked to do: sampling settings, history cut, chunking; and the
per-series seeds that make sampled paths independent of how Spark partitions the input.

Configuration comes from the `kronos-batch` command line; its defaults come from
`BatchSettings` (environment variables `KRONOS_BATCH_*`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pandas as pd
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_package.errors import KronosInputError
from model_package.forecaster import SamplingParams, series_seed
from model_package.settings import ENV_PREFIX, settings_variables, unknown_variables

BATCH_ENV_PREFIX = f"{ENV_PREFIX}BATCH_"
DEFAULT_MODEL_URI = "models:/kronos@champion"


class BatchSettings(BaseSettings):
    """Defaults of `kronos-batch` (each one also a command-line option)."""

    model_config = SettingsConfigDict(env_prefix=BATCH_ENV_PREFIX, extra="ignore")

    model_uri: str = Field(DEFAULT_MODEL_URI, description="MLflow model URI: alias, version or run")
    master: str = Field("local[*]", description="Spark master URL (local[*]: every core of this machine)")
    chunk_series: int = Field(64, ge=1, description="series generated together in one forecaster call")
    worker_threads: int = Field(
        0, ge=0, description="torch threads per Python worker; 0: the cores of a local master / its slots"
    )
    experiment: str = Field("kronos-batch", description="MLflow experiment of the job's run")


def check_batch_environment(environ: dict[str, str] | None = None) -> None:
    """Refuse `KRONOS_BATCH_*` variables that BatchSettings does not read (typos)."""
    import os

    environ = dict(os.environ if environ is None else environ)
    scoped = {k: v for k, v in environ.items() if k.upper().startswith(BATCH_ENV_PREFIX)}
    unknown = unknown_variables(settings_variables(BatchSettings), scoped)
    if unknown:
        known = ", ".join(sorted(settings_variables(BatchSettings)))
        raise ValueError(f"unknown {BATCH_ENV_PREFIX}* environment variable(s): {', '.join(unknown)}; known: {known}")


@dataclass(frozen=True)
class BatchOptions:
    """One job's settings, as every worker sees them.

    `params.seed` is the job's base seed (never None here: the driver draws one when the
    user gives none, so that every job can be replayed). `as_of`: naive timestamp of the
    cut-off (history <= as_of; the candles after it are the realised values). `last`: keep
    only the last N candles of each series' history."""

    params: SamplingParams
    model_version: str
    as_of: pd.Timestamp | None = None
    last: int | None = None
    chunk_series: int = 64

    def __post_init__(self) -> None:
        if self.params.seed is None:
            raise ValueError("BatchOptions.params.seed must be set (the driver draws one)")
        if self.last is not None and self.last < 2:
            raise KronosInputError("last", f"must be >= 2 (a series needs two candles), got {self.last}")
        if self.chunk_series < 1:
            raise KronosInputError("chunk_series", f"must be >= 1, got {self.chunk_series}")


def id_seed(seed: int, series_id: object) -> int:
    """The seed of one series of a job drawn with `seed` (0 .. 2**64 - 1).

    It depends on the series id's text only (`7` and `"7"` are the same series), never on
    which other series share its partition or chunk: a series' paths equal
    `pyfunc.predict` of that series alone with `seed=id_seed(seed, series_id)`."""
    digest = hashlib.blake2b(str(series_id).encode("utf-8"), digest_size=8).digest()
    return series_seed(seed, int.from_bytes(digest, "big"))


def parse_as_of(text: str | None) -> pd.Timestamp | None:
    """`--as-of` as a naive timestamp (a zone-aware one is converted to UTC wall time,
    as Spark's session time zone reads instants)."""
    if text is None or not str(text).strip():
        return None
    try:
        stamp = pd.Timestamp(str(text).strip())
    except (ValueError, TypeError) as exc:
        raise KronosInputError("as_of", f"not a timestamp: {text!r} ({exc})") from None
    if stamp is pd.NaT:
        raise KronosInputError("as_of", f"not a timestamp: {text!r}")
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp
