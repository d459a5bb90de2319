"""The series-aware batcher against a real (tiny, random-weight) KronosForecaster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from serving_helpers import history

import serving.cohort as cohort_module
from model_package import KronosForecaster, SamplingParams
from model_package.budget import prepared_cost
from serving.batcher import (
    BatcherConfig,
    DeadlineExceededError,
    OverloadedError,
    SeriesBatcher,
)


class Recorder:
    """Observer keeping what the batcher reports."""

    def __init__(self) -> None:
        self.cohorts: list[tuple[int, int]] = []
        self.handovers: list[tuple[int, int]] = []
        self.queue: list[int] = []
        self.waits: list[float] = []
        self.steps = 0
        self.step_series: list[int] = []
        self.queue_bytes: list[int] = []
        self.running: list[tuple[int, int]] = []
        self.abandons: list[tuple[int, str]] = []

    def queue_changed(self, series: int, cost_bytes: int) -> None:
        self.queue.append(series)
        self.queue_bytes.append(cost_bytes)

    def running_changed(self, series: int, cost_bytes: int) -> None:
        self.running.append((series, cost_bytes))

    def abandoned(self, series: int, reason: str) -> None:
        self.abandons.append((series, reason))

    def waited(self, seconds: float) -> None:
        self.waits.append(seconds)

    def handed_over(self, series: int, requests: int) -> None:
        self.handovers.append((series, requests))

    def cohort_done(self, series: int, requests: int, seconds: float, candles: int) -> None:
        self.cohorts.append((series, requests))

    def stepped(self, series: int) -> None:
        self.step_series.append(series)

    def progressed(self, timestamp: float) -> None:
        self.steps += 1


@pytest.fixture(scope="module")
def forecaster(tiny_checkpoints: tuple[Path, Path]) -> KronosForecaster:
    tokenizer_dir, model_dir = tiny_checkpoints
    return KronosForecaster.from_pretrained(tokenizer_dir, model_dir, max_context=64, device="cpu")


def test_concurrent_requests_share_a_pass_and_get_their_own_series(forecaster):
    cases = [
        (history(["A", "B"], seed=1), SamplingParams(pred_len=3, top_k=1)),
        (history(["A"], seed=7), SamplingParams(pred_len=5, top_k=1)),
        (history(["B", "A", "C"], seed=11, length=30), SamplingParams(pred_len=2, top_k=1, sample_count=2)),
    ]
    expected = [forecaster.predict(h, **p.__dict__) for h, p in cases]
    recorder = Recorder()

    async def main() -> list[pd.DataFrame]:
        batcher = SeriesBatcher(BatcherConfig(max_batch_series=16, max_batch_time_s=0.5), recorder)
        batcher.start()
        prepared = [forecaster.prepare(h, p) for h, p in cases]
        results = await asyncio.gather(*[batcher.submit(forecaster, r, 60) for r in prepared])
        await batcher.drain_and_stop(10)
        return [r.frame for r in results]

    frames = asyncio.run(main())
    # every request is a cohort (answered on its own); all share the pool's steps
    assert sorted(recorder.cohorts) == [(1, 1), (2, 1), (3, 1)]
    assert recorder.handovers == [(6, 3)]  # collected in one batch window, joined at one step
    assert max(recorder.step_series) == 6
    for got, want in zip(frames, expected, strict=True):
        pd.testing.assert_frame_equal(got, want, rtol=1e-5)
    assert recorder.queue[-1] == 0


def test_requests_join_a_running_batch_and_are_answered_first(forecaster):
    """Continuous batching: requests arriving mid-generation join the row pool at the next
    step (one-path and multi-path alike), share the steps and are answered as soon as they
    are done."""
    cases = {
        "long": (history(["L"], seed=2, length=40), SamplingParams(pred_len=60, top_k=1)),  # still running at the joins
        "merged": (history(["A", "L"], seed=3), SamplingParams(pred_len=3, top_k=1)),
        "paths": (history(["L"], seed=4), SamplingParams(pred_len=5, temperature=0.8, sample_count=3, seed=1)),
    }
    expected = {name: forecaster.predict(h, **p.__dict__) for name, (h, p) in cases.items()}
    recorder = Recorder()
    answered: list[str] = []

    async def main() -> dict[str, pd.DataFrame]:
        batcher = SeriesBatcher(BatcherConfig(max_batch_series=8, max_batch_time_s=0.01), recorder)
        batcher.start()

        async def submit(name: str) -> pd.DataFrame:
            result = await batcher.submit(forecaster, forecaster.prepare(*cases[name]), 60)
            answered.append(name)
            return result.frame

        first = asyncio.ensure_future(submit("long"))
        while recorder.steps < 3:
            await asyncio.sleep(0.001)
        frames = await asyncio.gather(first, submit("merged"), submit("paths"))
        await batcher.drain_and_stop(10)
        return dict(zip(cases, frames, strict=True))

    frames = asyncio.run(main())
    assert answered[-1] == "long" and sorted(answered[:2]) == ["merged", "paths"]
    assert recorder.cohorts[-1] == (1, 1) and sorted(recorder.cohorts[:2]) == [(1, 1), (2, 1)]
    assert max(recorder.step_series) == 4  # 1 + 2 + 1 series: all in one step
    for name, want in expected.items():
        pd.testing.assert_frame_equal(frames[name], want, rtol=1e-5)


def test_a_failed_shared_step_reruns_each_request_alone(forecaster, monkeypatch):
    """Fault injection: the first pool step raises; the worker reruns every request of the
    failed pool on its own, so all requests still get their own forecasts."""
    real_step, calls = cohort_module.Engine.step, []

    def failing_once(pool):
        calls.append(len(pool.admissions))
        if len(calls) == 1:
            raise RuntimeError("injected step failure")
        return real_step(pool)

    cases = [
        (history(["A"], seed=5), SamplingParams(pred_len=3, top_k=1)),
        (history(["B", "C"], seed=6), SamplingParams(pred_len=4, top_k=1)),
    ]
    expected = [forecaster.predict(h, **p.__dict__) for h, p in cases]
    monkeypatch.setattr(cohort_module.Engine, "step", failing_once)

    async def main() -> list[pd.DataFrame]:
        batcher = SeriesBatcher(BatcherConfig(max_batch_time_s=0.2))
        batcher.start()
        results = await asyncio.gather(*[batcher.submit(forecaster, forecaster.prepare(h, p), 60) for h, p in cases])
        await batcher.drain_and_stop(10)
        return [r.frame for r in results]

    frames = asyncio.run(main())
    # one shared step of both, then each reran alone through generate() (3 and 4 steps)
    assert calls == [2] + [1] * 7
    for got, want in zip(frames, expected, strict=True):
        pd.testing.assert_frame_equal(got, want, rtol=1e-5)


def test_queue_budget_refuses_at_once(forecaster):
    """The queue holds requests up to its budget in bytes of their costs; beyond: refused
    when submitted, and before decoding once the budget is taken."""
    requests = [
        forecaster.prepare(history(ids, seed), SamplingParams(2))
        for ids, seed in ((["a", "b"], 1), (["c", "d"], 2), (["e"], 3))
    ]
    costs = [prepared_cost(forecaster, r).memory_bytes for r in requests]
    budget = costs[0] + costs[2]  # the first and the third fit together, the second not

    async def main() -> None:
        batcher = SeriesBatcher(BatcherConfig(max_batch_series=4, max_batch_time_s=600, queue_budget_bytes=budget))
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(forecaster, requests[0], 60))
        await asyncio.sleep(0)
        assert batcher.queued_bytes == costs[0]
        with pytest.raises(OverloadedError, match="queue's"):
            await batcher.submit(forecaster, requests[1], 60)
        batcher.reject_if_full()  # room left: no refusal yet
        third = asyncio.ensure_future(batcher.submit(forecaster, requests[2], 60))
        await asyncio.sleep(0)
        assert batcher.queued_bytes == budget
        with pytest.raises(OverloadedError):  # full: refused before any decoding
            batcher.reject_if_full()
        first.cancel()
        third.cancel()
        await asyncio.gather(first, third, return_exceptions=True)
        assert batcher.queued_bytes == 0 and batcher.queued_series == 0  # cancelled = dequeued
        await batcher.drain_and_stop(10)

    asyncio.run(main())


async def _until(condition: Callable[[], bool], timeout_s: float = 120.0) -> None:
    """Poll `condition` on the event loop until it holds (AssertionError after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


def test_running_budget_keeps_requests_queued_until_room(forecaster):
    """While a request runs, another joins only when the running budget has room for it:
    it stays queued over step boundaries (counted, not timed) until the first is done."""
    slow = forecaster.prepare(history(["x"], 3, length=60), SamplingParams(pred_len=60, top_k=1))
    quick = forecaster.prepare(history(["y"], 4), SamplingParams(pred_len=2, top_k=1))
    budget = prepared_cost(forecaster, slow).memory_bytes  # no room for a second request
    recorder = Recorder()

    async def main() -> None:
        batcher = SeriesBatcher(BatcherConfig(max_batch_time_s=0.01, running_budget_bytes=budget), recorder)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(forecaster, slow, 60))
        await _until(lambda: recorder.steps >= 2)
        second = asyncio.ensure_future(batcher.submit(forecaster, quick, 60))
        await _until(lambda: batcher.queued_series == 1)
        queued_at = recorder.steps
        await _until(lambda: recorder.steps >= queued_at + 3)  # three boundaries at which it could join
        assert batcher.queued_series == 1  # waits for room, not joined (the first has ~50 steps left)
        await asyncio.gather(first, second)
        await batcher.drain_and_stop(10)

    asyncio.run(main())
    assert all(cost <= budget for _, cost in recorder.running)
    assert recorder.cohorts == [(1, 1), (1, 1)]


