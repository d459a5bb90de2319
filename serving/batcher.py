"""Series-aware micro-batching: many requests, one generation pass, each its own result.

Requests are validated (`KronosForecaster.prepare`) before they get here, so a bad request
never reaches a pass. The batcher collects queued requests for at most `max_batch_time_s`
after the oldest arrived and up to `max_batch_series` series, concatenates their
`SeriesInput`s, runs one `generate` in a worker thread and splits the outputs back by
position. No series ids are involved, so two requests with the same `series_id` (or
different horizons and sampling settings) cannot mix.

Each job carries the forecaster it was prepared with; a pass only groups jobs of the same
forecaster, so a model swap lets queued and running requests finish on the old model.

Pure asyncio and our own modules: no MLServer here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from model_package.forecaster import Forecast, KronosForecaster, PreparedRequest
from model_package.kronos import SeriesOutput, generate


class OverloadedError(Exception):
    """The queue is full; retry after `retry_after_s` seconds."""

    def __init__(self, queued: int, capacity: int, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"server overloaded: {queued} of {capacity} queued series slots taken; "
                         f"retry after {retry_after_s} s")


class DeadlineExceededError(Exception):
    """The request's deadline passed before its forecast was ready."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        super().__init__(f"forecast not ready within the deadline of {deadline_s:g} s")


class BatcherClosedError(Exception):
    """The batcher was stopped before the request ran."""


class BatchObserver(Protocol):
    """Hooks for metrics; every method is called on the event loop or the worker thread."""

    def queue_changed(self, series: int) -> None: ...
    def waited(self, seconds: float) -> None: ...
    def pass_done(self, series: int, requests: int, seconds: float, candles: int) -> None: ...
    def progressed(self, timestamp: float) -> None: ...


class NullObserver:
    """Observer that records nothing."""

    def queue_changed(self, series: int) -> None:
        pass

    def waited(self, seconds: float) -> None:
        pass

    def pass_done(self, series: int, requests: int, seconds: float, candles: int) -> None:
        pass

    def progressed(self, timestamp: float) -> None:
        pass


@dataclass(frozen=True)
class BatcherConfig:
    """Batch shape and queue bound (all in series, times in seconds)."""

    max_batch_series: int = 64
    max_batch_time_s: float = 0.05
    queue_capacity_series: int = 256
    retry_after_s: int = 2


@dataclass(eq=False)
class _Job:
    forecaster: KronosForecaster
    request: PreparedRequest
    future: asyncio.Future
    deadline: float  # time.monotonic() seconds
    deadline_s: float
    enqueued: float
    cancelled: bool = False  # read by the worker thread at every step
    started: float | None = None  # time.monotonic() when its pass began
    finished: float | None = None  # time.monotonic() when its pass ended
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def n_series(self) -> int:
        return len(self.request.series)


