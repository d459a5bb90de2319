"""`KronosRuntime`: the thin MLServer adapter around our batcher and the Kronos pyfunc.

MLServer does the transport (V2 REST + gRPC, metrics port, model repository); this
module decodes requests, validates them with the pyfunc's own `prepare_request`, hands
them to `SeriesBatcher` and maps the outcome to a V2 response or an MLServer error.

MLServer's adaptive batcher concatenates requests row-wise and corrupts forecasts (see
docs/serving-design.md), so `max_batch_size` / `max_batch_time` from model-settings.json
are taken over for our series-aware batcher and MLServer's own is switched off.

Every request is priced before it is queued (`model_package.budget`): over the
per-request budget it is a 400, when the queue's budget is taken a 503. A request whose
client went away is cancelled here (see `serving.patches.workers`) and leaves generation
at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

import pandas as pd
import torch
from fastapi import Depends, Request, Response
from mlserver.errors import MLServerError
from mlserver.handlers import custom_handler
from mlserver.model import MLModel
from mlserver.settings import ModelParameters
from mlserver.settings import ModelSettings as MLServerModelSettings
from mlserver.types import InferenceRequest, InferenceResponse, MetadataModelResponse, Parameters

from model_package import KronosInputError
from model_package.forecaster import ANSWER_ATTR, Forecast, PreparedRequest
from model_package.pyfunc import prepare_request
from model_package.scoring import parse_scoring_request

from . import patches
from .batcher import (
    BatcherClosedError,
    BatcherConfig,
    DeadlineExceededError,
    OverloadedError,
    SeriesBatcher,
)
from .errors import (
    BadForecastInputError,
    ForecastFailedError,
    ForecastTimeoutError,
    LiveStoreUnavailableError,
    ModelNotReadyError,
    ServerOverloadedError,
)
from .live.recorder import Answer, LiveRecorder
from .live.settings import LiveSettings
from .loader import (
    LoadedModel,
    RegistryUnavailableError,
    ResolvedUri,
    fetch,
    is_registry_uri,
    load_model,
    locate,
    open_cache,
    remember,
    resolve_uri,
)
from .logs import REQUEST_ID_HEADER, configure_json_logging, log_request, request_id_from
from .metrics import KronosMetrics, rss_bytes
from .model_cache import ModelCache
from .registry_health import (
    RegistryHealth,
    apply_registry_limits,
    one_line,
    unreachable_cause,
)
from .settings import ServingSettings, check_server_environment
from .v2 import answer_parameters, pop_timeout, request_frame, request_params, response
from .warmup import warmup_history

logger = logging.getLogger("kronos.serving")
request_logger = logging.getLogger("kronos.serving.requests")

BATCH_SERIES_KEY = "kronos_max_batch_series"
BATCH_TIME_KEY = "kronos_max_batch_time_s"
UNLOAD_GRACE_S = 1.0  # an unloaded model still takes requests routed to it this long
# MLServer importlib.reload()s this module on every (re)load, which re-runs this code in the
# same module namespace: keep these two sets across reloads.
_background: set[asyncio.Task] = globals().get("_background", set())  # drains (strong refs)
_serving: set[KronosRuntime] = globals().get("_serving", set())  # loaded runtime instances


def claim_batching(settings: MLServerModelSettings) -> tuple[int, float]:
    """Take `max_batch_size` (series) and `max_batch_time` (s) for our batcher and switch
    MLServer's adaptive batcher off (it only activates for max_batch_size > 1).

    The values are moved into `parameters.extra` because MLServer sends these settings
    to its worker process, where this runs again and must still find them.
    """
    if settings.parameters is None:
        settings.parameters = ModelParameters()
    extra = settings.parameters.extra if settings.parameters.extra is not None else {}
    defaults = BatcherConfig()
    series = (
        settings.max_batch_size
        if settings.max_batch_size > 0
        else int(extra.get(BATCH_SERIES_KEY, defaults.max_batch_series))
    )
    seconds = (
        settings.max_batch_time
        if settings.max_batch_time > 0
        else float(extra.get(BATCH_TIME_KEY, defaults.max_batch_time_s))
    )
    settings.parameters.extra = {**extra, BATCH_SERIES_KEY: series, BATCH_TIME_KEY: seconds}
    settings.max_batch_size, settings.max_batch_time = 0, 0.0
    return series, seconds


async def _raw_body(request: Request) -> bytes:
    return await request.body()


async def _request_id(request: Request) -> str | None:
    return request.headers.get(REQUEST_ID_HEADER)


class KronosRuntime(MLModel):
    """Serves `KRONOS_MODEL_URI` (an MLflow Kronos pyfunc) with series-aware batching."""

    def __init__(self, settings: MLServerModelSettings) -> None:
        check_server_environment()  # a typo in a KRONOS_* variable stops the start-up here
        patches.install(ServingSettings().retry_after_s)  # already there; sets Retry-After
        self.batch_series, self.batch_time_s = claim_batching(settings)
        super().__init__(settings)
        self._loaded: LoadedModel | None = None
        self._batcher: SeriesBatcher | None = None
        self._poller: asyncio.Task | None = None
        self._cache: ModelCache | None = None
        self._live: LiveRecorder | None = None
        self._live_refresher: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def load(self) -> bool:
        """Resolve the alias (from the model cache when the registry does not answer), load
        the pyfunc, warm up, then report ready."""
        self.config = ServingSettings()
        configure_json_logging(self.config.log_level)  # idempotent (reloads)
        self._limit_registry_calls()
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.metrics = KronosMetrics()
        self._registry = RegistryHealth(self.metrics, logger)
        self._cache = self._open_cache()
        self.metrics.queue_budget.set(self.config.queue_budget_bytes)
        self.metrics.running_budget.set(self.config.running_budget_bytes)
        self._batcher = SeriesBatcher(
            BatcherConfig(
                self.batch_series,
                self.batch_time_s,
                self.config.running_budget_bytes,
                self.config.queue_budget_bytes,
                self.config.retry_after_s,
            ),
            self.metrics,
        )
        self._batcher.start()
        self._start_live()
        try:
            loaded = await self._load(self.config.model_uri)
        except RegistryUnavailableError as exc:  # one line says it all
            logger.error("could not load %s: %s", self.config.model_uri, exc)
            await self._stop_after_failed_load()
            raise
        except Exception:
            logger.exception("could not load %s", self.config.model_uri)
            await self._stop_after_failed_load()
            raise
        self._serve(loaded)
        if self.config.alias_poll_s > 0 and loaded.source.alias is not None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_alias())
        _serving.add(self)
        self.metrics.ready.set(1)
        self.metrics.last_progress.set(time.time())
        self.metrics.resident_memory.set(rss_bytes())
        return True

    async def _stop_after_failed_load(self) -> None:
        assert self._batcher is not None
        await self._batcher.drain_and_stop(0)
        self._batcher = None
        if self._live_refresher is not None:
            self._live_refresher.cancel()
        if self._live is not None:
            await asyncio.to_thread(self._live.close)
            self._live = None

    def _limit_registry_calls(self) -> None:
        """Bound every registry request of this worker before its first one (see
        `ServingSettings.registry_limits`); say so when the settings were lowered to fit."""
        limits = self.config.registry_limits
        apply_registry_limits(limits)
        if (limits.timeout_s, limits.retries) != (self.config.registry_timeout_s, self.config.registry_retries):
            logger.info(
                "registry requests: timeout %d s, %d retries (KRONOS_REGISTRY_TIMEOUT_S=%d and "
                "KRONOS_REGISTRY_RETRIES=%d lowered to fit one check in KRONOS_ALIAS_POLL_S=%g)",
                limits.timeout_s,
                limits.retries,
                self.config.registry_timeout_s,
                self.config.registry_retries,
                self.config.alias_poll_s,
            )

    def _open_cache(self) -> ModelCache | None:
        """The local model cache; None (and one WARNING) when its folder is unusable."""
        try:
            return open_cache(self.config.model_cache_dir, self.config.model_cache_versions)
        except OSError as exc:
            logger.warning(
                "model cache unusable (KRONOS_MODEL_CACHE_DIR: %s); loading from the registry only, "
                "a restart will need it",
                one_line(exc),
            )
            return None

    async def _locate(self, uri: str) -> ResolvedUri:
        """Where `uri` loads from: the registry's answer (its version fetched into the cache)
        or, without one, the cached version. A registry look-up is a check (counted)."""
        if not is_registry_uri(uri):
            self.metrics.registry_up.set(1)  # no registry in use: nothing is down
            return resolve_uri(uri)
        try:
            source = await asyncio.to_thread(locate, uri, self._cache)
        except Exception as exc:
            cause = unreachable_cause(exc)
            self._registry.failed(cause or one_line(exc), reachable=cause is None, consequence=None)
            raise
        if source.offline is None:
            self._registry.ok()
        else:
            served = f"serving cached {source.name} version {source.version} ({source.offline.description})"
            self._registry.failed(source.offline.cause, reachable=False, consequence=served)
        return source

    async def _load(self, uri: str, source: ResolvedUri | None = None) -> LoadedModel:
        """Load `uri` (`source`: already resolved by an alias check), warm it up, and record
        the alias' version in the model cache."""
        if source is None:
            source = await self._locate(uri)
        elif self._cache is not None:
            source = await asyncio.to_thread(fetch, source, self._cache)
        logger.info("loading %s version %s from %s", uri, source.version, source.load_uri)
        loaded = await asyncio.to_thread(load_model, source)
        if self.config.warmup:
            request = prepare_request(loaded.forecaster, warmup_history(), {"pred_len": 2, "top_k": 1}, loaded.settings)
            assert self._batcher is not None
            await self._batcher.submit(loaded.forecaster, request, self.config.default_deadline_s)
        await self._remember(source)
        return loaded

    async def _remember(self, source: ResolvedUri) -> None:
        """Record the alias' version in the cache and evict old versions (a full or
        read-only disk costs the next offline restart, not this load)."""
        try:
            await asyncio.to_thread(remember, source, self._cache)
        except OSError as exc:
            logger.warning("could not update the model cache: %s", one_line(exc))

    def _serve(self, loaded: LoadedModel) -> None:
        self._loaded = loaded  # requests prepared earlier keep their own forecaster
        self.metrics.serving(loaded.source.requested, loaded.version)
        logger.info("serving %s version %s", loaded.source.requested, loaded.version)

    async def _poll_alias(self) -> None:
        """Swap to the alias' new version whenever it moves (KRONOS_ALIAS_POLL_S).

        A check is one registry call bounded by `ServingSettings.registry_limits` (it fits
        in one interval), so after an outage the first check that gets an answer sees a
        moved alias: a promotion is served within two intervals plus its load time. Every
        check is counted; a run of failed ones logs one WARNING, its end one INFO.
        """
        uri, interval = self.config.model_uri, self.config.alias_poll_s
        while True:
            await asyncio.sleep(interval)
            current = self._loaded
            served = f"keeps serving version {current.version}" if current is not None else "nothing served"
            try:
                source = await asyncio.to_thread(resolve_uri, uri)
            except Exception as exc:  # keep serving the current version
                cause = unreachable_cause(exc)
                consequence = f"{served}, checks every {interval:g} s"
                self._registry.failed(cause or one_line(exc), reachable=cause is None, consequence=consequence)
                continue
            recovered = self._registry.ok() is not None
            if current is None:
                continue
            if source.version == current.version and source.identity == current.source.identity:
                if recovered:  # the cached alias record is confirmed
                    await self._remember(source)
                continue
            logger.info(
                "%s moved from version %s to %s (successful check %d of this worker); loading it",
                uri,
                current.version,
                source.version,
                self._registry.ok_checks,
            )
            try:
                self._serve(await self._load(uri, source))
            except Exception as exc:
                cause = unreachable_cause(exc)
                if cause is None:
                    logger.exception("could not load %s version %s; %s", uri, source.version, served)
                else:
                    consequence = f"could not download version {source.version}, {served}"
                    self._registry.failed(cause, reachable=False, consequence=consequence)

    async def unload(self) -> bool:
        """Stop polling; queued and running requests finish in the background."""
        _serving.discard(self)
        if self._loaded is not None:
            self.metrics.ready.set(1 if _serving else 0)  # a reload's new instance is ready
        if self._poller is not None:
            self._poller.cancel()
        if self._live_refresher is not None:
            self._live_refresher.cancel()
        if self._batcher is not None:
            task = asyncio.get_running_loop().create_task(self._drain(self._batcher, self._live))
            _background.add(task)
            task.add_done_callback(_background.discard)
        return True

    async def _drain(self, batcher: SeriesBatcher, live: LiveRecorder | None) -> None:
        await asyncio.sleep(UNLOAD_GRACE_S)
        await batcher.drain_and_stop(self.config.default_deadline_s)
        if live is not None:  # the drained answers are recorded first
            await asyncio.to_thread(live.close)

    # -- live accuracy ---------------------------------------------------------------------

    def _start_live(self) -> None:
        """The live recorder (its store opens on first use) and the gauge refresher."""
        self._live = LiveRecorder(LiveSettings(), self.metrics)
        if self._live.settings.refresh_s > 0:
            self._live_refresher = asyncio.get_running_loop().create_task(self._refresh_live_forever())

    async def _refresh_live_forever(self) -> None:
        live = self._live
        assert live is not None
        failing = False
        while True:
            await asyncio.sleep(live.settings.refresh_s)
            try:
                await asyncio.to_thread(live.refresh)
            except Exception as exc:  # the store is down: keep serving, say so once per outage
                if not failing:
                    logger.warning("live accuracy: could not read the live store: %s", one_line(exc))
                failing = True
                continue
            if failing:
                logger.info("live accuracy: the live store answers again")
            failing = False

    def _record_live(self, request_id: str, loaded: LoadedModel, request: PreparedRequest, forecast: Forecast) -> None:
        """Offer a sampled answer to the live recorder (never waits for the store)."""
        live = self._live
        if live is None or not live.wants(request_id):
            return
        source = loaded.source
        answer = Answer(
            request_id, source.requested, loaded.version, source.alias or "", request, forecast, time.time()
        )
        live.offer(answer)

    # -- inference -------------------------------------------------------------------------

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """One V2 request: decode, validate, price, batch, encode."""
        loaded = self._loaded
        headers = payload.parameters.headers if payload.parameters is not None else None
        request_id = request_id_from(headers) or uuid.uuid4().hex
        frame, loaded = await self._forecast(
            lambda: (request_frame(payload), request_params(payload)), loaded, request_id
        )
        outputs = [o.name for o in payload.outputs] if payload.outputs else None
        try:
            parameters = self._response_parameters(loaded, request_id, frame.attrs.get(ANSWER_ATTR))
            return response(self.name, frame, parameters, payload.id, outputs)
        except KronosInputError as exc:  # outputs the request asked for that it has not
            raise BadForecastInputError(str(exc)) from exc

    async def _forecast(
        self, decode: Any, loaded: LoadedModel | None, request_id: str
    ) -> tuple[pd.DataFrame, LoadedModel]:
        """Run one request through the batcher, counting its outcome; MLServer errors out."""
        if loaded is None or self._batcher is None:
            raise ModelNotReadyError("model is not loaded yet")
        started = time.perf_counter()
        outcome = "error"
        request = None
        timings: dict[str, float] = {}
        failure: BaseException | None = None
        try:
            self._batcher.reject_if_full()  # cheap refusal before decoding under overload
            history, params = await asyncio.to_thread(decode)  # big bodies: off the event loop
            deadline_s = pop_timeout(params, self.config.default_deadline_s)
            if len(history) > self.config.max_request_rows:
                raise KronosInputError(
                    "inputs", f"must have <= {self.config.max_request_rows} rows (max_request_rows), got {len(history)}"
                )
            request = await asyncio.to_thread(prepare_request, loaded.forecaster, history, params, loaded.settings)
            forecast = await self._batcher.submit(loaded.forecaster, request, deadline_s, timings)
            self._record_live(request_id, loaded, request, forecast)
            outcome = "ok"
            return forecast.frame, loaded
        except KronosInputError as exc:
            outcome, failure = "invalid", exc
            raise BadForecastInputError(str(exc)) from exc
        except OverloadedError as exc:
            outcome, failure = "overloaded", exc
            raise ServerOverloadedError(str(exc)) from exc
        except DeadlineExceededError as exc:
            outcome, failure = "timeout", exc
            raise ForecastTimeoutError(str(exc)) from exc
        except BatcherClosedError as exc:
            outcome, failure = "unavailable", exc
            raise ModelNotReadyError(str(exc)) from exc
        except asyncio.CancelledError as exc:  # the client went away (see serving.patches)
            outcome, failure = "cancelled", exc
            raise
        except MLServerError as exc:
            failure = exc
            raise
        except Exception as exc:
            failure = exc
            logger.exception("forecast failed")
            raise ForecastFailedError(f"forecast failed: {type(exc).__name__}: {exc}") from exc
        finally:
            total_s = time.perf_counter() - started
            self.metrics.outcome(outcome, loaded.version)
            self.metrics.request_seconds.observe(total_s)
            log_request(
                request_logger,
                request_id=request_id,
                model_version=loaded.version,
                outcome=outcome,
                series=len(request.series) if request is not None else None,
                horizon=request.params.pred_len if request is not None else None,
                sample_count=request.params.sample_count if request is not None else None,
                queue_wait_s=timings.get("queue_wait_s"),
                inference_s=timings.get("inference_s"),
                total_s=total_s,
                error=failure,
            )

    def _response_parameters(
        self, loaded: LoadedModel, request_id: str | None = None, facts: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The served model, what makes the answer replayable (`answer_parameters`), and the
        request id echoed as a header (REST) or trailing metadata (gRPC)."""
        parameters: dict[str, Any] = {"model_uri": loaded.source.requested, "model_version": loaded.version}
        if facts is not None:
            parameters.update(answer_parameters(facts))
        if request_id is not None:
            parameters["headers"] = {REQUEST_ID_HEADER: request_id}
        return parameters

    async def metadata(self) -> MetadataModelResponse:
        """MLServer's metadata plus the served registry version and the batch shape."""
        meta = await super().metadata()
        loaded = self._loaded
        if loaded is not None:
            meta.versions = [loaded.version]
            meta.parameters = Parameters(
                content_type="pd",
                **self._response_parameters(loaded),
                max_batch_size=self.batch_series,
                max_batch_time=self.batch_time_s,
                max_context=loaded.forecaster.max_context,
            )
        meta.platform = "kronos-mlflow-pyfunc"
        return meta

    # -- extra REST routes -----------------------------------------------------------------

    @custom_handler(rest_path="/invocations", rest_method="POST")
    async def invocations(
        self, raw_body: bytes = Depends(_raw_body), request_id: str | None = Depends(_request_id)
    ) -> Response:
        """The MLflow scoring protocol: `{"dataframe_split"|"dataframe_records": ...,
        "params": {...}}` -> `{"predictions": [...]}`; same batching and errors as V2."""
        request_id = request_id_from({REQUEST_ID_HEADER: request_id}) or uuid.uuid4().hex
        frame, loaded = await self._forecast(lambda: parse_scoring_request(raw_body), self._loaded, request_id)
        records = json.loads(
            frame.assign(timestamp=frame["timestamp"].map(lambda t: t.isoformat())).to_json(
                orient="records", double_precision=15
            )
        )
        body = {"predictions": records, **self._response_parameters(loaded, facts=frame.attrs.get(ANSWER_ATTR))}
        return Response(
            content=json.dumps(body), media_type="application/json", headers={REQUEST_ID_HEADER: request_id}
        )

    @custom_handler(rest_path="/kronos/live/actuals", rest_method="POST")
    async def live_actuals(self, raw_body: bytes = Depends(_raw_body)) -> dict[str, Any]:
        """Realised candles for live accuracy, as an MLflow scoring body (`dataframe_split` or
        `dataframe_records`) with `series_id` (optional), `timestamp` and `close` -> `{"received":
        rows}`; the accuracy gauges are recomputed at once. Operators and ingest jobs only (the
        gateway lets ADMIN_CIDRS through)."""
        live = self._live
        if live is None:
            raise ModelNotReadyError("model is not loaded yet")
        try:
            frame, params = await asyncio.to_thread(parse_scoring_request, raw_body)
            if params:
                raise KronosInputError("params", "not accepted with realised candles")
            written = await asyncio.to_thread(live.add_actuals, frame)
        except KronosInputError as exc:
            raise BadForecastInputError(str(exc)) from exc
        except Exception as exc:
            logger.warning("live accuracy: could not store realised candles: %s", one_line(exc))
            raise LiveStoreUnavailableError(f"live store unavailable: {one_line(exc)}") from exc
        table = await self._live_table(live)
        return {"received": written, "accuracy": table}

    @custom_handler(rest_path="/kronos/live/accuracy", rest_method="GET")
    async def live_accuracy(self) -> dict[str, Any]:
        """The live accuracy table (one row per model version, role and horizon bucket) over
        the rolling window, recomputed now."""
        live = self._live
        if live is None:
            raise ModelNotReadyError("model is not loaded yet")
        return {"window_s": live.settings.window_s, "accuracy": await self._live_table(live)}

    async def _live_table(self, live: LiveRecorder) -> list[dict[str, Any]]:
        """Flush the recorder's queue (bounded), refresh the gauges, return the table's rows."""
        await asyncio.to_thread(live.flush, 10.0)
        try:
            table = await asyncio.to_thread(live.refresh)
        except Exception as exc:
            raise LiveStoreUnavailableError(f"live store unavailable: {one_line(exc)}") from exc
        return json.loads(table.to_json(orient="records"))

    @custom_handler(rest_path="/kronos/health/live", rest_method="GET")
    async def live(self) -> dict[str, Any]:
        """Liveness from inference progress: 503 when the worker made no step for stall_s."""
        stalled = self._batcher.stalled_for() if self._batcher is not None else 0.0
        batcher = self._batcher
        state = {
            "live": stalled < self.config.stall_s,
            "stalled_s": round(stalled, 3),
            "running": batcher is not None and batcher.worker_started is not None,
            "queued_series": batcher.queued_series if batcher is not None else 0,
            "model_version": self._loaded.version if self._loaded else None,
        }
        if not state["live"]:
            raise ModelNotReadyError(f"no generation progress for {stalled:.0f} s")
        return state
