"""Cohorts and the row pools that run them (continuous batching, worker thread only).

A cohort is a request handed to the worker (its series, its hook, its answer). It joins the
row pool (`model_package.kronos.engine.Engine`) of its forecaster's model as one
admission as soon as the pool has room for it (the pool's own byte budget), its rows
generate together with every other row of the pool, and it is answered as soon as its own
rows are done. Results are split back by position (`owner`), never by series id, so
requests cannot mix. Reference mode (upstream's loop, for tests) runs a cohort whole.

No asyncio and no MLServer here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from model_package.forecaster import Forecast, KronosForecaster, PreparedRequest
from model_package.kronos import (
    Admission,
    Engine,
    GenerationStats,
    SeriesInput,
    SeriesOutput,
    generate,
)

logger = logging.getLogger("kronos.serving.cohort")


class AbandonedError(Exception):
    """The request's series were dropped mid-generation (deadline passed or client left)."""


@dataclass(eq=False)
class Cohort:
    """Requests generated together; `owner[i]` is the index of the request of series i."""

    forecaster: KronosForecaster
    requests: list[PreparedRequest]
    stop: Callable[[int], bool]  # request index -> True once it should be dropped
    progressed: Callable[[], None]  # called after every generation step
    jobs: list[Any] = field(default_factory=list)  # the caller's handles, in request order
    owner: list[int] = field(init=False)
    admission: Admission | None = None  # its place in a row pool
    outputs: list[SeriesOutput | None] | None = None
    stats: GenerationStats | None = None
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.owner = [j for j, r in enumerate(self.requests) for _ in r.series]

    @property
    def inputs(self) -> list[SeriesInput]:
        return [s for r in self.requests for s in r.inputs]

    @property
    def candles(self) -> int:
        """Candles asked for: series x sample paths x steps."""
        return sum(s.sample_count * s.pred_len for s in self.inputs)

    @property
    def done(self) -> bool:
        return self.outputs is not None

    def on_step(self, step: int) -> list[int]:
        """Generation hook: report progress, return the series of requests to drop."""
        self.progressed()
        return [i for i, j in enumerate(self.owner) if self.stop(j)]

    def stopped(self) -> bool:
        """True when every request of the cohort should be dropped (before it joins)."""
        return all(self.stop(j) for j in range(len(self.requests)))

    def run_reference(self) -> None:
        """Reference mode: generate the whole forecast now."""
        f = self.forecaster
        self.outputs, self.stats = generate(f.tokenizer, f.model, self.inputs, f.max_context, f.mode, self.on_step)

    def collect(self) -> None:
        """Take the outputs once the pool decoded this cohort's admission."""
        if self.outputs is None and self.admission is not None and self.admission.outputs is not None:
            self.outputs, self.stats = self.admission.outputs, self.admission.stats

    def results(self) -> list[Forecast | BaseException]:
        """One forecast (or the error that stopped it) per request, in request order."""
        assert self.outputs is not None
        if self.stats is not None:
            self.forecaster.last_stats = self.stats
        return [
            self._finish(request, [out for out, o in zip(self.outputs, self.owner, strict=True) if o == j])
            for j, request in enumerate(self.requests)
        ]

    def rerun_alone(self) -> list[Forecast | BaseException]:
        """After a failed step, start or merge: every request generated on its own, so that
        one request's failure never fails its neighbours."""
        f = self.forecaster
        results: list[Forecast | BaseException] = []
        for j, request in enumerate(self.requests):

            def drop(step: int, j: int = j, n: int = len(request.series)) -> list[int]:
                self.progressed()
                return list(range(n)) if self.stop(j) else []

            try:
                outputs, f.last_stats = generate(
                    f.tokenizer, f.model, request.inputs, f.max_context, f.mode, on_step=drop
                )
            except Exception as exc:  # noqa: BLE001 - reported to that request only
                results.append(exc)
                continue
            results.append(self._finish(request, outputs))
        return results

    def _finish(self, request: PreparedRequest, outputs: Sequence[SeriesOutput | None]) -> Forecast | BaseException:
        if any(out is None for out in outputs):
            return AbandonedError()
        try:
            return self.forecaster.finish(request, outputs)
        except Exception as exc:  # noqa: BLE001 - reported to that request only
            return exc