class SeriesBatcher:
    """Queue + one worker thread running shared generation passes."""

    def __init__(self, config: BatcherConfig, observer: BatchObserver | None = None) -> None:
        self.config = config
        self.observer: BatchObserver = observer or NullObserver()
        self._queue: deque[_Job] = deque()
        self._queued_series = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kronos-gen")
        self._task: asyncio.Task | None = None
        self._closing = False
        self.pass_started: float | None = None  # time.time() of the running pass, or None
        self.last_progress: float = time.time()
        self.passes = 0

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

    def stalled_for(self) -> float:
        """Seconds since the running pass last made progress (0 when idle)."""
        if self.pass_started is None:
            return 0.0
        return time.time() - max(self.last_progress, self.pass_started)

    # -- submitting ------------------------------------------------------------------------

    def reject_if_full(self) -> None:
        """Refuse at once, before a request is even decoded, when no series fits any more."""
        capacity = self.config.queue_capacity_series
        if self._queued_series >= capacity:
            raise OverloadedError(self._queued_series, capacity, self.config.retry_after_s)

    async def submit(self, forecaster: KronosForecaster, request: PreparedRequest,
                     deadline_s: float, timings: dict[str, float] | None = None) -> Forecast:
        """Queue a validated request and wait for its forecast.

        Raises OverloadedError at once when the queue has no room for its series, and
        DeadlineExceededError when `deadline_s` passes first (its series are then abandoned at
        the next generation step).
        """
        if self._closing:
            raise BatcherClosedError("the model is being unloaded")
        n = len(request.series)
        capacity = self.config.queue_capacity_series
        if self._queued_series + n > capacity:
            raise OverloadedError(self._queued_series, capacity, self.config.retry_after_s)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = _Job(forecaster, request, loop.create_future(), now + deadline_s, deadline_s, now)
        job.timer = loop.call_later(deadline_s, self._expire, job)
        self._queue.append(job)
        self._set_queued(self._queued_series + n)
        self._wakeup.set()
        try:
            return await job.future
        finally:
            if not job.future.done() or job.future.cancelled():  # client went away
                job.cancelled = True
                self._dequeue(job)
            if job.timer is not None:
                job.timer.cancel()
            if timings is not None:
                end = time.monotonic()
                timings["queue_wait_s"] = (job.started or end) - job.enqueued
                if job.started is not None:
                    timings["inference_s"] = (job.finished or end) - job.started

    def _expire(self, job: _Job) -> None:
        job.cancelled = True
        self._dequeue(job)
        self._settle(job, DeadlineExceededError(job.deadline_s))

    def _dequeue(self, job: _Job) -> None:
        with contextlib.suppress(ValueError):
            self._queue.remove(job)
            self._set_queued(self._queued_series - job.n_series)

    def _set_queued(self, series: int) -> None:
        self._queued_series = series
        self.observer.queue_changed(series)

    @staticmethod
    def _settle(job: _Job, outcome: Forecast | BaseException) -> None:
        if job.future.done():
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._collect()
            jobs = self._take_batch()
            if not jobs:
                continue
            now = time.monotonic()
            for job in jobs:
                job.started = now
                self.observer.waited(now - job.enqueued)
            try:
                results = await loop.run_in_executor(self._executor, self._run_pass, jobs)
            except Exception as exc:  # noqa: BLE001 - the executor itself failed
                results = [exc] * len(jobs)
            finished = time.monotonic()
            for job in jobs:
                job.finished = finished
            for job, outcome in zip(jobs, results, strict=True):
                self._settle(job, outcome)

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

    def _take_batch(self) -> list[_Job]:
        """Take the head job plus following jobs of the same forecaster that still fit."""
        if not self._queue:
            return []
        head = self._queue[0]
        jobs, series, kept = [], 0, deque()
        for job in self._queue:
            fits = not jobs or series + job.n_series <= self.config.max_batch_series
            if job.forecaster is head.forecaster and fits:
                jobs.append(job)
                series += job.n_series
            else:
                kept.append(job)
        self._queue = kept
        self._set_queued(self._queued_series - series)
        return jobs

    # -- the worker thread -----------------------------------------------------------------

    def _run_pass(self, jobs: list[_Job]) -> list[Forecast | BaseException]:
        """One shared generation pass; if it fails, each request is retried alone so that
        one request's failure never fails its neighbours."""
        try:
            return self._generate(jobs)
        except Exception as exc:  # noqa: BLE001 - reported per request below
            if len(jobs) == 1:
                return [exc]
        results: list[Forecast | BaseException] = []
        for job in jobs:
            try:
                results.extend(self._generate([job]))
            except Exception as exc:  # noqa: BLE001
                results.append(exc)
        return results

    def _generate(self, jobs: list[_Job]) -> list[Forecast | BaseException]:
        forecaster = jobs[0].forecaster
        inputs, owner = [], []  # owner[i] = index of the job that series i belongs to
        for j, job in enumerate(jobs):
            inputs.extend(job.request.inputs)
            owner.extend([j] * job.n_series)

        def on_step(step: int) -> Sequence[int]:
            self.last_progress = time.time()
            self.observer.progressed(self.last_progress)
            now = time.monotonic()
            return [i for i, j in enumerate(owner)
                    if jobs[j].cancelled or now >= jobs[j].deadline]

        started = time.perf_counter()
        self.pass_started = time.time()
        try:
            outputs, stats = generate(forecaster.tokenizer, forecaster.model, inputs,
                                      forecaster.max_context, forecaster.mode, on_step=on_step)
        finally:
            self.pass_started = None
            self.last_progress = time.time()
        self.passes += 1
        candles = sum(s.sample_count * s.pred_len for s in inputs)
        self.observer.pass_done(len(inputs), len(jobs), time.perf_counter() - started, candles)
        forecaster.last_stats = stats
        return [self._finish(job, outputs, owner, j) for j, job in enumerate(jobs)]

    @staticmethod
    def _finish(job: _Job, outputs: list[SeriesOutput | None], owner: list[int],
                j: int) -> Forecast | BaseException:
        mine = [out for out, o in zip(outputs, owner, strict=True) if o == j]
        if any(out is None for out in mine):
            return DeadlineExceededError(job.deadline_s)
        try:
            return job.forecaster.finish(job.request, mine)
        except Exception as exc:  # noqa: BLE001
            return exc

