"""In-process checks of the pure parts: backtest metrics, the gate and the event lineage."""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

from registry_scripts.backtest import BacktestSpec, cut_windows, persistence_paths, score
from registry_scripts.events import champion_lineage
from registry_scripts.gate import GatePolicy, check


def _candles(n: int) -> pd.DataFrame:
    close = 100 + np.arange(n, dtype=float)
    return pd.DataFrame(
        {
            "series_id": "s",
            "timestamp": pd.date_range("2024-01-01", periods=n, freq="D"),
            "open": close,
            "high": close + 1,
            "low": close - 1,
            "close": close,
        }
    )


def test_windows_are_rolling_origin_and_persistence_scores_mase_one() -> None:
    spec = BacktestSpec(windows=3, context=10, horizon=4)
    windows = cut_windows(_candles(40), spec)
    assert [w.actual["close"].iloc[0] for w in windows] == [128.0, 132.0, 136.0]
    assert all(len(w.history) == 10 and len(w.actual) == 4 for w in windows)
    baseline = score(persistence_paths(windows), windows, spec.band, baseline_mae=None)
    assert baseline["mae"] == 2.5  # steps 1..4 on a +1/day line
    perfect = np.stack([w.actual["close"].to_numpy()[None, :] for w in windows])
    metrics = score(perfect, windows, spec.band, baseline["mae"])
    assert metrics["mase"] == 0.0 and metrics["direction_acc"] == 1.0


def test_crps_and_coverage_from_sample_paths() -> None:
    spec = BacktestSpec(windows=1, context=5, horizon=2)
    windows = cut_windows(_candles(7), spec)
    actual = windows[0].actual["close"].to_numpy()
    same = np.repeat(actual[None, None, :] + 1.0, 4, axis=1)  # four identical paths, off by 1
    metrics = score(same, windows, (0.1, 0.9), baseline_mae=1.0)
    assert np.isclose(metrics["crps"], 1.0) and metrics["coverage"] == 0.0  # CRPS of a point = MAE
    spread = actual[None, None, :] + np.array([-2.0, -1.0, 1.0, 2.0])[None, :, None]
    assert score(spread, windows, (0.1, 0.9), baseline_mae=1.0)["coverage"] == 1.0


def _version(number: str, mase: float | None, setup: str = "s1") -> ModelVersion:
    tags = {"eval.mase": str(mase), "eval.setup": setup} if mase is not None else {}
    return ModelVersion("kronos", number, creation_timestamp=0, tags=[ModelVersionTag(k, v) for k, v in tags.items()])


def test_gate_needs_persistence_beaten_and_champion_matched() -> None:
    policy = GatePolicy(max_mase=1.0, tolerance=0.05)
    assert check(_version("2", 0.9), None, policy).passed
    assert not check(_version("2", 1.2), None, policy).passed
    assert check(_version("2", 0.92), _version("1", 0.9), policy).passed  # within 5 %
    assert not check(_version("2", 0.99), _version("1", 0.9), policy).passed  # 10 % worse
    assert not check(_version("2", 0.5), _version("1", 0.9, "other"), policy).passed
    assert not check(_version("2", None), None, policy).passed


def test_lineage_rolls_back_through_promotions() -> None:
    events = [
        {"action": "promote", "version": "1"},
        {"action": "promote", "version": "2"},
        {"action": "promote", "version": "3"},
        {"action": "rollback", "version": "2"},
    ]
    assert champion_lineage(events) == ["1", "2"]
    events.append({"action": "promote", "version": "1"})
    assert champion_lineage(events) == ["1", "2", "1"]
