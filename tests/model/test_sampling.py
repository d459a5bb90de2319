"""Sampling semantics follow upstream Kronos: temperature, top-k (ties kept), top-p."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model_package.kronos.sampling import draw_table, filter_logits, path_keys, sample_tokens, uniforms


def _kept(logits, top_k=0, top_p=1.0):
    out = filter_logits(torch.tensor([logits]), torch.tensor([top_k]), torch.tensor([top_p]))
    return torch.isfinite(out[0]).nonzero()[:, 0].tolist()


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    probs = [0.644, 0.237, 0.087, 0.032]
    logits = [math.log(p) for p in probs]
    assert _kept(logits, top_p=0.7) == [0, 1]
    assert _kept(logits, top_p=0.5) == [0]  # the top-1 token always stays
    assert _kept(logits, top_p=0.9) == [0, 1, 2]
    assert _kept(logits, top_p=1.0) == [0, 1, 2, 3]


def test_top_k_keeps_ties_and_disables_top_p():
    logits = [1.0, 3.0, 2.0, 3.0, 0.5]
    assert _kept(logits, top_k=1) == [1, 3]
    assert _kept(logits, top_k=3, top_p=0.01) == [1, 2, 3]


def test_rows_use_their_own_settings():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 3)
    out = filter_logits(logits, torch.tensor([1, 0, 0]), torch.tensor([1.0, 0.7, 1.0]))
    assert torch.isfinite(out).sum(1).tolist() == [1, 2, 4]


def test_greedy_is_argmax_whatever_the_draw():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    for u in (0.0, 0.5, 0.999999):
        ids = sample_tokens(logits, torch.ones(64), torch.ones(64, dtype=torch.long), torch.ones(64), np.full(64, u))
        assert torch.equal(ids, logits.argmax(-1))


@pytest.mark.parametrize("ties", [False, True])
def test_the_greedy_shortcut_draws_what_the_full_draw_does(ties):
    """all_top1 (every row top_k = 1) takes the argmax when each row's maximum is unique and
    the full inverse-CDF draw otherwise: the same token for every draw either way."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 50, generator=g)
    if ties:  # rows 0-7 keep two equal maxima: the draw picks between them
        logits[:8, 10] = logits[:8, 20] = logits[:8].max(-1).values + 1.0
    temperature = torch.rand(32, generator=g) + 0.5
    settings = (temperature, torch.ones(32, dtype=torch.long), torch.ones(32))
    for stream in range(4):
        u = uniforms(path_keys(9, 32), stream, 0)
        full = sample_tokens(logits, *settings, u, 1, False)
        assert torch.equal(sample_tokens(logits, *settings, u, 1, False, all_top1=True), full)
    if ties:
        draws = [sample_tokens(logits, *settings, uniforms(path_keys(9, 32), i, 0), all_top1=True) for i in range(40)]
        assert set(torch.stack(draws)[:, :8].unique().tolist()) == {10, 20}


def test_draw_frequencies_follow_softmax_with_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    temperature = 2.0
    keys = path_keys(5, 20000)
    ids = sample_tokens(
        logits,
        torch.full((20000,), temperature),
        torch.zeros(20000, dtype=torch.long),
        torch.ones(20000),
        uniforms(keys, 0, 0),
    )
    freq = torch.bincount(ids, minlength=3).float() / 20000
    expected = torch.softmax(logits[0] / temperature, -1)
    assert torch.allclose(freq, expected, atol=0.015)


def test_filtered_tokens_are_never_drawn():
    logits = torch.tensor([[5.0, 4.0, -1.0, -2.0]]).repeat(5000, 1)
    ids = sample_tokens(
        logits,
        torch.ones(5000),
        torch.zeros(5000, dtype=torch.long),
        torch.full((5000,), 0.8),
        uniforms(path_keys(1, 5000), 3, 1),
    )
    assert set(ids.tolist()) <= {0, 1}


def test_uniform_draws_depend_on_key_step_and_stream_only():
    keys = path_keys(42, 4)
    assert np.array_equal(uniforms(keys, 7, 0), uniforms(keys, 7, 0))
    assert not np.array_equal(uniforms(keys, 7, 0), uniforms(keys, 7, 1))
    assert not np.array_equal(uniforms(keys, 7, 0), uniforms(keys, 8, 0))
    assert np.array_equal(uniforms(keys[2:], 7, 0), uniforms(keys, 7, 0)[2:])
    u = uniforms(path_keys(0, 100000), 0, 0)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_draw_table_holds_the_same_draws_as_uniforms():
    keys = path_keys(3, 5)
    table = draw_table(keys, 7)
    for step in range(7):
        for stream in (0, 1):
            assert np.array_equal(table[:, step, stream], uniforms(keys, step, stream))
