"""Prometheus metrics of the Kronos runtime (exported on MLServer's metrics port).

MLServer runs prometheus_client in multiprocess mode (every worker writes to
`metrics_dir`), so gauges declare how the per-process values combine, and it
`importlib.reload`s runtime modules: every metric is get-or-create by name, never
registered twice. Names are a contract with the alert rules and the dashboard.
"""

from __future__ import annotations

import os
import resource
from typing import TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from .batcher import CANCELLED, DEADLINE

# Seconds: sub-second GPU forecasts up to CPU forecasts that take many minutes.
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 600, 1200, 1800)
SERIES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
REQUESTS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
BYTES_GAUGE_HELP = "Memory of the requests {} (bytes, their costs)"
# ok: answered; invalid: 400; overloaded: 503 (queue budget); timeout: 504 (deadline);
# cancelled: the client went away (disconnect, gRPC cancel or deadline) before the answer;
# unavailable: 503 (model not loaded / unloading); error: 500.
ABANDON_REASONS = (DEADLINE, CANCELLED)
OUTCOMES = ("ok", "invalid", "overloaded", "timeout", "cancelled", "unavailable", "error")
# ok: the registry answered where the alias points; failed: no answer, or an error answer.
REGISTRY_CHECK_RESULTS = ("ok", "failed")
# Live accuracy (`serving.live`): gauges per (model_version, role, horizon) over the rolling
# window, and what happened to the forecast candles offered to the store writer.
LIVE_LABELS = ("model_version", "role", "horizon")
LIVE_GAUGES = {
    "forecasts": "Matched forecast candles (their realised candle arrived) in the live window",
    "mae": "Live mean absolute error of the close, relative to the last close",
    "mase": "Live MAE against persistence (sum |error| / sum |actual - last close|); >= 1: no better than no change",
    "directional_accuracy": "Live share of forecasts whose direction from the last close was right",
    "crps": "Live CRPS of the close from the recorded quantiles, relative to the last close",
    "coverage": "Live share of realised closes inside the forecast's [q0.1, q0.9] band",
}
LIVE_RECORD_RESULTS = ("recorded", "dropped", "failed")

M = TypeVar("M", bound=MetricWrapperBase)

# (model_uri, model_version) label pairs this process has served (kept across reloads)
_SERVED: set[tuple[str, str]] = globals().get("_SERVED", set())


def _get_or_create(
    kind: type[M], name: str, documentation: str, registry: CollectorRegistry = REGISTRY, **kwargs: object
) -> M:
    """The metric registered under `name`, created on first use (reload-safe)."""
    lookup = name[: -len("_total")] if kind is Counter and name.endswith("_total") else name
    existing = registry._names_to_collectors.get(lookup)  # noqa: SLF001 - no public lookup
    if existing is not None:
        return existing  # type: ignore[return-value]
    return kind(lookup, documentation, registry=registry, **kwargs)  # type: ignore[arg-type]


