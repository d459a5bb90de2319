"""Training windows (`model_package.windows`): normalisation with the lookback rows' stats,
calendar features, filling like inference, a time-ordered split without leakage, errors,
the data digest, and a smoke run on the real daily indexes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_package import KronosInputError
from model_package.calendar import calendar_features
from model_package.data import load_indexes, random_walk_candles
from model_package.frames import normalise, split_series
from model_package.windows import Windows, data_digest, make_windows


def _frame(lengths: dict[str, int], seed: int = 0, **kw) -> pd.DataFrame:
    """Random-walk series of the given lengths, stacked in the order given (hourly bars)."""
    rng = np.random.default_rng(seed)
    return pd.concat(
        [random_walk_candles(n, rng, series_id=sid, freq="h", **kw) for sid, n in lengths.items()],
        ignore_index=True,
    )


def _refused(*args, **kw) -> KronosInputError:
    with pytest.raises(KronosInputError) as info:
        make_windows(*args, **kw)
    return info.value


# -- normalisation -------------------------------------------------------------------------


def test_normalisation_equals_hand_computation():
    """One window, lookback 4 + horizon 2: mean and population std of the 4 lookback rows,
    z = (x - mean) / (std + 1e-5) for all 6 rows, clipped to +-clip."""
    close = np.array([10.0, 11.0, 13.0, 10.0, 12.0, 100.0])  # the last row is far out: clipped
    frame = pd.DataFrame(
        {
            "timestamp": pd.date_range("2024-03-04 09:30", periods=6, freq="5min"),
            "open": close,
            "high": close + 1,
            "low": close - 1,
            "close": close,
            "volume": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "amount": [7.0, 7.0, 7.0, 7.0, 7.0, 7.0],  # constant: std 0 -> z = 0
        }
    )
    split = make_windows(frame, lookback=4, horizon=2, val_fraction=0.0, clip=3.0)
    assert len(split.train) == 1 and len(split.val) == 0
    raw = frame[["open", "high", "low", "close", "volume", "amount"]].to_numpy()
    past = raw[:4]
    mean = past.sum(axis=0) / 4
    std = np.sqrt(((past - mean) ** 2).sum(axis=0) / 4)  # population std (ddof 0)
    expected = np.clip((raw - mean) / (std + 1e-5), -3.0, 3.0)
    got = split.train.x[0].numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got[5, 3] == 3.0 and got[4, 3] < 3.0  # close 100 clipped, close 12 is not
    assert (got[:, 5] == 0).all()
    # float32 arithmetic as at inference: frames.normalise over the lookback rows
    z_past, m, s = normalise(raw[:4].astype(np.float32), clip=3.0)
    np.testing.assert_allclose(got[:4], z_past, rtol=1e-6, atol=1e-6)
    horizon = np.clip((raw[4:].astype(np.float32) - m) / (s + np.float32(1e-5)), -3.0, 3.0)
    np.testing.assert_allclose(got[4:], horizon, rtol=1e-6, atol=1e-6)


def test_lookback_rows_are_clipped_too():
    """A lone spike among 29 equal closes has z = sqrt(29) ~ 5.39 > 5 within the lookback."""
    close = np.full(32, 50.0)
    close[10] = 60.0
    frame = pd.DataFrame(
        {
            "timestamp": pd.date_range("2024-01-01", periods=32, freq="D"),
            "open": close,
            "high": close,
            "low": close,
            "close": close,
        }
    )
    x = make_windows(frame, lookback=30, horizon=2, val_fraction=0.0).train.x
    assert x.shape == (1, 32, 6)
    assert x[0, 10, 3] == 5.0
    np.testing.assert_allclose(x[0, :10, 3], -1 / np.sqrt(29), rtol=1e-4)


def test_horizon_rows_use_lookback_stats_only():
    """Changing the horizon candles leaves the lookback rows' z-scores unchanged."""
    frame = random_walk_candles(30, seed=3)
    lookback, horizon = 20, 10
    base = make_windows(frame, lookback, horizon, val_fraction=0.0)
    moved = frame.copy()
    moved.loc[lookback:, ["open", "high", "low", "close"]] *= 1.01
    moved.loc[lookback:, ["volume", "amount"]] *= 2
    other = make_windows(moved, lookback, horizon, val_fraction=0.0)
    assert torch.equal(base.train.x[0, :lookback], other.train.x[0, :lookback])
    assert not torch.equal(base.train.x[0, lookback:], other.train.x[0, lookback:])
    # and every window matches a per-window float32 computation of the raw candles
    candles = split_series(frame)[0].candles
    past = candles[:lookback]
    z = np.clip((candles - past.mean(axis=0)) / (past.std(axis=0) + 1e-5), -5, 5)
    np.testing.assert_allclose(base.train.x[0].numpy(), z, rtol=1e-6, atol=1e-6)


