"""Fast generation (KV cache, shared prefixes, mixed batches) equals the reference loop."""

from __future__ import annotations

import gc
import os

import psutil
import pytest
import torch

from model_package.kronos import (
    Kronos,
    KronosConfig,
    KronosTokenizer,
    SeriesInput,
    TokenizerConfig,
    generate,
)
from model_package.kronos.checkpoint import random_init_

TEST_DEVICE = os.environ.get("KRONOS_TEST_DEVICE", "cpu")


def _pair(bits: int, d_model: int, n_heads: int, n_layers: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokenizer = KronosTokenizer(
        TokenizerConfig(
            d_in=6,
            d_model=32,
            n_heads=4,
            ff_dim=48,
            n_enc_layers=2,
            n_dec_layers=3,
            ffn_dropout_p=0.0,
            attn_dropout_p=0.0,
            resid_dropout_p=0.0,
            s1_bits=bits,
            s2_bits=bits,
            beta=0.05,
            gamma0=1.0,
            gamma=1.1,
            zeta=0.05,
            group_size=2,
        )
    )
    model = Kronos(
        KronosConfig(
            s1_bits=bits,
            s2_bits=bits,
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            ff_dim=2 * d_model,
            ffn_dropout_p=0.0,
            attn_dropout_p=0.0,
            resid_dropout_p=0.0,
            token_dropout_p=0.0,
            learn_te=n_layers % 2 == 0,
        )
    )
    return random_init_(tokenizer, g).to(TEST_DEVICE), random_init_(model, g).to(TEST_DEVICE)


def _series(length: int, pred_len: int, data_seed: int, **kwargs) -> SeriesInput:
    g = torch.Generator().manual_seed(data_seed)
    candles = torch.randn(length, 6, generator=g).clamp(-5, 5)
    t = torch.arange(length + pred_len)
    stamps = torch.stack(
        [t % 60, (t // 60) % 24, (t // 1440) % 7, 1 + (t // 1440) % 28, 1 + (t // 40320) % 12], dim=1
    ).float()
    return SeriesInput(candles, stamps, pred_len, **kwargs)


def _assert_same(a, b, rtol=1e-4):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.window_s1, y.window_s1) and torch.equal(x.window_s2, y.window_s2)
        torch.testing.assert_close(x.paths, y.paths, rtol=rtol, atol=1e-5)
        assert x.paths.device.type == TEST_DEVICE


SHAPES = [(10, 64, 8, 2), (6, 48, 2, 3), (8, 40, 5, 1)]


@pytest.mark.parametrize(("bits", "d_model", "n_heads", "n_layers"), SHAPES)
@pytest.mark.parametrize(
    ("length", "pred_len", "max_context"),
    [
        (20, 7, 32),  # fits the window
        (25, 7, 32),  # fills it exactly
        (28, 12, 32),  # slides during generation
        (70, 6, 32),  # history longer than twice the window
        (10, 32, 32),  # horizon as long as the window
    ],
)
def test_greedy_fast_equals_reference(bits, d_model, n_heads, n_layers, length, pred_len, max_context):
    tokenizer, model = _pair(bits, d_model, n_heads, n_layers, seed=length)
    series = [_series(length, pred_len, data_seed=1, top_k=1, top_p=1.0)]
    ref, _ = generate(tokenizer, model, series, max_context, "reference")
    fast, stats = generate(tokenizer, model, series, max_context, "fast")
    _assert_same(ref, fast)
    assert stats.incremental_steps + stats.full_window_passes >= pred_len


def test_mixed_batch_with_paths_and_settings_equals_reference_and_alone():
    tokenizer, model = _pair(10, 64, 4, 2, seed=3)
    series = [
        _series(12, 9, data_seed=1, sample_count=3, temperature=0.8, top_p=0.9, seed=11),
        _series(40, 5, data_seed=2, sample_count=1, top_k=1, top_p=1.0),
        _series(29, 14, data_seed=3, sample_count=4, temperature=1.3, top_k=5, seed=12),
        _series(3, 1, data_seed=4, sample_count=2, seed=13),
        _series(31, 12, data_seed=5, sample_count=2, top_p=0.5, seed=14),
    ]
    ref, _ = generate(tokenizer, model, series, 32, "reference")
    fast, stats = generate(tokenizer, model, series, 32, "fast")
    _assert_same(ref, fast)
    assert stats.rows == 12
    for s, together in zip(series, fast, strict=True):
        alone, _ = generate(tokenizer, model, [s], 32, "fast")
        _assert_same([together], alone)


def test_sampled_paths_differ_per_path_and_repeat_per_seed():
    tokenizer, model = _pair(10, 64, 4, 2, seed=5)
    series = [_series(30, 10, data_seed=1, sample_count=6, temperature=1.0, top_p=0.9, seed=99)]
    first, _ = generate(tokenizer, model, series, 64, "fast")
    again, _ = generate(tokenizer, model, series, 64, "fast")
    assert torch.equal(first[0].window_s1, again[0].window_s1)
    generated = first[0].window_s1[:, -10:]
    assert len({tuple(row.tolist()) for row in generated}) > 1


def test_rolling_mode_is_exact_until_the_window_slides_then_approximate():
    tokenizer, model = _pair(10, 64, 4, 2, seed=7)
    fits = [_series(20, 10, data_seed=1, top_k=1, top_p=1.0)]
    _assert_same(
        generate(tokenizer, model, fits, 32, "reference")[0], generate(tokenizer, model, fits, 32, "rolling")[0]
    )
    slides = [_series(30, 20, data_seed=2, top_k=1, top_p=1.0)]
    rolling, _ = generate(tokenizer, model, slides, 32, "rolling")
    exact, _ = generate(tokenizer, model, slides, 32, "fast")
    assert rolling[0].paths.shape == exact[0].paths.shape
    assert torch.equal(rolling[0].window_s1[:, :-18], exact[0].window_s1[:, :-18])


def test_abandoned_series_stop_and_others_finish():
    tokenizer, model = _pair(10, 64, 4, 2, seed=9)
    series = [_series(20, 30, data_seed=1, top_k=1), _series(25, 30, data_seed=2, top_k=1)]
    steps = []

    def on_step(step: int) -> list[int]:
        steps.append(step)
        return [0] if step == 3 else []

    out, _ = generate(tokenizer, model, series, 64, "fast", on_step=on_step)
    assert out[0] is None and out[1] is not None and out[1].paths.shape == (1, 30, 6)
    alone, _ = generate(tokenizer, model, series[1:], 64, "fast")
    _assert_same(out[1:], alone)
    assert steps == list(range(30))


def test_no_memory_growth_over_repeated_calls():
    tokenizer, model = _pair(10, 64, 4, 2, seed=11)
    series = [_series(40, 6, data_seed=1, sample_count=4, seed=5), _series(20, 4, data_seed=2, seed=6)]
    process = psutil.Process()
    for _ in range(10):
        generate(tokenizer, model, series, 64, "fast")
    gc.collect()
    before = process.memory_info().rss
    for _ in range(100):
        generate(tokenizer, model, series, 64, "fast")
    gc.collect()
    growth = process.memory_info().rss - before
    assert growth < 20 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 100 calls"


def test_invalid_inputs_are_refused():
    tokenizer, model = _pair(10, 64, 4, 2, seed=1)
    bad = _series(10, 5, data_seed=1)
    bad.stamps = bad.stamps[:-1]
    with pytest.raises(ValueError, match="stamps must be"):
        generate(tokenizer, model, [bad], 32)
    with pytest.raises(ValueError, match="mode must be"):
        generate(tokenizer, model, [_series(10, 5, data_seed=1)], 32, "turbo")
