"""Kronos forecasting: the PyTorch model (`model_package.kronos`), the pandas-level
forecaster, and the MLflow pyfunc wrapper (`model_package.pyfunc`)."""

from .errors import KronosInputError
from .forecaster import KronosForecaster, SamplingParams, quantile_column

__version__ = "0.1.0"

__all__ = ["KronosForecaster", "KronosInputError", "SamplingParams", "__version__", "quantile_column"]
