"""The cost of a request, priced from counts alone, and the per-request budget."""

from __future__ import annotations

import pytest

from model_package import KronosForecaster, KronosInputError
from model_package.budget import check_request_budget, prepared_cost, request_cost
from model_package.kronos.cost import MIB, NetworkShape, SeriesWork, generation_cost, lane_bytes
from model_package.kronos.precision import cache_value_bytes, cpu_has_native_bf16
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


def test_lanes_are_priced_at_their_cache_values_size():
    """A lane's keys and values cost `cache_value_bytes` each (bfloat16 caches: half of
    float32's); transient float32 caches (prefills, recomputed windows) do not change."""
    half = NetworkShape.of(SMALL.tokenizer_config, SMALL.model_config, 512, cache_value_bytes=2)
    assert SHAPE.cache_value_bytes == 4 and half.lane_column_bytes * 2 == SHAPE.lane_column_bytes
    assert half.kv_column_bytes == SHAPE.kv_column_bytes
    full_lane, half_lane = lane_bytes(SHAPE, 4, 2, 448, 120), lane_bytes(half, 4, 2, 448, 120)
    assert full_lane - half_lane == (4 * 448 + 8 * 120) * half.lane_column_bytes
    work = [SeriesWork(392, 120, 1)] * 8
    assert generation_cost(half, work).memory_bytes < generation_cost(SHAPE, work).memory_bytes


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
def test_request_cost_follows_the_forecasters_cache_dtype(tiny_checkpoints, precision):
    forecaster = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=64, device="cpu", dtype=precision)
    f32 = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=64, device="cpu")
    size = cache_value_bytes(precision, "cpu")
    native_bf16 = 2 if cpu_has_native_bf16() else 4  # int8's lanes: bfloat16 where it is native
    assert size == {"float32": 4, "bfloat16": 2, "int8": native_bf16}[precision]
    mine, float32 = request_cost(forecaster, [60] * 4, 20, 2), request_cost(f32, [60] * 4, 20, 2)
    assert (mine.memory_bytes < float32.memory_bytes) == (size == 2)
    assert mine.memory_bytes <= float32.memory_bytes