class CohortRunner:
    """One row pool per model (created on demand, dropped when idle), the cohorts running in
    them and the cohorts waiting for room. `budget_bytes` caps each pool (None: unbounded)."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.pools: dict[int, Engine] = {}  # id(forecaster) -> its pool
        self.cohorts: list[Cohort] = []  # handed over and not answered (waiting or running)
        self.waiting: list[Cohort] = []  # not in a pool yet, in arrival order

    def add(self, cohort: Cohort) -> list[Cohort]:
        """Take a cohort; it joins its pool now or as soon as there is room. Returns the
        cohorts that must be rerun alone because joining failed."""
        self.cohorts.append(cohort)
        self.waiting.append(cohort)
        return self._admit()

    def _pool(self, forecaster: KronosForecaster) -> Engine:
        pool = self.pools.get(id(forecaster))
        if pool is None:
            pool = Engine(
                forecaster.tokenizer,
                forecaster.model,
                forecaster.max_context,
                rolling=forecaster.mode == "rolling",
                budget_bytes=self.budget_bytes,
            )
            self.pools[id(forecaster)] = pool
        return pool

    def _admit(self) -> list[Cohort]:
        """Waiting cohorts join their pools in arrival order while there is room (a cohort
        that must wait holds back the later ones of its model only)."""
        failed: list[Cohort] = []
        blocked: set[int] = set()
        for cohort in list(self.waiting):
            key = id(cohort.forecaster)
            if cohort.stopped():
                self.waiting.remove(cohort)
                cohort.outputs = [None] * len(cohort.owner)
                continue
            if key in blocked:
                continue
            if cohort.forecaster.mode == "reference":
                self.waiting.remove(cohort)
                try:
                    cohort.run_reference()
                except Exception:  # noqa: BLE001
                    logger.exception("a reference generation failed; rerunning its requests alone")
                    failed.append(cohort)
                continue
            pool = self._pool(cohort.forecaster)
            if not pool.can_take(cohort.inputs):
                blocked.add(key)
                continue
            self.waiting.remove(cohort)
            try:
                cohort.admission = pool.add(cohort.inputs, cohort.on_step)
            except Exception:  # noqa: BLE001 - the pool left as it was; this cohort alone
                logger.exception("joining the pool failed; rerunning the cohort's requests alone")
                failed.append(cohort)
        for cohort in failed:
            self.cohorts.remove(cohort)
        return failed

    def step(self) -> list[Cohort]:
        """One step of every pool; returns the cohorts that must be rerun alone because
        their pool's step failed (the pool is dropped: its state is no longer trusted)."""
        failed: list[Cohort] = []
        for key, pool in list(self.pools.items()):
            try:
                pool.step()
            except Exception:  # noqa: BLE001
                logger.exception("a pool step failed; rerunning its requests alone")
                members = {id(a) for a in pool.admissions}
                dropped = [c for c in self.cohorts if c.admission is not None and id(c.admission) in members]
                self.cohorts = [c for c in self.cohorts if c not in dropped]
                failed += dropped
                del self.pools[key]
        for cohort in self.cohorts:
            cohort.collect()
        self.pools = {key: pool for key, pool in self.pools.items() if not pool.idle}
        return failed + self._admit()

    def take_done(self) -> list[Cohort]:
        """Remove and return the answered cohorts."""
        done = [c for c in self.cohorts if c.done]
        self.cohorts = [c for c in self.cohorts if not c.done]
        return done

    def step_series(self) -> int:
        """Series that take part in the next step."""
        return sum(len(c.owner) for c in self.cohorts if not c.done and c.admission is not None)