# -- calendar, filling -----------------------------------------------------------------------


def test_calendar_features_of_each_window():
    frame = random_walk_candles(50, seed=1, start="2024-02-27 23:10", freq="17min")
    split = make_windows(frame, lookback=8, horizon=4, val_fraction=0.25, stride=3)
    stamps = calendar_features(pd.DatetimeIndex(frame["timestamp"]))
    for windows in (split.train, split.val):
        assert windows.stamp.dtype == torch.float32
        for i, start in enumerate(windows.start.tolist()):
            np.testing.assert_array_equal(windows.stamp[i].numpy(), stamps[start : start + 12])
    # minute, hour, weekday (Mon=0), day, month of the first candle: Tuesday 27 February 23:10
    assert split.train.stamp[0, 0].tolist() == [10.0, 23.0, 1.0, 27.0, 2.0]


@pytest.mark.parametrize("volume, amount", [(False, False), (True, False)])
def test_missing_volume_and_amount_filled_like_inference(volume, amount):
    frame = random_walk_candles(40, seed=2, volume=volume, amount=amount)
    got = make_windows(frame, lookback=10, horizon=5, val_fraction=0.0, stride=5).train
    candles = split_series(frame)[0].candles  # the inference path
    prices = frame[["open", "high", "low", "close"]].to_numpy()
    if not volume:
        assert (candles[:, 4:] == 0).all()
        assert (got.x[..., 4:] == 0).all()  # zero columns stay 0 after normalisation
    else:
        np.testing.assert_allclose(candles[:, 5], frame["volume"] * prices.mean(axis=1), rtol=1e-6)
        explicit = frame.assign(amount=frame["volume"].to_numpy() * prices.mean(axis=1))
        same = make_windows(explicit, lookback=10, horizon=5, val_fraction=0.0, stride=5).train
        assert torch.equal(got.x, same.x)
    for i, start in enumerate(got.start.tolist()):
        window = candles[start : start + 15]
        past = window[:10]
        z = np.clip((window - past.mean(axis=0)) / (past.std(axis=0) + 1e-5), -5, 5)
        np.testing.assert_allclose(got.x[i].numpy(), z, rtol=1e-6, atol=1e-6)


def test_strict_candles_off_accepts_negative_prices():
    frame = random_walk_candles(30, seed=4)
    frame[["open", "high", "low", "close"]] -= 200  # all negative
    assert _refused(frame, 10, 5, val_fraction=0.0).field == "open"
    split = make_windows(frame, 10, 5, val_fraction=0.0, strict_candles=False)
    assert len(split.train) == 16 and torch.isfinite(split.train.x).all()


# -- split, stride, several series -----------------------------------------------------------


def _check_split(frame: pd.DataFrame, lookback: int, horizon: int, val_fraction: float, stride: int) -> None:
    """The split's invariants, series by series."""
    split = make_windows(frame, lookback, horizon, val_fraction=val_fraction, stride=stride)
    T = lookback + horizon
    lengths = frame.groupby("series_id", sort=False).size()
    for windows in (split.train, split.val):
        assert windows.x.shape == (len(windows), T, 6) and windows.stamp.shape == (len(windows), T, 5)
        assert windows.start.dtype == torch.int64 and len(windows.series) == len(windows)
        assert torch.isfinite(windows.x).all() and (windows.x.abs() <= 5.0).all()
    kept = [sid for sid, L in lengths.items() if int(L * (1 - val_fraction) + 1e-9) >= T]
    assert list(dict.fromkeys(split.train.series)) == kept  # order of first appearance, short ones skipped
    assert set(split.val.series) <= set(kept)
    for sid in kept:
        L = int(lengths[sid])
        n_train = int(L * (1 - val_fraction) + 1e-9)
        train = split.train.start[[s == sid for s in split.train.series]]
        val = split.val.start[[s == sid for s in split.val.series]]
        # every possible training window, every `stride` candles, each ending in the training part
        assert train.tolist() == list(range(0, n_train - T + 1, stride))
        assert int(train.max()) + T <= n_train
        # every possible validation window in the rest, none overlapping a training window
        assert val.tolist() == (list(range(n_train, L - T + 1, stride)) if val_fraction > 0 else [])
        if len(val):
            assert int(train.max()) + T <= int(val.min())  # no candle in both
            assert int(val.max()) + T <= L


