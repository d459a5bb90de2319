"""Inference workers that die: fast 503s, honest readiness, one log line, kept counters.

MLServer 1.7.1 restarts a worker that exits, but while it does:
- requests in flight on the dead worker failed with 500 "Worker process stopped
  unexpectedly", and new ones with a plain-text 500 (`StopIteration` in the round robin
  of an empty worker set) and tracebacks;
- `/v2/health/ready` and `/v2/models/<name>/ready` stayed 200;
- the dead worker's metric files were deleted, so the runtime's counters went backwards;
- a new worker whose model failed to load stayed out of rotation for good, silently.

Here the dispatcher keeps the set of workers that serve (in rotation): a request finds
none, or its worker dies under it, and the answer is a 503 with `Retry-After` (gRPC
UNAVAILABLE) in the project's error shape; readiness is false while the set is empty;
the event is logged as one WARNING line when it starts and one INFO line when a worker
serves again (with how many requests were answered 503 meanwhile), MLServer's own
lines about it are dropped; a worker's counters and histograms outlive it (its gauges do
not); a restarted worker that cannot load its models is restarted again with a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Response, status
from mlserver.handlers.dataplane import DataPlane
from mlserver.metrics.server import MetricsServer
from mlserver.parallel.dispatcher import Dispatcher
from mlserver.parallel.pool import InferencePool
from mlserver.parallel.worker import Worker
from mlserver.rest.endpoints import Endpoints
from prometheus_client.multiprocess import mark_process_dead

from ..server_metrics import server_metrics
from .status import RETRY_AFTER_HEADER, RelayedError, retry_after_s

logger = logging.getLogger("kronos.serving.workers")
RESTART_BACKOFF_S = (2.0, 4.0, 8.0, 16.0, 32.0, 60.0)  # after failed loads of a new worker
KEPT_METRIC_FILES = ("counter_", "histogram_", "summary_")  # what a dead worker leaves behind
_PATCHED = "__kronos_availability_patched__"


class WorkerUnavailableError(RelayedError):
    """503 / UNAVAILABLE: no inference worker serves the model right now. Counted and
    logged per event (see `Availability`), not per request."""

    def __init__(
        self, msg: str, status_code: int = status.HTTP_503_SERVICE_UNAVAILABLE, outcome: str = "unavailable"
    ) -> None:
        super().__init__(msg, status_code, outcome)


@dataclass
class Availability:
    """What one dispatcher knows about its workers."""

    ready: set[int]  # pids in rotation
    turn: int = 0  # round-robin position
    outage_since: float | None = None  # monotonic start of "no worker serves"
    outage_cause: str = ""
    unavailable_answers: int = 0  # 503s given during the current outage
    failed_starts: int = 0  # consecutive restarts whose model loads failed


def availability(dispatcher: Dispatcher) -> Availability:
    """The dispatcher's availability record (created from its workers on first use)."""
    state = getattr(dispatcher, "_kronos_availability", None)
    if state is None:
        state = Availability(ready=set(dispatcher._workers))  # noqa: SLF001 - workers dict
        dispatcher._kronos_availability = state  # noqa: SLF001
    return state


def describe_exit(wait_status: int) -> str:
    """A `waitpid` status (what MLServer passes on as "exit code") in words."""
    with contextlib.suppress(ValueError):
        if os.WIFSIGNALED(wait_status):
            number = os.WTERMSIG(wait_status)
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(number).name}"
            return f"killed by signal {number}"
        if os.WIFEXITED(wait_status):
            return f"exit status {os.WEXITSTATUS(wait_status)}"
    return f"status {wait_status}"


def next_worker(dispatcher: Dispatcher) -> Worker:
    """The next worker in rotation; WorkerUnavailableError (503) when none serves."""
    state = availability(dispatcher)
    workers = dispatcher._workers  # noqa: SLF001
    serving = sorted(pid for pid in state.ready if pid in workers)
    if not serving:
        raise unavailable(dispatcher)
    state.turn = (state.turn + 1) % len(serving)
    return workers[serving[state.turn]]