class KronosMetrics:
    """All Kronos metrics; also the batcher's observer."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        r = registry
        self.requests = _get_or_create(
            Counter, "kronos_requests_total", "Forecast requests by outcome", r, labelnames=("outcome", "model_version")
        )
        self.request_seconds = _get_or_create(
            Histogram,
            "kronos_request_seconds",
            "End-to-end request time in the runtime (s)",
            r,
            buckets=SECONDS_BUCKETS,
        )
        self.queue_wait_seconds = _get_or_create(
            Histogram,
            "kronos_queue_wait_seconds",
            "Time a request waited before the worker took it (s)",
            r,
            buckets=SECONDS_BUCKETS,
        )
        self.inference_seconds = _get_or_create(
            Histogram,
            "kronos_inference_seconds",
            "Time from a request's hand-over to the worker to its answer (s)",
            r,
            buckets=SECONDS_BUCKETS,
        )
        self.batch_series = _get_or_create(
            Histogram,
            "kronos_batch_series",
            "Series handed to the worker together (one batch window, or the arrivals while it runs)",
            r,
            buckets=SERIES_BUCKETS,
        )
        self.step_series = _get_or_create(
            Histogram,
            "kronos_step_series",
            "Series sharing one generation step (every row pool of the worker)",
            r,
            buckets=SERIES_BUCKETS,
        )
        self.batch_requests = _get_or_create(
            Histogram,
            "kronos_batch_requests",
            "Requests handed to the worker together (they join the row pool at the same step)",
            r,
            buckets=REQUESTS_BUCKETS,
        )
        self.abandoned_series = _get_or_create(
            Counter,
            "kronos_abandoned_series_total",
            "Series dropped from a running generation (reason: deadline, cancelled by the client)",
            r,
            labelnames=("reason",),
        )
        for reason in ABANDON_REASONS:  # exported from the start, at 0
            self.abandoned_series.labels(reason)
        self.generated_candles = _get_or_create(
            Counter, "kronos_generated_candles_total", "Candles generated (series x sample paths x steps)", r
        )
        self.queue_series = _get_or_create(
            Gauge, "kronos_queue_series", "Series waiting for the generation worker", r, multiprocess_mode="livesum"
        )
        self.queue_bytes = _get_or_create(
            Gauge, "kronos_queue_cost_bytes", BYTES_GAUGE_HELP.format("waiting"), r, multiprocess_mode="livesum"
        )
        self.queue_budget = _get_or_create(
            Gauge,
            "kronos_queue_budget_bytes",
            "Cost the queue may hold (bytes); beyond: 503",
            r,
            multiprocess_mode="livesum",
        )
        self.running_series = _get_or_create(
            Gauge, "kronos_running_series", "Series in generation", r, multiprocess_mode="livesum"
        )
        self.running_bytes = _get_or_create(
            Gauge, "kronos_running_cost_bytes", BYTES_GAUGE_HELP.format("in generation"), r, multiprocess_mode="livesum"
        )
        self.running_budget = _get_or_create(
            Gauge,
            "kronos_running_budget_bytes",
            "Cost the running generations may have (bytes)",
            r,
            multiprocess_mode="livesum",
        )
        self.model_info = _get_or_create(
            Gauge,
            "kronos_model_info",
            "The served model (1 = serving this one)",
            r,
            labelnames=("model_uri", "model_version"),
            multiprocess_mode="livemax",
        )
        self.model_version = _get_or_create(
            Gauge, "kronos_model_version", "Registry version number being served", r, multiprocess_mode="livemax"
        )
        self.ready = _get_or_create(
            Gauge, "kronos_ready", "1 when the model is loaded and warmed up", r, multiprocess_mode="livemax"
        )
        self.last_progress = _get_or_create(
            Gauge,
            "kronos_last_progress_timestamp_seconds",
            "Unix time of the last generation step or answered cohort",
            r,
            multiprocess_mode="livemax",
        )
        self.resident_memory = _get_or_create(
            Gauge,
            "kronos_worker_resident_memory_bytes",
            "Resident memory of the worker (bytes)",
            r,
            multiprocess_mode="livemax",
        )
        self.registry_checks = _get_or_create(
            Counter,
            "kronos_registry_checks_total",
            "Registry look-ups of the served model (at load and every alias poll) by result",
            r,
            labelnames=("result",),
        )
        for result in REGISTRY_CHECK_RESULTS:  # exported from the start, at 0
            self.registry_checks.labels(result)
        # Each worker checks on its own; the latest result of any live worker is the state
        # (max would hide a worker that just saw the registry fail, min one that just saw it
        # back). MLServer deletes a dead worker's files, and a restarted worker writes its
        # own result at load: a worker that died during an outage leaves no stale 0 behind.
        self.registry_up = _get_or_create(
            Gauge,
            "kronos_registry_up",
            "1 when the last registry check got an answer (or no registry is used); 0: unreachable",
            r,
            multiprocess_mode="livemostrecent",
        )

        self.live = {
            name: _get_or_create(
                Gauge, f"kronos_live_{name}", text, r, labelnames=LIVE_LABELS, multiprocess_mode="livemax"
            )
            for name, text in LIVE_GAUGES.items()
        }
        self.live_coverage_nominal = _get_or_create(
            Gauge,
            "kronos_live_coverage_nominal",
            "Nominal coverage of the live band (its upper level minus its lower)",
            r,
            multiprocess_mode="livemax",
        )
        self.live_records = _get_or_create(
            Counter,
            "kronos_live_records_total",
            "Forecast candles offered to the live store by result (recorded, dropped: queue full, failed: store error)",
            r,
            labelnames=("result",),
        )
        for result in LIVE_RECORD_RESULTS:  # exported from the start, at 0
            self.live_records.labels(result)
        self.live_actuals = _get_or_create(
            Counter, "kronos_live_actuals_total", "Realised candles received for live accuracy", r
        )

    # -- BatchObserver ---------------------------------------------------------------------

    def queue_changed(self, series: int, cost_bytes: int) -> None:
        self.queue_series.set(series)
        self.queue_bytes.set(cost_bytes)

    def running_changed(self, series: int, cost_bytes: int) -> None:
        self.running_series.set(series)
        self.running_bytes.set(cost_bytes)

    def waited(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)

    def handed_over(self, series: int, requests: int) -> None:
        self.batch_series.observe(series)
        self.batch_requests.observe(requests)

    def cohort_done(self, series: int, requests: int, seconds: float, candles: int) -> None:
        self.inference_seconds.observe(seconds)
        self.generated_candles.inc(candles)
        self.resident_memory.set(rss_bytes())

    def stepped(self, series: int) -> None:
        self.step_series.observe(series)

    def progressed(self, timestamp: float) -> None:
        self.last_progress.set(timestamp)

    def abandoned(self, series: int, reason: str) -> None:
        self.abandoned_series.labels(reason).inc(series)

    # -- model state -----------------------------------------------------------------------

    def serving(self, model_uri: str, version: str) -> None:
        """Mark `version` as the served model and every model served before as not."""
        current = (model_uri, version)
        for labels in _SERVED - {current}:
            self.model_info.labels(*labels).set(0)
        _SERVED.add(current)
        self.model_info.labels(*current).set(1)
        self.model_version.set(float(version) if version.isdigit() else 0)

    def outcome(self, outcome: str, version: str) -> None:
        self.requests.labels(outcome, version).inc()

    def registry_checked(self, ok: bool, reachable: bool) -> None:
        """Count one registry check; `reachable`: the registry answered (even with an error)."""
        self.registry_checks.labels("ok" if ok else "failed").inc()
        self.registry_up.set(1 if reachable else 0)


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (peak RSS where /proc is absent)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