@settings(max_examples=60)
@given(
    lengths=st.lists(st.integers(1, 120), min_size=1, max_size=4),
    lookback=st.integers(2, 20),
    horizon=st.integers(1, 10),
    val_fraction=st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.5, 0.7]),
    stride=st.integers(1, 7),
)
def test_split_has_no_leakage(lengths, lookback, horizon, val_fraction, stride):
    frame = _frame({f"s{i}": n for i, n in enumerate(lengths)})
    try:
        _check_split(frame, lookback, horizon, val_fraction, stride)
    except KronosInputError as exc:  # only when no series has a training (or validation) window
        assert exc.field == "history"
        T = lookback + horizon
        n_trains = [(n, int(n * (1 - val_fraction) + 1e-9)) for n in lengths]
        trainable = [(n, m) for n, m in n_trains if m >= T]
        if trainable:  # then no series has room for a validation window
            assert val_fraction > 0 and "val_fraction" in exc.rule
            assert all(n - m < T for n, m in trainable)
        else:
            assert "needs at least" in exc.rule


def test_stride_and_several_series_of_different_lengths():
    frame = _frame({"A": 100, "B": 7, "C": 71})  # B is too short and skipped
    split = make_windows(frame, lookback=10, horizon=5, val_fraction=0.2, stride=4)
    assert split.train.series == ["A"] * 17 + ["C"] * 11
    assert split.train.start[:17].tolist() == list(range(0, 65 + 1, 4))  # A: 80 training candles
    assert split.train.start[17:].tolist() == list(range(0, 41 + 1, 4))  # C: 56 training candles
    # validation windows start in the last 20%: A at 80 and 84 (100 - 15 = 85 the last start), C at 56
    assert split.val.series == ["A", "A", "C"]
    assert split.val.start.tolist() == [80, 84, 56]
    _check_split(frame, 10, 5, 0.2, 4)
    assert (
        split.describe() == "28 train / 3 val windows of 15 candles (lookback 10 + horizon 5) from 2 series ['A', 'C']"
    )


def test_interleaved_rows_keep_order_of_first_appearance():
    frame = _frame({"Z": 40, "A": 40})
    interleaved = frame.iloc[np.argsort(np.r_[np.arange(40), np.arange(40)], kind="stable")]
    split = make_windows(interleaved, lookback=5, horizon=2, val_fraction=0.0, stride=10)
    assert split.train.series == ["Z"] * 4 + ["A"] * 4
    assert torch.equal(split.train.x, make_windows(frame, 5, 2, val_fraction=0.0, stride=10).train.x)


def test_val_fraction_zero_gives_empty_val_with_shapes():
    split = make_windows(random_walk_candles(30), lookback=8, horizon=2, val_fraction=0.0)
    assert len(split.train) == 21 and split.train.series == ["<single>"] * 21
    assert split.val.x.shape == (0, 10, 6) and split.val.stamp.shape == (0, 10, 5)
    assert split.val.start.dtype == torch.int64 and split.val.series == []


def test_subset():
    windows = make_windows(_frame({"A": 30, "B": 30}), 4, 2, val_fraction=0.0, stride=5).train
    assert len(windows) == 10
    picked = windows.subset(torch.tensor([9, 0, 5]))
    assert isinstance(picked, Windows) and len(picked) == 3
    assert picked.series == ["B", "A", "B"] and picked.start.tolist() == [20, 0, 0]
    assert torch.equal(picked.x[1], windows.x[0]) and torch.equal(picked.stamp[0], windows.stamp[9])
    mask = windows.subset(torch.tensor([s == "B" for s in windows.series]))
    assert mask.series == ["B"] * 5 and mask.start.tolist() == [0, 5, 10, 15, 20]
    assert len(windows.subset(torch.zeros(0, dtype=torch.int64))) == 0


# -- errors -----------------------------------------------------------------------------------


