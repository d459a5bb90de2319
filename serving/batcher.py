"""Series-aware continuous batching: many requests, shared generation steps, each its own result.

Requests are validated (`KronosForecaster.prepare`) and priced (`model_package.budget`)
before they get here, so a bad request never reaches the worker. Every request carries its
cost (memory bytes, candles): the queue holds at most `queue_budget_bytes` of requests
(beyond: `OverloadedError`, a 503), and the generations running at once at most
`running_budget_bytes` and `max_batch_series` series. When the worker is idle, the batcher
collects queued requests for at most `max_batch_time_s` after the oldest arrived and hands
them over as one cohort (`serving.cohort`). While the worker runs, newly queued requests
are handed over at once and join at its next step, as long as the running requests leave
room in both bounds; every cohort is answered as soon as it is done.
Outputs are split back by position, never by series id, so two requests with the same
`series_id` (or different horizons and sampling settings) cannot mix.

Each job carries the forecaster it was prepared with; only cohorts of one model share a
step, so a model swap lets queued and running requests finish on the old model.

Pure asyncio, one worker thread and our own modules: no MLServer here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from model_package.budget import prepared_cost
from model_package.forecaster import Forecast, KronosForecaster, PreparedRequest
from model_package.kronos.cost import GenerationCost

from .cohort import AbandonedError, Cohort, CohortRunner
from .memory import trim_heap
from .settings import MIB, ServingSettings

logger = logging.getLogger("kronos.serving.batcher")
DEADLINE, CANCELLED = "deadline", "cancelled"  # why a request's series were dropped


class OverloadedError(Exception):
    """The queue's budget is taken; retry after `retry_after_s` seconds."""

    def __init__(self, queued_bytes: int, budget_bytes: int, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"server overloaded: {queued_bytes / MIB:.0f} MiB of the queue's "
            f"{budget_bytes / MIB:.0f} MiB budget taken; retry after {retry_after_s} s"
        )


class DeadlineExceededError(Exception):
    """The request's deadline passed before its forecast was ready."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        super().__init__(f"forecast not ready within the deadline of {deadline_s:g} s")


class BatcherClosedError(Exception):
    """The batcher was stopped before the request ran."""


class BatchObserver(Protocol):
    """Hooks for metrics; every method is called on the event loop or the worker thread."""

    def queue_changed(self, series: int, cost_bytes: int) -> None: ...
    def running_changed(self, series: int, cost_bytes: int) -> None: ...
    def waited(self, seconds: float) -> None: ...
    def handed_over(self, series: int, requests: int) -> None: ...
    def cohort_done(self, series: int, requests: int, seconds: float, candles: int) -> None: ...
    def stepped(self, series: int) -> None: ...
    def progressed(self, timestamp: float) -> None: ...
    def abandoned(self, series: int, reason: str) -> None: ...


class NullObserver:
    """Observer that records nothing."""

    def queue_changed(self, series: int, cost_bytes: int) -> None:
        pass

    def running_changed(self, series: int, cost_bytes: int) -> None:
        pass

    def waited(self, seconds: float) -> None:
        pass

    def handed_over(self, series: int, requests: int) -> None:
        pass

    def cohort_done(self, series: int, requests: int, seconds: float, candles: int) -> None:
        pass

    def stepped(self, series: int) -> None:
        pass

    def progressed(self, timestamp: float) -> None:
        pass

    def abandoned(self, series: int, reason: str) -> None:
        pass


_SERVING_DEFAULTS = ServingSettings.model_fields


@dataclass(frozen=True)
class BatcherConfig:
    """Batch shape (series, seconds) and budgets (bytes of request costs). The batch shape
    defaults are the server's (model-settings.json may override them); the budgets and
    Retry-After default to `ServingSettings`'."""

    max_batch_series: int = 64
    max_batch_time_s: float = 0.05
    running_budget_bytes: int = int(_SERVING_DEFAULTS["running_budget_mb"].default * MIB)
    queue_budget_bytes: int = int(_SERVING_DEFAULTS["queue_budget_mb"].default * MIB)
    retry_after_s: int = _SERVING_DEFAULTS["retry_after_s"].default