def unavailable(dispatcher: Dispatcher) -> WorkerUnavailableError:
    """A 503 for a request that found no worker (or lost it), counted for the outage."""
    state = availability(dispatcher)
    state.unavailable_answers += 1
    cause = f" ({state.outage_cause})" if state.outage_cause else ""
    return WorkerUnavailableError(
        f"no inference worker serves the model right now{cause}; retry after {retry_after_s()} s"
    )


def serves(model: Any) -> bool:
    """False when `model` runs in an inference pool in which no worker is in rotation."""
    dispatcher = getattr(model, "_dispatcher", None)
    if not isinstance(dispatcher, Dispatcher):
        return True
    return any(pid in dispatcher._workers for pid in availability(dispatcher).ready)  # noqa: SLF001


def _set_ready_gauge(state: Availability) -> None:
    server_metrics().ready_workers.set(len(state.ready))


def _on_worker_stop(self: Dispatcher, worker: Worker, exit_code: int) -> None:
    state = availability(self)
    in_flight = len(self._async_responses._workers_map.get(worker.pid, ()))  # noqa: SLF001
    state.ready.discard(worker.pid)
    _original_on_worker_stop(self, worker, exit_code)
    server_metrics().worker_restarts.inc()
    _set_ready_gauge(state)
    how = describe_exit(exit_code)
    if state.ready:
        logger.warning(
            "inference worker %s %s with %d requests in flight (answered 503); %d workers still serve; restarting it",
            worker.pid,
            how,
            in_flight,
            len(state.ready),
        )
        return
    if state.outage_since is None:
        state.outage_since, state.unavailable_answers = time.monotonic(), 0
    state.outage_cause = f"the worker was {how} and is restarting" if how.startswith("killed") else f"the worker {how}"
    state.unavailable_answers += in_flight
    logger.warning(
        "inference worker %s %s with %d requests in flight: every request is answered 503 with "
        "Retry-After and readiness is false until a new worker serves",
        worker.pid,
        how,
        in_flight,
    )


def _on_worker_ready(self: Dispatcher, worker: Worker) -> None:
    _original_on_worker_ready(self, worker)
    state = availability(self)
    state.ready.add(worker.pid)
    state.failed_starts = 0
    _set_ready_gauge(state)
    if state.outage_since is not None:
        logger.info(
            "inference worker %s serves again after %.1f s without one; %d requests were answered 503 meanwhile",
            worker.pid,
            time.monotonic() - state.outage_since,
            state.unavailable_answers,
        )
        state.outage_since, state.outage_cause, state.unavailable_answers = None, "", 0


async def _start_worker(self: InferencePool) -> Worker:
    """MLServer's worker restart; when the new worker cannot load its models it is
    stopped again after a backoff, so that the SIGCHLD handler restarts it."""
    try:
        return await _original_start_worker(self)
    except Exception as exc:  # noqa: BLE001 - reported here, retried below
        state = availability(self._dispatcher)  # noqa: SLF001
        waiting = [w for pid, w in self._workers.items() if pid not in state.ready]  # noqa: SLF001
        delay = RESTART_BACKOFF_S[min(state.failed_starts, len(RESTART_BACKOFF_S) - 1)]
        state.failed_starts += 1
        state.outage_cause = "the restarted worker could not load the model"
        logger.error(
            "a restarted inference worker could not load its models (%s: %s); answering 503, next try in %.0f s",
            type(exc).__name__,
            " ".join(str(exc).split())[:300],
            delay,
        )
        await asyncio.sleep(delay)
        for worker in waiting:
            if worker.is_alive():
                worker.kill()  # SIGCHLD -> MLServer starts another one
        raise asyncio.CancelledError from exc  # nothing to report: the restart is under way


