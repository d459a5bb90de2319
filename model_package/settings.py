"""Serving settings of the Kronos pyfunc: device, precision, generation mode, request limits, budgets.

Read from the environment with the prefix `KRONOS_` (for example `KRONOS_DEVICE=cpu`,
`KRONOS_MAX_PRED_LEN=128`). A request over a limit is refused with a `KronosInputError`
that names the field, the limit and the value, before any generation work starts.

`check_environment` refuses `KRONOS_*` variables that no settings class of a process reads
(a typo would otherwise be ignored silently); servers call it at start-up.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "KRONOS_"
MIB = 1 << 20

# The generation precisions, as model_package.kronos.precision.PRECISIONS names them (spelled
# out here so that this module stays free of torch; a test keeps the two equal).
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "int8")


class ModelSettings(BaseSettings):
    """What a loaded Kronos pyfunc may be asked to do (all limits are per request)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    device: str = Field("auto", description='"auto" (cuda when available, else cpu), "cpu", "cuda:0"...')
    dtype: str = Field(
        "float32",
        description="generation precision: float32, bfloat16 or float16 (cuda), int8 (cpu); "
        "see model_package.kronos.precision",
    )
    generation_mode: Literal["fast", "reference", "rolling"] = Field(
        "fast", description="generator implementation (see model_package.kronos.generation)"
    )
    max_history_candles: int = Field(4096, ge=2, description="candles per series")
    max_pred_len: int = Field(
        512, ge=1, description="forecast steps per series; also capped by the model's max_context"
    )
    max_series_per_request: int = Field(64, ge=1, description="distinct series_id values")
    max_sample_count: int = Field(64, ge=1, description="sampled paths per series")
    max_quantiles: int = Field(32, ge=0, description="quantile levels per request")
    max_request_memory_mb: float = Field(
        1024, gt=0, description="memory one request may need (KV caches, activations, inputs; MiB)"
    )
    max_request_candles: int = Field(
        262_144, ge=1, description="candles one request may generate (series x sample_count x pred_len)"
    )

    @field_validator("dtype", mode="before")
    @classmethod
    def _known_dtype(cls, value: object) -> object:
        """One of DTYPES (case and surrounding blanks ignored); whether the device runs it
        is checked when the model loads."""
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in DTYPES:
            raise ValueError(f"{ENV_PREFIX}DTYPE must be one of {', '.join(DTYPES)}, got {value!r}")
        return text

    @property
    def max_request_memory_bytes(self) -> int:
        return int(self.max_request_memory_mb * MIB)


def settings_variables(*classes: type[BaseSettings]) -> set[str]:
    """The environment variable names the given settings classes read."""
    names = set()
    for cls in classes:
        prefix = str(cls.model_config.get("env_prefix", ""))
        names |= {f"{prefix}{name}".upper() for name in cls.model_fields}
    return names


def unknown_variables(
    known: Iterable[str], environ: Mapping[str, str] | None = None, other_namespaces: Iterable[str] = ()
) -> list[str]:
    """`KRONOS_*` names in `environ` (default os.environ) that are not `known` and do not
    start with one of `other_namespaces` (prefixes owned by other programs, such as the
    gateway's `KRONOS_GATEWAY_`), sorted."""
    known = {name.upper() for name in known}
    skipped = tuple(other_namespaces)
    environ = os.environ if environ is None else environ
    return sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in known
        and not (skipped and name.upper().startswith(skipped))
    )


def check_environment(
    *classes: type[BaseSettings],
    also: Iterable[str] = (),
    other_namespaces: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> None:
    """Raise ValueError naming every `KRONOS_*` variable of `environ` that none of `classes`
    (nor `also`) reads, with the closest known name as a hint."""
    known = settings_variables(*classes) | {name.upper() for name in also}
    unknown = unknown_variables(known, environ, other_namespaces)
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.75)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise ValueError(
        f"unknown {ENV_PREFIX}* environment variable(s): {', '.join(hints)}; known: {', '.join(sorted(known))}"
    )
