"""Cohorts and the generations that run them (continuous batching, worker thread only).

A cohort is the requests handed to the worker together. It is tokenized and prefilled as
a new `Generation`; when a running generation of the same model can take it (exact mode,
one path per series, still young) without needing more memory than both were charged
(`model_package.kronos.cost`), it is merged into that one and becomes one of its parts,
otherwise it runs as a generation of its own. Every step, all generations of one
model step together (one trunk pass), and every cohort is answered as soon as its own
series are finished. Results are split back by position (`owner`), never by series id,
so requests cannot mix.

No asyncio and no MLServer here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from model_package.budget import network_shape
from model_package.forecaster import Forecast, KronosForecaster, PreparedRequest
from model_package.kronos import (
    Generation,
    GenerationStats,
    Part,
    SeriesInput,
    SeriesOutput,
    generate,
    step_together,
)
from model_package.kronos.cost import GenerationCost, SeriesWork, generation_cost

logger = logging.getLogger("kronos.serving.cohort")


def series_work(series: Sequence[SeriesInput], joined_at: Sequence[int]) -> list[SeriesWork]:
    """Series as cost-model work; a series that joined a running generation at step j
    counts j more steps (its suffix columns start at the generation's start)."""
    return [
        SeriesWork(int(s.candles.shape[0]), join + s.pred_len, s.sample_count)
        for s, join in zip(series, joined_at, strict=True)
    ]


def request_work(requests: Sequence[PreparedRequest], joined_at: int = 0) -> list[SeriesWork]:
    """The series of `requests`, joining at step `joined_at`, as cost-model work."""
    inputs = [s for r in requests for s in r.inputs]
    return series_work(inputs, [joined_at] * len(inputs))


class PricedRequest(Protocol):
    """A request handed to the worker with its forecaster and its cost."""

    forecaster: KronosForecaster
    request: PreparedRequest
    cost: GenerationCost


P = TypeVar("P", bound=PricedRequest)


def cohorts_within_cost(jobs: Sequence[P]) -> list[list[P]]:
    """Split `jobs` (of one forecaster, in order) into runs that can be generated together
    within the sum of their costs: a job joins the current run when the run's padded
    generation cost with it stays within what the run's jobs were charged."""
    runs: list[list[P]] = []
    charged = 0
    for job in jobs:
        if runs:
            together = [other.request for other in runs[-1]] + [job.request]
            if padded_bytes(job.forecaster, request_work(together)) <= charged + job.cost.memory_bytes:
                runs[-1].append(job)
                charged += job.cost.memory_bytes
                continue
        runs.append([job])
        charged = job.cost.memory_bytes
    return runs


def padded_bytes(forecaster: KronosForecaster, work: Sequence[SeriesWork]) -> int:
    """Memory of generating `work` as one batch (padding included), request inputs excluded
    (those were charged with each request already)."""
    return generation_cost(network_shape(forecaster), work, forecaster.mode, history_rows=0).memory_bytes


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
    charged_bytes: int = 0  # memory charged for these requests (sum of their costs)
    owner: list[int] = field(init=False)
    generation: Generation | None = None  # the generation its part lives in
    part: Part | None = None
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

    def start(self) -> Generation | None:
        """Tokenize and prefill as a new generation (reference mode: generate the whole
        forecast now and return None)."""
        f = self.forecaster
        if f.mode == "reference":
            self.outputs, self.stats = generate(
                f.tokenizer, f.model, self.inputs, f.max_context, f.mode, on_step=self.on_step
            )
            return None
        generation = Generation(f.tokenizer, f.model, self.inputs, f.max_context, f.mode == "rolling", self.on_step)
        generation.start()
        self.generation, self.part = generation, generation.parts[0]
        return generation

    def collect(self) -> None:
        """Take the outputs once the generation decoded this cohort's part."""
        if self.outputs is None and self.part is not None and self.part.outputs is not None:
            self.outputs = self.part.outputs
            self.stats = self.generation.stats if self.generation is not None else None

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
    """The running generations and the cohorts they answer."""

    def __init__(self) -> None:
        self.generations: list[Generation] = []
        self.cohorts: list[Cohort] = []

    def add(self, cohort: Cohort) -> list[Cohort]:
        """Start a cohort and merge it into a running generation when one can take it.
        Returns the cohorts that must be rerun alone because this failed."""
        try:
            generation = cohort.start()
        except Exception:  # noqa: BLE001
            logger.exception("starting a cohort failed; rerunning its requests alone")
            return [cohort]
        self.cohorts.append(cohort)
        if generation is None:
            return []
        host = next((g for g in self.generations if g.can_admit(generation) and self._fits(g, cohort)), None)
        if host is None:
            self.generations.append(generation)
            return []
        try:
            cohort.part, cohort.generation = host.admit(generation), host
        except Exception:  # noqa: BLE001 - the host's state is no longer trusted
            logger.exception("merging a cohort failed; rerunning the generation's requests alone")
            return self._drop(lambda c: c.generation is host or c is cohort, [host])
        return []

    def _fits(self, host: Generation, cohort: Cohort) -> bool:
        """Merging `cohort` into `host` needs no more memory than both were charged (the
        merged prefixes and suffixes are padded to the longest; newcomers' columns start at
        the host's first step)."""
        charged = cohort.charged_bytes + sum(
            c.charged_bytes for c in self.cohorts if c.generation is host and not c.done
        )
        host_work = series_work(host.series, host.series_join)
        return padded_bytes(cohort.forecaster, host_work + request_work(cohort.requests, host.step)) <= charged

    def step(self) -> list[Cohort]:
        """One step of every generation (those of one model together); returns the
        cohorts that must be rerun alone because their step failed."""
        by_model: dict[int, list[Generation]] = {}
        for generation in self.generations:
            by_model.setdefault(id(generation.model), []).append(generation)
        failed: list[Cohort] = []
        for group in by_model.values():
            try:
                step_together(group)
                for generation in group:
                    generation.finished_parts()
            except Exception:  # noqa: BLE001
                logger.exception("a shared generation step failed; rerunning its requests alone")
                failed += self._drop(_in_generations(group), group)
        for cohort in self.cohorts:
            cohort.collect()
        self.generations = [g for g in self.generations if not g.done]
        return failed

    def take_done(self) -> list[Cohort]:
        """Remove and return the answered cohorts."""
        done = [c for c in self.cohorts if c.done]
        self.cohorts = [c for c in self.cohorts if not c.done]
        return done

    def step_series(self) -> int:
        """Series that take part in the next step."""
        return sum(len(c.owner) for c in self.cohorts if not c.done and c.generation is not None)

    def _drop(self, selects: Callable[[Cohort], bool], generations: list[Generation]) -> list[Cohort]:
        dropped = [c for c in self.cohorts if selects(c) and not c.done]
        self.cohorts = [c for c in self.cohorts if c not in dropped]
        self.generations = [g for g in self.generations if g not in generations]
        return dropped


def _in_generations(generations: list[Generation]) -> Callable[[Cohort], bool]:
    """Selects the cohorts whose part lives in one of `generations`."""
    members = {id(g) for g in generations}
    return lambda cohort: id(cohort.generation) in members
