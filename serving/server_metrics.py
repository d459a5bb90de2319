"""Metrics of MLServer's main process: every answer the server gives, and its workers.

The runtime's own metrics (`serving.metrics`) live in the inference worker, so they cannot
see the answers given without a worker (none running, or it died with requests in
flight), nor the ones MLServer gives itself (unknown model, unreadable body). These are
counted here, in the main process, whose metric files outlive any worker restart.

prometheus_client's multiprocess mode is switched on by MLServer when it builds its
metrics server, and a metric created before that would not be exported: `server_metrics()`
creates them on first use, which `serving.patches.startup` makes happen as the server
starts (so every series is exported from the start, at 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from .metrics import OUTCOMES, _get_or_create

PROTOCOLS = ("rest", "grpc")


@dataclass(frozen=True)
class ServerMetrics:
    """The main process's metrics."""

    answers: Counter  # labels: protocol, outcome (OUTCOMES)
    worker_restarts: Counter
    ready_workers: Gauge

    def answered(self, protocol: str, outcome: str) -> None:
        self.answers.labels(protocol, outcome).inc()


_metrics: ServerMetrics | None = None


def server_metrics() -> ServerMetrics:
    """The main process's metrics, created on first use."""
    global _metrics
    if _metrics is None:
        answers = _get_or_create(
            Counter,
            "kronos_answers_total",
            "Inference answers of the server by protocol and outcome, those given without a worker "
            "included (counted in MLServer's main process: survives worker restarts)",
            labelnames=("protocol", "outcome"),
        )
        for protocol in PROTOCOLS:
            for outcome in OUTCOMES:
                answers.labels(protocol, outcome)
        _metrics = ServerMetrics(
            answers=answers,
            worker_restarts=_get_or_create(
                Counter, "kronos_worker_restarts_total", "Inference workers that exited unexpectedly and were restarted"
            ),
            ready_workers=_get_or_create(
                Gauge,
                "kronos_ready_workers",
                "Inference workers in rotation (0: every request is answered 503 until one is ready)",
                multiprocess_mode="livemax",
            ),
        )
    return _metrics
