"""The row pool (`engine.Engine`): rows joining at different steps, with different path
counts and modes, get what they get alone; abandoned rows free their room at once; the
pool never holds more than its budget."""

from __future__ import annotations

import random

import pytest
import torch
from test_generation import _assert_same, _pair, _series

from model_package.kronos import Engine, generate
from model_package.kronos.precision import set_precision


def _run(engine: Engine, arrivals: list[tuple[list, int]], hooks: dict[int, object] | None = None):
    """Add each batch at its step; step until all are done -> (admissions, step each finished at)."""
    admissions, finished_at = [], {}
    for step in range(200):
        for i, (series, arrives) in enumerate(arrivals):
            if arrives == step:
                admissions.append(engine.add(series, (hooks or {}).get(i)))
        for admission in engine.step():
            finished_at[admissions.index(admission)] = step
        if len(admissions) == len(arrivals) and all(a.done for a in admissions):
            return admissions, finished_at
    raise AssertionError("the pool never finished")


@pytest.mark.parametrize("mode", ["fast", "rolling"])
def test_rows_joining_at_different_steps_match_generating_alone(mode):
    tokenizer, model = _pair(10, 64, 4, 2, seed=6)
    W = 32
    arrivals = [  # (series, step at which they join)
        ([_series(12, 10, data_seed=1, top_k=1), _series(5, 3, data_seed=2, top_k=1)], 0),
        ([_series(3, 6, data_seed=3, temperature=0.7, seed=3)], 4),  # very short history
        ([_series(40, 5, data_seed=4, top_k=1)], 4),  # longer than W: slides at once
        ([_series(30, 25, data_seed=5, top_k=1), _series(20, 9, data_seed=6, top_k=5, seed=8)], 6),
        ([_series(14, 6, data_seed=7, sample_count=3, temperature=0.9, top_p=0.8, seed=5)], 7),  # 3 paths
        ([_series(28, 12, data_seed=8, sample_count=2, temperature=1.1, top_p=0.9, seed=6)], 9),  # paths, slides
        ([_series(9, 4, data_seed=9, sample_count=16, top_p=0.9, seed=7)], 11),  # 16 paths
    ]
    engine = Engine(tokenizer, model, W, rolling=mode == "rolling")
    admissions, finished_at = _run(engine, arrivals)
    for (series, arrives), admission in zip(arrivals, admissions, strict=True):
        alone, _ = generate(tokenizer, model, series, W, mode)
        _assert_same(admission.outputs, alone)
        longest = max(s.pred_len for s in series)
        assert finished_at[admissions.index(admission)] == arrives + longest - 1  # answered at once
    assert engine.idle and not engine.lanes and not engine.series
    assert len(engine.table.free) == engine.table.capacity  # every row id given back


def test_abandoned_rows_leave_at_the_next_step_and_others_are_unharmed():
    tokenizer, model = _pair(10, 64, 4, 2, seed=9)
    W = 64
    engine = Engine(tokenizer, model, W)
    keep = engine.add([_series(20, 12, data_seed=1, top_k=1)])
    seen: list[int] = []

    def drop_at_two(step: int) -> list[int]:
        seen.append(step)
        return [0] if step == 2 else []

    doomed = engine.add([_series(25, 12, data_seed=2, sample_count=4, seed=3)], drop_at_two)
    for _ in range(2):
        engine.step()
    held = engine.held_bytes()
    assert sum(lane.n_series for lane in engine.lanes.values()) == 2
    engine.step()  # the hook drops the series after this step's sampling
    assert seen == [0, 1, 2]
    assert doomed.outputs == [None]  # answered at once
    assert sum(lane.n_series for lane in engine.lanes.values()) == 1
    assert engine.held_bytes() < held  # its lane and rows are gone
    while not keep.done:
        engine.step()
    alone, _ = generate(tokenizer, model, [_series(20, 12, data_seed=1, top_k=1)], W, "fast")
    _assert_same(keep.outputs, alone)


@pytest.mark.parametrize("precision", ["float32", "int8"])
@pytest.mark.parametrize("mode", ["fast", "rolling"])
def test_the_pool_never_holds_more_than_its_budget(mode, precision):
    """int8: its lanes' caches may be bfloat16 (precision.cache_dtype), priced at their size."""
    tokenizer, model = _pair(10, 64, 4, 2, seed=12)
    set_precision(model, precision)
    W = 32
    rng = random.Random(5)
    pending = [
        [
            _series(
                rng.randint(2, 45),
                rng.randint(1, 14),
                data_seed=i,
                sample_count=rng.choice([1, 1, 2, 5]),
                top_k=rng.choice([0, 1]),
                seed=i,
            )
        ]
        for i in range(24)
    ]
    alone_bytes = []
    for series in pending:
        probe = Engine(tokenizer, model, W, rolling=mode == "rolling")
        alone_bytes.append(probe.bytes_after(series))
    budget = 3 * max(alone_bytes)
    engine = Engine(tokenizer, model, W, rolling=mode == "rolling", budget_bytes=budget)
    answered, waited = [], 0
    admissions = []
    while pending or not engine.idle:
        while pending and engine.can_take(pending[0]):
            admissions.append((pending[0], engine.add(pending.pop(0))))
            assert engine.allocated_bytes() <= engine.held_bytes() <= budget
        waited += bool(pending)
        answered += engine.step()
        assert engine.allocated_bytes() <= engine.held_bytes() <= budget
    assert waited > 0  # the budget made some series wait for room
    assert len(answered) == 24
    for series, admission in admissions[::6]:
        _assert_same(admission.outputs, generate(tokenizer, model, series, W, mode)[0])


def test_an_empty_pool_takes_a_series_over_its_budget_alone():
    tokenizer, model = _pair(10, 64, 4, 2, seed=1)
    engine = Engine(tokenizer, model, 32, budget_bytes=1)
    series = [_series(10, 3, data_seed=1, top_k=1)]
    assert engine.can_take(series)
    admission = engine.add(series)
    assert not engine.can_take(series)
    while not admission.done:
        engine.step()
    assert torch.isfinite(admission.outputs[0].paths).all()
