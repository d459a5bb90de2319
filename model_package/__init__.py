"""Kronos forecasting: the PyTorch model (`model_package.kronos`), the pandas-level
forecaster, and the MLflow pyfunc wrapper (`model_package.pyfunc`).

The forecaster (torch, pandas) is imported on first use, so that light modules of the
package (`credentials`, `errors`, `settings`) cost no torch import in processes that only
need them (the MLflow server's auth app, `kronos-registry history`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import KronosInputError

if TYPE_CHECKING:
    from .forecaster import KronosForecaster, SamplingParams, quantile_column

__version__ = "0.1.0"

__all__ = ["KronosForecaster", "KronosInputError", "SamplingParams", "__version__", "quantile_column"]
_FORECASTER_NAMES = ("KronosForecaster", "SamplingParams", "quantile_column")


def __getattr__(name: str) -> Any:
    if name in _FORECASTER_NAMES:
        from . import forecaster

        return getattr(forecaster, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