async def _on_metrics_worker_stop(self: MetricsServer, worker: Worker) -> None:
    """Keep a dead worker's counters, histograms and summaries (their sums must not go
    backwards); drop its gauges, which describe a process that is gone."""
    if not worker.pid:
        return
    directory = self._settings.metrics_dir  # noqa: SLF001
    mark_process_dead(worker.pid, directory)
    for path in glob.glob(os.path.join(directory, f"*_{worker.pid}.db")):
        if not os.path.basename(path).startswith(KEPT_METRIC_FILES):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def remove_stale_metric_files(directory: str, live_pids: set[int]) -> int:
    """Delete the metric files of processes that are not `live_pids` (a previous run of
    the server left them: they would add its totals to this run's); return how many."""
    removed = 0
    for path in glob.glob(os.path.join(directory, "*_*.db")):
        pid = os.path.basename(path)[: -len(".db")].rsplit("_", 1)[-1]
        if pid.isdigit() and int(pid) not in live_pids:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                removed += 1
    return removed


async def _ready(self: DataPlane) -> bool:
    if not await _original_ready(self):
        return False
    return all(serves(model) for model in await self._model_registry.get_models())  # noqa: SLF001


async def _model_ready(self: DataPlane, name: str, version: str | None = None) -> bool:
    if not await _original_model_ready(self, name, version):
        return False
    return serves(await self._model_registry.get_model(name, version))  # noqa: SLF001


def _readiness(is_ready: bool) -> Response:
    """200, or 503 with Retry-After (MLServer answered 400 for "not ready")."""
    if is_ready:
        return Response(status_code=status.HTTP_200_OK)
    return Response(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, headers={RETRY_AFTER_HEADER: str(retry_after_s())})


async def _endpoint_ready(self: Endpoints) -> Response:
    return _readiness(await self._data_plane.ready())  # noqa: SLF001


async def _endpoint_model_ready(self: Endpoints, model_name: str, model_version: str | None = None) -> Response:
    return _readiness(await self._data_plane.model_ready(model_name, model_version))  # noqa: SLF001


class WorkerEventFilter(logging.Filter):
    """Drop MLServer's lines about a stopped worker (this module logs the event), and make
    a worker's failed model load one line (the runtime logged the cause already)."""

    DROPPED = ("stopped unexpectedly", "in-flight requests for worker")
    FAILED_UPDATE = "An error occurred processing a model update"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(text in message for text in self.DROPPED):
            return False
        if message.startswith(self.FAILED_UPDATE) and record.exc_info:
            exc = record.exc_info[1]
            record.msg, record.args = "%s: %s: %s", (message, type(exc).__name__, " ".join(str(exc).split())[:300])
            record.exc_info, record.exc_text = None, None
        return True


def _dispatcher_start(self: Dispatcher) -> None:
    """The pool's first workers are in rotation from the start (MLServer loads the models
    into them before it serves)."""
    _set_ready_gauge(availability(self))
    _original_dispatcher_start(self)


_original_dispatcher_start = Dispatcher.start
_original_on_worker_stop = Dispatcher.on_worker_stop
_original_on_worker_ready = Dispatcher.on_worker_ready
_original_start_worker = InferencePool._start_worker  # noqa: SLF001
_original_ready = DataPlane.ready
_original_model_ready = DataPlane.model_ready


def install() -> None:
    """Patch MLServer's dispatcher, pool, metrics server and readiness (idempotent)."""
    parallel_logger = logging.getLogger("mlserver.parallel")
    if not any(isinstance(f, WorkerEventFilter) for f in parallel_logger.filters):
        parallel_logger.addFilter(WorkerEventFilter())
    if getattr(Dispatcher, _PATCHED, False):
        return
    Dispatcher.start = _dispatcher_start
    Dispatcher.on_worker_stop = _on_worker_stop
    Dispatcher.on_worker_ready = _on_worker_ready
    InferencePool._start_worker = _start_worker  # noqa: SLF001
    MetricsServer.on_worker_stop = _on_metrics_worker_stop
    DataPlane.ready = _ready
    DataPlane.model_ready = _model_ready
    Endpoints.ready = _endpoint_ready
    Endpoints.model_ready = _endpoint_model_ready
    setattr(Dispatcher, _PATCHED, True)
