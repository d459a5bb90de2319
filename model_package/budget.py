"""The cost of a forecast request, from counts alone, and the per-request budget.

    cost = request_cost(forecaster, history_lengths=[400, 380], pred_len=120, sample_count=4)
    check_request_budget(cost, settings)   # KronosInputError when over max_request_* limits

The memory model is `model_package.kronos.cost`; this module applies it to a forecaster
(its networks, window and generation mode) and to the settings' budgets.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import KronosInputError
from .forecaster import KronosForecaster, PreparedRequest
from .kronos.cost import GenerationCost, NetworkShape, SeriesWork, generation_cost
from .kronos.precision import cache_value_bytes
from .settings import MIB, ModelSettings

BUDGET_FIELD = "request"


def network_shape(forecaster: KronosForecaster) -> NetworkShape:
    """The sizes of the forecaster's networks, window and cache values that decide memory."""
    cache_bytes = cache_value_bytes(forecaster.dtype, forecaster.device)
    return NetworkShape.of(forecaster.tokenizer.config, forecaster.model.config, forecaster.max_context, cache_bytes)


def request_cost(
    forecaster: KronosForecaster,
    history_lengths: Sequence[int],
    pred_len: int,
    sample_count: int,
    history_rows: int | None = None,
) -> GenerationCost:
    """Memory (bytes) and candles of forecasting series of these history lengths alone."""
    work = [SeriesWork(int(length), int(pred_len), int(sample_count)) for length in history_lengths]
    return generation_cost(network_shape(forecaster), work, forecaster.mode, history_rows)


def prepared_cost(forecaster: KronosForecaster, request: PreparedRequest) -> GenerationCost:
    """The cost of an already prepared request (same numbers as `request_cost`)."""
    lengths = [len(s.series.candles) for s in request.series]
    return request_cost(forecaster, lengths, request.params.pred_len, request.params.sample_count, sum(lengths))


def check_request_budget(cost: GenerationCost, settings: ModelSettings) -> None:
    """Refuse a request whose cost is over `max_request_memory_mb` or `max_request_candles`."""
    if cost.memory_bytes > settings.max_request_memory_bytes:
        raise KronosInputError(
            BUDGET_FIELD,
            f"needs {cost.memory_bytes / MIB:.0f} MiB of memory (series x sample_count x "
            f"(history + pred_len)), over the budget of {settings.max_request_memory_mb:g} MiB "
            "(max_request_memory_mb); send fewer series, sample paths or steps",
        )
    if cost.candles > settings.max_request_candles:
        raise KronosInputError(
            BUDGET_FIELD,
            f"generates {cost.candles} candles (series x sample_count x pred_len), over the "
            f"budget of {settings.max_request_candles} (max_request_candles)",
        )