def test_deadline_abandons_the_series_and_frees_the_worker(forecaster):
    recorder = Recorder()
    steps = 2000 // 40

    async def main() -> None:
        batcher = SeriesBatcher(BatcherConfig(max_batch_time_s=0.01), recorder)
        batcher.start()
        slow = forecaster.prepare(history(["x"], 3, length=60), SamplingParams(pred_len=steps, sample_count=64))
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(forecaster, slow, 0.3)
        quick = forecaster.prepare(history(["y"], 4), SamplingParams(pred_len=2, top_k=1))
        result = await batcher.submit(forecaster, quick, 60)
        assert len(result.frame) == 2
        await batcher.drain_and_stop(10)

    asyncio.run(main())
    assert len(recorder.cohorts) == 2
    assert recorder.abandons == [(1, "deadline")]
    assert recorder.steps < steps + 2  # the slow pass stopped before its 50 steps


def test_a_cancelled_request_leaves_generation_at_the_next_step(forecaster):
    """The task awaiting a request is cancelled (the client went away): its series are
    dropped at the next step, counted as cancelled, and the worker goes idle."""
    recorder = Recorder()
    steps = 64  # the forecaster's max_context

    async def main() -> None:
        batcher = SeriesBatcher(BatcherConfig(max_batch_time_s=0.01), recorder)
        batcher.start()
        slow = forecaster.prepare(history(["x"], 3, length=60), SamplingParams(pred_len=steps, sample_count=16))
        task = asyncio.ensure_future(batcher.submit(forecaster, slow, 600))
        while recorder.steps < 2:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while batcher.running_bytes:  # answered internally once its series left generation
            await asyncio.sleep(0.01)
        await batcher.drain_and_stop(10)

    asyncio.run(main())
    assert recorder.abandons == [(1, "cancelled")]
    assert recorder.steps < steps
    assert recorder.running[-1] == (0, 0)


def test_jobs_of_two_models_run_in_separate_pools(forecaster, tiny_checkpoints):
    tokenizer_dir, model_dir = tiny_checkpoints
    other = KronosForecaster.from_pretrained(tokenizer_dir, model_dir, max_context=64, device="cpu")
    recorder = Recorder()

    async def main() -> None:
        batcher = SeriesBatcher(BatcherConfig(max_batch_time_s=0.3), recorder)
        batcher.start()
        params = SamplingParams(pred_len=2, top_k=1)
        await asyncio.gather(
            batcher.submit(forecaster, forecaster.prepare(history(["a"], 1), params), 60),
            batcher.submit(other, other.prepare(history(["a"], 1), params), 60),
            batcher.submit(forecaster, forecaster.prepare(history(["b"], 2), params), 60),
        )
        await batcher.drain_and_stop(10)

    asyncio.run(main())
    assert recorder.cohorts == [(1, 1)] * 3  # each request answered on its own
    assert max(recorder.step_series) == 3  # two pools (one per model) stepped by one worker