@dataclass(eq=False)
class _Job:
    forecaster: KronosForecaster
    request: PreparedRequest
    cost: GenerationCost
    future: asyncio.Future
    deadline: float  # time.monotonic() seconds
    deadline_s: float
    enqueued: float
    cancelled: bool = False  # read by the worker thread at every step
    reason: str = ""  # why it was cancelled: "deadline" or "cancelled" (the client left)
    started: float | None = None  # time.monotonic() when it was handed to the worker
    finished: float | None = None  # time.monotonic() when it was answered
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def n_series(self) -> int:
        return len(self.request.series)

    @property
    def n_bytes(self) -> int:
        return self.cost.memory_bytes


class SeriesBatcher:
    """A budgeted queue and one worker thread stepping all running generations together."""

    def __init__(self, config: BatcherConfig, observer: BatchObserver | None = None) -> None:
        self.config = config
        self.observer: BatchObserver = observer or NullObserver()
        self._queue: deque[_Job] = deque()
        self._queued_series = 0
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kronos-gen")
        self._task: asyncio.Task | None = None
        self._closing = False
        self._running_series = 0  # handed to the worker and not answered yet (event loop)
        self._running_bytes = 0
        self._lock = threading.Lock()  # guards _inbox and _worker_running
        self._inbox: list[list[_Job]] = []  # cohorts handed over, not started yet
        self._worker_running = False
        self.worker_started: float | None = None  # time.time() the worker started, or None
        self.last_progress: float = time.time()
        self.cohorts_answered = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kronos-batcher")

    async def drain_and_stop(self, timeout_s: float | None = None) -> None:
        """Stop taking requests, finish the queued and running ones, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            if not self._task.done():
                self._task.cancel()
        for job in list(self._queue):
            self._settle(job, BatcherClosedError("the model was unloaded before the request ran"))
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queued_series(self) -> int:
        return self._queued_series

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def running_bytes(self) -> int:
        return self._running_bytes

    def stalled_for(self) -> float:
        """Seconds since the worker last made progress (0 when idle)."""
        if self.worker_started is None:
            return 0.0
        return time.time() - max(self.last_progress, self.worker_started)

    # -- submitting ------------------------------------------------------------------------

    def reject_if_full(self) -> None:
        """Refuse at once, before a request is even decoded, when the queue's budget is taken."""
        budget = self.config.queue_budget_bytes
        if self._queued_bytes >= budget:
            raise OverloadedError(self._queued_bytes, budget, self.config.retry_after_s)

    async def submit(
        self,
        forecaster: KronosForecaster,
        request: PreparedRequest,
        deadline_s: float,
        timings: dict[str, float] | None = None,
    ) -> Forecast:
        """Queue a validated request, priced here (`model_package.budget`), and wait for its forecast.

        Raises OverloadedError at once when the queue's budget has no room for its cost, and
        DeadlineExceededError when `deadline_s` passes first (its series are then abandoned at
        the next generation step). When the awaiting task is cancelled (the client went
        away), the request leaves the queue, or its series leave generation at the next step.
        """
        if self._closing:
            raise BatcherClosedError("the model is being unloaded")
        cost = prepared_cost(forecaster, request)
        budget = self.config.queue_budget_bytes
        if self._queued_bytes + cost.memory_bytes > budget:
            raise OverloadedError(self._queued_bytes, budget, self.config.retry_after_s)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = _Job(forecaster, request, cost, loop.create_future(), now + deadline_s, deadline_s, now)
        job.timer = loop.call_later(deadline_s, self._expire, job)
        self._queue.append(job)
        self._set_queued(self._queued_series + job.n_series, self._queued_bytes + job.n_bytes)
        self._wakeup.set()
        try:
            return await job.future
        finally:
            if not job.future.done() or job.future.cancelled():  # client went away
                job.cancelled, job.reason = True, job.reason or CANCELLED
                self._dequeue(job)
            if job.timer is not None:
                job.timer.cancel()
            if timings is not None:
                end = time.monotonic()
                timings["queue_wait_s"] = (job.started or end) - job.enqueued
                if job.started is not None:
                    timings["inference_s"] = (job.finished or end) - job.started

    def _expire(self, job: _Job) -> None:
        job.cancelled, job.reason = True, job.reason or DEADLINE
        self._dequeue(job)
        self._settle(job, DeadlineExceededError(job.deadline_s))

    def _dequeue(self, job: _Job) -> None:
        with contextlib.suppress(ValueError):
            self._queue.remove(job)
            self._set_queued(self._queued_series - job.n_series, self._queued_bytes - job.n_bytes)

    def _set_queued(self, series: int, cost_bytes: int) -> None:
        self._queued_series, self._queued_bytes = series, cost_bytes
        self.observer.queue_changed(series, cost_bytes)

    def _set_running(self, series: int, cost_bytes: int) -> None:
        self._running_series, self._running_bytes = series, cost_bytes
        self.observer.running_changed(series, cost_bytes)

    @staticmethod
    def _settle(job: _Job, outcome: Forecast | BaseException) -> None:
        if job.future.done():
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    # -- the loop (event loop side) ---------------------------------------------------------

    async def _run(self) -> None:
        """Hand queued requests to the worker: after a batch window when it is idle, at once
        (to join at its next step) while it runs, as long as running requests leave room."""
        while True:
            if self._closing and not self._queue and self._running_series == 0:
                return
            room = self.config.max_batch_series - self._running_series
            if not self._queue or room <= 0:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._running_series == 0:
                await self._collect()
                room = self.config.max_batch_series
            jobs = self._take_batch(
                room, self.config.running_budget_bytes - self._running_bytes, alone_ok=self._running_series == 0
            )
            if not jobs:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            now = time.monotonic()
            for job in jobs:
                job.started = now
                self.observer.waited(now - job.enqueued)
            self.observer.handed_over(sum(job.n_series for job in jobs), len(jobs))
            self._set_running(
                self._running_series + sum(job.n_series for job in jobs),
                self._running_bytes + sum(job.n_bytes for job in jobs),
            )
            self._hand_over(jobs)

    async def _collect(self) -> None:
        """Wait until the oldest job has waited max_batch_time_s or a batch is full."""
        oldest = self._queue[0].enqueued
        while self._queued_series < self.config.max_batch_series and not self._closing:
            remaining = oldest + self.config.max_batch_time_s - time.monotonic()
            if remaining <= 0 or not self._queue:
                return
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _take_batch(self, room: int, room_bytes: int, alone_ok: bool) -> list[_Job]:
        """Jobs of the head job's forecaster that fit in `room` series and `room_bytes` of
        the running budget, in queue order; the head job alone even when it is larger
        (`alone_ok`, nothing else running: every accepted request fits the budget alone)."""
        if not self._queue:
            return []
        head = self._queue[0]
        jobs: list[_Job] = []
        kept: deque[_Job] = deque()
        series = cost = 0
        for job in self._queue:
            fits = (series + job.n_series <= room and cost + job.n_bytes <= room_bytes) or (alone_ok and not jobs)
            if job.forecaster is head.forecaster and fits:
                jobs.append(job)
                series += job.n_series
                cost += job.n_bytes
            else:
                kept.append(job)
        self._queue = kept
        self._set_queued(self._queued_series - series, self._queued_bytes - cost)
        return jobs

    def _hand_over(self, jobs: list[_Job]) -> None:
        """Give a cohort to the worker thread, starting the worker when it is not running."""
        with self._lock:
            self._inbox.append(jobs)
            start = not self._worker_running
            self._worker_running = True
        if start:
            self.worker_started = time.time()
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._executor, self._work, loop)
            future.add_done_callback(self._worker_exited)

    def _worker_exited(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.error("batch worker crashed", exc_info=future.exception())

    def _complete(
        self, jobs: list[_Job], results: Sequence[Forecast | BaseException], seconds: float | None, candles: int = 0
    ) -> None:
        """Event loop: answer a finished cohort's requests and free its series (`seconds`
        None: jobs that never ran, not reported as a cohort)."""
        finished = time.monotonic()
        for job, outcome in zip(jobs, results, strict=True):
            job.finished = finished
            if isinstance(outcome, AbandonedError):
                if seconds is not None:  # its series left a running generation
                    self.observer.abandoned(job.n_series, job.reason or DEADLINE)
                outcome = DeadlineExceededError(job.deadline_s)
            self._settle(job, outcome)
        self._set_running(
            self._running_series - sum(job.n_series for job in jobs),
            self._running_bytes - sum(job.n_bytes for job in jobs),
        )
        if seconds is not None:
            self.cohorts_answered += 1
            self.observer.cohort_done(sum(job.n_series for job in jobs), len(jobs), seconds, candles)
        self._wakeup.set()

    # -- the worker thread ---------------------------------------------------------------

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: admit cohorts at step boundaries, step all running generations,
        answer each cohort when it is done; exit when nothing runs and nothing waits."""
        runner = CohortRunner(self.config.running_budget_bytes)
        try:
            while True:
                with self._lock:
                    arrived = list(self._inbox)
                    self._inbox.clear()
                    if not arrived and not runner.cohorts:
                        self._worker_running = False
                        self.worker_started = None
                        break
                failed = []
                for jobs in self._cohorts_of(arrived):
                    live = [job for job in jobs if not job.cancelled]  # expired while handed over
                    if len(live) < len(jobs):
                        gone = [job for job in jobs if job.cancelled]
                        loop.call_soon_threadsafe(self._complete, gone, [AbandonedError()] * len(gone), None)
                    if live:
                        failed += runner.add(self._cohort(live))
                series = runner.step_series()
                failed += runner.step()
                if series:
                    self.observer.stepped(series)
                for cohort in failed:
                    self._answer(loop, cohort, cohort.rerun_alone())
                for cohort in runner.take_done():
                    self._answer(loop, cohort, cohort.results())
        except BaseException as exc:  # a bug in this loop: fail what it holds, never hang
            with self._lock:
                stranded = list(self._inbox)
                self._inbox.clear()
                self._worker_running = False
                self.worker_started = None
            for cohort in runner.cohorts:
                self._answer(loop, cohort, [exc] * len(cohort.jobs))
            for jobs in stranded:
                loop.call_soon_threadsafe(self._complete, jobs, [exc] * len(jobs), None)
            raise
        trim_heap()  # idle now: hand the caches' freed memory back

    def _cohort(self, jobs: list[_Job]) -> Cohort:
        def stop(j: int) -> bool:
            return jobs[j].cancelled or time.monotonic() >= jobs[j].deadline

        return Cohort(
            jobs[0].forecaster,
            [job.request for job in jobs],
            stop,
            self._progressed,
            jobs,
        )

    def _progressed(self) -> None:
        self.last_progress = time.time()
        self.observer.progressed(self.last_progress)

    def _answer(self, loop: asyncio.AbstractEventLoop, cohort: Cohort, results: list[Forecast | BaseException]) -> None:
        seconds = time.perf_counter() - cohort.started
        loop.call_soon_threadsafe(self._complete, cohort.jobs, results, seconds, cohort.candles)

    @staticmethod
    def _cohorts_of(handed: list[list[_Job]]) -> list[list[_Job]]:
        """Every request handed over is a cohort of its own: it joins the pool as one
        admission and is answered as soon as its own rows are done."""
        return [[job] for jobs in handed for job in jobs]