def test_too_short_for_one_window():
    frame = _frame({"A": 12, "B": 9})
    exc = _refused(frame, lookback=10, horizon=5, val_fraction=0.0)
    assert exc.field == "history" and exc.series is None
    assert "needs at least 15 candles for one window of lookback+horizon (10+5)" in exc.rule
    assert "longest series has 12" in exc.rule
    exc = _refused(_frame({"A": 16}), lookback=10, horizon=5)  # 16 candles, a training part of 12
    assert "needs at least 15 candles" in exc.rule and "val_fraction=0.2" in exc.rule and "12" in exc.rule


def test_no_validation_window():
    exc = _refused(_frame({"A": 20}), lookback=10, horizon=5, val_fraction=0.2)  # 16 train, 4 left
    assert exc.field == "history" and exc.series is None
    assert "val_fraction=0.2" in exc.rule and "needs 15 candles" in exc.rule and "has 4" in exc.rule
    assert len(make_windows(_frame({"A": 20}), 10, 5, val_fraction=0.0).train) == 6


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"lookback": 1}, "lookback"),
        ({"lookback": 0}, "lookback"),
        ({"lookback": 4.0}, "lookback"),
        ({"lookback": True}, "lookback"),
        ({"horizon": 0}, "horizon"),
        ({"horizon": -3}, "horizon"),
        ({"stride": 0}, "stride"),
        ({"clip": 0.0}, "clip"),
        ({"clip": float("nan")}, "clip"),
    ],
)
def test_bad_parameters(kw, field):
    args = {"lookback": 4, "horizon": 2} | kw
    exc = _refused(random_walk_candles(50), **args)
    assert exc.field == field and str(kw[field]) in exc.rule


@pytest.mark.parametrize("val_fraction", [-0.1, 1.0, 1.5, float("nan"), "0.2"])
def test_bad_val_fraction(val_fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        make_windows(random_walk_candles(50), 4, 2, val_fraction=val_fraction)


def test_missing_column_is_the_inference_error():
    frame = random_walk_candles(50).drop(columns=["close"])
    exc = _refused(frame, 4, 2)
    assert exc.field == "close" and "required column missing" in exc.rule


def test_bad_candle_names_series_and_row():
    frame = _frame({"A": 30, "B": 30})
    frame.loc[45, "high"] = np.nan
    exc = _refused(frame, 4, 2)
    assert exc.field == "high" and exc.series == "B" and "row 45" in exc.rule


# -- digest -----------------------------------------------------------------------------------


def test_data_digest_stable_under_row_order_and_sensitive_to_values():
    frame = _frame({"A": 50, "B": 30}, volume=True, amount=False)
    digest = data_digest(frame)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert data_digest(frame.copy()) == digest
    assert data_digest(frame.sample(frac=1.0, random_state=1)) == digest
    assert data_digest(frame.iloc[::-1].set_index(np.arange(80) * 3)) == digest
    changed = frame.copy()
    changed.loc[17, "volume"] += 1.0
    assert data_digest(changed) != digest
    later = frame.copy()
    later.loc[79, "timestamp"] += pd.Timedelta(minutes=1)
    assert data_digest(later) != digest
    assert data_digest(frame.assign(series_id=frame["series_id"].replace({"B": "C"}))) != digest
    # the validated candles: an explicit amount equal to the one derived digests the same
    prices = frame[["open", "high", "low", "close"]].to_numpy()
    assert data_digest(frame.assign(amount=frame["volume"].to_numpy() * prices.mean(axis=1))) == digest


def test_data_digest_validates():
    with pytest.raises(KronosInputError) as info:
        data_digest(random_walk_candles(10).drop(columns=["open"]))
    assert info.value.field == "open"


# -- real data --------------------------------------------------------------------------------


def test_real_indexes_smoke():
    history = load_indexes()  # SP500 and NASDAQ daily bars, ~5k each
    split = make_windows(history, lookback=64, horizon=16)
    for windows in (split.train, split.val):
        assert windows.x.shape[1:] == (80, 6) and len(windows) > 1000
        assert torch.isfinite(windows.x).all() and windows.x.abs().max() <= 5.0
        assert torch.isfinite(windows.stamp).all()
        assert list(dict.fromkeys(windows.series)) == ["SP500", "NASDAQ"]
    assert split.describe().startswith(f"{len(split.train)} train / {len(split.val)} val windows of 80 candles")
