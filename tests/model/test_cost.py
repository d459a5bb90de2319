"""The cost of a request, priced from counts alone, and the per-request budget."""

from __future__ import annotations

import pytest

from model_package import KronosForecaster, KronosInputError
from model_package.budget import check_request_budget, prepared_cost, request_cost
from model_package.kronos.cost import MIB, NetworkShape, SeriesWork, generation_cost
from model_package.kronos.presets import preset_by_name
from model_package.pyfunc import prepare_request
from model_package.settings import ModelSettings

SMALL = preset_by_name("NeoQuasar/Kronos-small")
SHAPE = NetworkShape.of(SMALL.tokenizer_config, SMALL.model_config, 512)


def cost(series: int = 1, history: int = 400, pred_len: int = 120, paths: int = 1, mode: str = "fast") -> int:
    return generation_cost(SHAPE, [SeriesWork(history, pred_len, paths)] * series, mode).memory_bytes


def test_cost_grows_with_every_dimension():
    base = cost()
    assert cost(series=2) > base and cost(history=480) > base
    assert cost(pred_len=200) > base and cost(paths=2) > base
    assert 40 * MIB < base < 120 * MIB  # one 400 -> 120 series of Kronos-small: tens of MiB


def test_the_window_and_the_horizon_bound_the_cache():
    """History beyond the window costs only its tokens and inputs, not more cache."""
    assert cost(history=4096) - cost(history=512) < 64 * MIB
    assert cost(series=64, paths=64) > 16 * 1024 * MIB  # the product is what explodes


def test_candles_are_series_times_paths_times_steps():
    assert generation_cost(SHAPE, [SeriesWork(100, 7, 3)] * 5).candles == 5 * 3 * 7


def test_batching_costs_no_more_than_the_parts_when_shapes_match():
    alone = cost(series=1)
    together = generation_cost(SHAPE, [SeriesWork(400, 120, 1)] * 8).memory_bytes
    assert together <= 8 * alone


def test_over_budget_is_refused_naming_the_budget_and_the_cost():
    settings = ModelSettings(max_request_memory_mb=100, max_request_candles=1000)
    check_request_budget(generation_cost(SHAPE, [SeriesWork(400, 120, 1)]), settings)
    with pytest.raises(
        KronosInputError, match=r"request: needs \d+ MiB .* budget of 100 MiB \(max_request_memory_mb\)"
    ):
        check_request_budget(generation_cost(SHAPE, [SeriesWork(400, 120, 1)] * 4), settings)
    with pytest.raises(KronosInputError, match=r"generates 1200 candles .* \(max_request_candles\)"):
        check_request_budget(generation_cost(SHAPE, [SeriesWork(10, 100, 12)]), ModelSettings(max_request_candles=1000))


def test_the_pyfunc_prices_before_preparing(tiny_checkpoints, candles):
    forecaster = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=128, device="cpu")
    history = candles(60, series_id="A")
    params = {"pred_len": 20, "sample_count": 32}
    priced = request_cost(forecaster, [60], 20, 32, 60)
    prepared = prepare_request(forecaster, history, params, ModelSettings())
    assert prepared_cost(forecaster, prepared) == priced
    tight = ModelSettings(max_request_memory_mb=(priced.memory_bytes - 1) / MIB)
    with pytest.raises(KronosInputError, match="max_request_memory_mb"):
        prepare_request(forecaster, history, params, tight)
