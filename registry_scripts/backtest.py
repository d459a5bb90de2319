"""Rolling-origin backtest: cut windows, forecast them, and score forecasts (numpy only).

A window is `context` candles of history and the `horizon` candles after them. Origins
step back from the end of every series by `step` (default: `horizon`, so test blocks do
not overlap). All scores are on `close`:

- MAE, RMSE of the mean forecast;
- MASE = MAE / MAE of the persistence forecast (last close repeated) on the same windows,
  so MASE < 1 means "beats persistence";
- directional accuracy: sign of (forecast - last close) equals sign of (actual - last close);
- with several sample paths: CRPS (sample estimator E|X-y| - E|X-X'|/2) and coverage of the
  [q_low, q_high] band (share of actual closes inside it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class BacktestSpec:
    """How to cut windows and sample forecasts."""

    windows: int = 6
    context: int = 128
    horizon: int = 10
    step: int | None = None
    samples: int = 8
    seed: int = 0
    band: tuple[float, float] = (0.1, 0.9)

    def describe(self) -> dict[str, object]:
        return {
            "windows": self.windows,
            "context": self.context,
            "horizon": self.horizon,
            "step": self.step or self.horizon,
            "samples": self.samples,
            "seed": self.seed,
            "band_low": self.band[0],
            "band_high": self.band[1],
        }


@dataclass
class Window:
    """One backtest window of one series."""

    window_id: str
    series_id: str
    history: pd.DataFrame  # [context, columns]
    actual: pd.DataFrame  # [horizon, columns]


def cut_windows(candles: pd.DataFrame, spec: BacktestSpec) -> list[Window]:
    """Up to `spec.windows` windows per series, latest origin last; raises ValueError when
    no series is long enough."""
    step = spec.step or spec.horizon
    windows: list[Window] = []
    for series_id, series in candles.groupby("series_id", sort=True):
        series = series.reset_index(drop=True)
        n = len(series)
        for k in range(spec.windows, 0, -1):
            origin = n - spec.horizon - (k - 1) * step
            if origin - spec.context < 0:
                continue
            windows.append(
                Window(
                    f"{series_id}#{origin}",
                    str(series_id),
                    series.iloc[origin - spec.context : origin].reset_index(drop=True),
                    series.iloc[origin : origin + spec.horizon].reset_index(drop=True),
                )
            )
    if not windows:
        raise ValueError(f"no series has context + horizon = {spec.context + spec.horizon} candles")
    return windows


def persistence_paths(windows: list[Window]) -> np.ndarray:
    """[W, 1, H] the last context close repeated over the horizon."""
    return np.stack([np.full((1, len(w.actual)), w.history["close"].iloc[-1]) for w in windows])


def crps_samples(paths: np.ndarray, actual: np.ndarray) -> float:
    """Mean sample CRPS. paths [W, S, H], actual [W, H]."""
    spread = np.abs(paths - actual[:, None, :]).mean(axis=1)  # [W, H]
    pairwise = np.abs(paths[:, :, None, :] - paths[:, None, :, :]).mean(axis=(1, 2))  # [W, H]
    return float((spread - 0.5 * pairwise).mean())


def score(
    paths: np.ndarray, windows: list[Window], band: tuple[float, float], baseline_mae: float | None
) -> dict[str, float]:
    """Metrics of close forecasts. paths [W, S, H] sampled closes (S=1: point forecast)."""
    actual = np.stack([w.actual["close"].to_numpy() for w in windows])  # [W, H]
    last = np.array([w.history["close"].iloc[-1] for w in windows])[:, None]  # [W, 1]
    mean = paths.mean(axis=1)  # [W, H]
    error = mean - actual
    metrics = {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error**2).mean()))}
    if baseline_mae is not None:
        metrics["mase"] = metrics["mae"] / baseline_mae if baseline_mae > 0 else float("nan")
    moved = np.sign(mean - last)
    if np.any(moved != 0):
        metrics["direction_acc"] = float((moved == np.sign(actual - last)).mean())
    if paths.shape[1] > 1:
        low, high = np.quantile(paths, band, axis=1)  # [W, H] each
        metrics["crps"] = crps_samples(paths, actual)
        metrics["coverage"] = float(((actual >= low) & (actual <= high)).mean())
    return metrics


def windows_table(windows: list[Window], paths: np.ndarray) -> pd.DataFrame:
    """One row per window and step: actual, mean forecast and persistence close."""
    rows = []
    for w, window_paths in zip(windows, paths, strict=True):
        last = float(w.history["close"].iloc[-1])
        for h in range(len(w.actual)):
            rows.append(
                {
                    "window": w.window_id,
                    "series_id": w.series_id,
                    "context_start": w.history["timestamp"].iloc[0],
                    "origin": w.history["timestamp"].iloc[-1],
                    "step": h + 1,
                    "timestamp": w.actual["timestamp"].iloc[h],
                    "actual_close": float(w.actual["close"].iloc[h]),
                    "forecast_close": float(window_paths[:, h].mean()),
                    "persistence_close": last,
                }
            )
    return pd.DataFrame(rows)
