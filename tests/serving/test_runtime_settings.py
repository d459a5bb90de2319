"""The runtime takes max_batch_size/max_batch_time for its own batcher and MLServer's
row-concatenating adaptive batcher never wraps it (real MLServer code, no server)."""

from __future__ import annotations

import asyncio
import json

import pytest
from mlserver.batching.hooks import load_batching
from mlserver.settings import ModelSettings

from serving.runtime import BATCH_SERIES_KEY, BATCH_TIME_KEY, KronosRuntime


def settings(**values: object) -> ModelSettings:
    return ModelSettings(name="kronos", implementation=KronosRuntime, **values)


def test_batch_shape_is_ours_and_mlserver_batching_stays_off():
    model_settings = settings(max_batch_size=32, max_batch_time=0.2)
    runtime = KronosRuntime(model_settings)
    assert (runtime.batch_series, runtime.batch_time_s) == (32, 0.2)
    assert model_settings.max_batch_size == 0 and model_settings.max_batch_time == 0
    original = runtime.predict
    assert asyncio.run(load_batching(runtime)) is runtime
    assert runtime.predict == original  # not wrapped by MLServer's AdaptiveBatcher


def test_worker_copy_of_the_settings_keeps_the_batch_shape():
    main = settings(max_batch_size=16, max_batch_time=0.1)
    KronosRuntime(main)  # the main process instance rewrites the settings ...
    # ... and sent to the worker the way MLServer's ModelUpdateMessage does it
    worker_settings = ModelSettings.parse_raw(json.dumps(main.model_dump(by_alias=True)))
    runtime = KronosRuntime(worker_settings)
    assert (runtime.batch_series, runtime.batch_time_s) == (16, 0.1)
    assert worker_settings.parameters.extra[BATCH_SERIES_KEY] == 16
    assert worker_settings.parameters.extra[BATCH_TIME_KEY] == 0.1


def test_metrics_survive_a_module_reload():
    import importlib

    import serving.metrics

    first = serving.metrics.KronosMetrics()
    reloaded = importlib.reload(serving.metrics)  # what MLServer does on every model load
    second = reloaded.KronosMetrics()
    assert second.requests is first.requests and second.ready is first.ready


@pytest.mark.integration
def test_bootstrap_keeps_an_existing_champion(serving_registry, tmp_path):
    import mlflow

    from serving.bootstrap import ensure_champion

    def versions() -> list[str]:
        found = serving_registry.client().search_model_versions("name='kronos'")
        return sorted(str(v.version) for v in found)

    before = versions()
    previous = mlflow.get_tracking_uri()
    try:
        assert ensure_champion(serving_registry.tracking_uri, tmp_path) == "1"
    finally:
        mlflow.set_tracking_uri(previous)
    assert versions() == before  # nothing registered
