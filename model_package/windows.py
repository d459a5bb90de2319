"""Training windows for fine-tuning Kronos, cut from long-format candles.

The frame is validated and split exactly as for inference (`frames.split_series`: same
errors, same filling of a missing volume / amount). From each series, windows of
T = lookback + horizon consecutive candles start every `stride` candles. Each window is
normalised with the mean and population std (ddof 0, float32) of its first `lookback` rows
only, z = (x - mean) / (std + 1e-5), clipped to [-clip, clip], applied to all T rows: the
horizon rows are scaled by what the model could see, as in upstream Kronos's fine-tuning
dataset.

Split per series, in time order and without leakage: with L candles, the first
n_train = floor(L * (1 - val_fraction)) hold the training windows (each ends within them),
the remaining L - n_train the validation windows (each starts at or after n_train, so after
the end of every training window: no candle is in both). val_fraction=0: no validation
windows. A series with no training window is skipped (an error only when every series is).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .calendar import calendar_features, parse_timestamps
from .errors import KronosInputError, brief, checked_int, checked_real
from .frames import CANDLE_COLUMNS, NORM_EPS, TIMESTAMP, Series, check_frame, split_series

N_FEATURES = len(CANDLE_COLUMNS)  # 6: open, high, low, close, volume, amount
N_STAMP = 5  # minute, hour, weekday, day, month
DIGEST_VERSION = b"kronos-candles-digest-v1"


@dataclass
class Windows:
    """N windows of T candles."""

    x: torch.Tensor  # [N, T, 6] float32, normalised with the lookback rows' stats, clipped
    stamp: torch.Tensor  # [N, T, 5] float32 calendar features (minute, hour, weekday, day, month)
    series: list[str]  # [N] series label of each window
    start: torch.Tensor  # [N] int64 index of the window's first candle within its series

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: torch.Tensor) -> Windows:
        """The rows selected by `index` (int64 positions [M] or a bool mask [N])."""
        index = torch.as_tensor(index).reshape(-1)
        if index.dtype == torch.bool:
            index = index.nonzero().reshape(-1)
        index = index.long()
        return Windows(
            x=self.x[index],
            stamp=self.stamp[index],
            series=[self.series[i] for i in index.tolist()],
            start=self.start[index],
        )


@dataclass
class WindowSplit:
    """Training and validation windows (time-ordered split per series)."""

    train: Windows
    val: Windows
    lookback: int
    horizon: int

    def describe(self) -> str:
        """One line: window counts, series, window length."""
        names = list(dict.fromkeys(self.train.series))
        return (
            f"{len(self.train)} train / {len(self.val)} val windows of {self.lookback + self.horizon} candles "
            f"(lookback {self.lookback} + horizon {self.horizon}) from {len(names)} series {brief(names, 120)}"
        )


def make_windows(
    history: pd.DataFrame,
    lookback: int,
    horizon: int,
    *,
    val_fraction: float = 0.2,
    stride: int = 1,
    clip: float = 5.0,
    strict_candles: bool = True,
) -> WindowSplit:
    """Long-format candles -> training and validation windows, x [N, T, 6], stamp [N, T, 5].

    Output order: series in order of first appearance, windows by start within a series."""
    lookback = checked_int("lookback", lookback, 2)
    horizon = checked_int("horizon", horizon, 1)
    stride = checked_int("stride", stride, 1)
    if not 0 <= checked_real("val_fraction", val_fraction) < 1:
        raise KronosInputError("val_fraction", f"must be a number in [0, 1), got {brief(val_fraction)}")
    if not checked_real("clip", clip) > 0:
        raise KronosInputError("clip", f"must be a finite number > 0, got {brief(clip)}")
    T = lookback + horizon
    all_series = split_series(history, min_length=1, strict=strict_candles)

    train_parts: list[tuple[Series, np.ndarray]] = []
    val_parts: list[tuple[Series, np.ndarray]] = []
    longest, longest_train, longest_val = 0, 0, 0
    for s in all_series:
        L = len(s.candles)
        n_train = _train_length(L, float(val_fraction))
        longest, longest_train = max(longest, L), max(longest_train, n_train)
        if n_train < T:
            continue  # too short for one training window: skipped
        longest_val = max(longest_val, L - n_train)
        train_parts.append((s, np.arange(0, n_train - T + 1, stride)))
        val_parts.append((s, np.arange(n_train, L - T + 1, stride)))  # empty when val_fraction=0

    if not train_parts:
        rule = f"needs at least {T} candles for one window of lookback+horizon ({lookback}+{horizon})"
        if val_fraction > 0:
            rule += (
                f" in the training part of a series (its first {1 - val_fraction:g}, val_fraction={val_fraction:g}), "
                f"longest series has {longest} (a training part of {longest_train})"
            )
        else:
            rule += f", longest series has {longest}"
        raise KronosInputError("history", rule)
    if val_fraction > 0 and not any(len(starts) for _, starts in val_parts):
        raise KronosInputError(
            "history",
            f"no validation window fits with val_fraction={val_fraction:g}: one needs {T} candles in the "
            f"validation part of a series (its last {val_fraction:g}), the longest such part has {longest_val}; "
            "use longer series, a larger val_fraction, or val_fraction=0",
        )
    return WindowSplit(
        train=_cut(train_parts, lookback, horizon, float(clip)),
        val=_cut(val_parts, lookback, horizon, float(clip)),
        lookback=lookback,
        horizon=horizon,
    )


def _train_length(L: int, val_fraction: float) -> int:
    """floor(L * (1 - val_fraction)); the 1e-9 keeps 10 * (1 - 0.9) = 0.99999... from losing a candle."""
    return min(L, math.floor(L * (1.0 - val_fraction) + 1e-9))


def _cut(parts: list[tuple[Series, np.ndarray]], lookback: int, horizon: int, clip: float) -> Windows:
    """Windows of T candles at the given starts of each series, normalised and stacked."""
    T = lookback + horizon
    offsets = np.arange(T)
    xs, stamps, labels, starts = [], [], [], []
    for s, st in parts:
        if len(st) == 0:
            continue
        rows = st[:, None] + offsets  # [n, T]
        xs.append(normalise_windows(s.candles[rows], lookback, clip))
        stamps.append(calendar_features(s.timestamps)[rows])
        labels += [str(s.label)] * len(st)
        starts.append(st)
    if not xs:
        return Windows(
            x=torch.zeros(0, T, N_FEATURES),
            stamp=torch.zeros(0, T, N_STAMP),
            series=[],
            start=torch.zeros(0, dtype=torch.int64),
        )
    return Windows(
        x=torch.from_numpy(np.concatenate(xs)),
        stamp=torch.from_numpy(np.concatenate(stamps).astype(np.float32)),
        series=labels,
        start=torch.from_numpy(np.concatenate(starts).astype(np.int64)),
    )


def normalise_windows(windows: np.ndarray, lookback: int, clip: float) -> np.ndarray:
    """windows [N, T, 6] float32 raw candles -> [N, T, 6] float32 z-scores, clipped.

    Mean and population std of each window's first `lookback` rows (float32 arithmetic),
    z = (x - mean) / (std + 1e-5) for all T rows."""
    past = windows[:, :lookback]  # [N, lookback, 6]
    mean = past.mean(axis=1, keepdims=True)  # [N, 1, 6]
    std = past.std(axis=1, keepdims=True)  # [N, 1, 6], ddof 0
    z = np.clip((windows - mean) / (std + np.float32(NORM_EPS)), -clip, clip)
    return z.astype(np.float32, copy=False)


def data_digest(history: pd.DataFrame) -> str:
    """sha256 hex (first 16 chars) of the validated candles: series ids, timestamps, the six
    candle columns after filling missing volume / amount. The same for any row order of the
    input (rows are sorted by timestamp, series by repr of their id) and across runs.

    Candle rules are checked without `strict_candles` (the digest describes the data, not
    the policy); rows quoted in error messages are those of the time-sorted frame."""
    frame = check_frame(history).reset_index(drop=True)
    when = parse_timestamps(frame[TIMESTAMP], TIMESTAMP, None)
    order = np.argsort(when.as_unit("ns").asi8, kind="stable")
    all_series = split_series(frame.iloc[order], min_length=1, strict=False)
    sha = hashlib.sha256(DIGEST_VERSION)
    for key, s in sorted(((_id_key(s.series_id), s) for s in all_series), key=lambda pair: pair[0]):
        sha.update(key.encode())
        sha.update(np.int64(len(s.candles)).tobytes())
        sha.update(s.timestamps.as_unit("ns").asi8.astype("<i8").tobytes())
        sha.update(np.ascontiguousarray(s.candles, dtype="<f4").tobytes())
    return sha.hexdigest()[:16]


def _id_key(series_id: object | None) -> str:
    """repr of a series id, the same for numpy and Python integers (1 and "1" differ)."""
    return repr(int(series_id)) if isinstance(series_id, np.integer) else repr(series_id)


__all__ = ["WindowSplit", "Windows", "data_digest", "make_windows", "normalise_windows"]
