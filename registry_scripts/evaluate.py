"""`kronos-registry evaluate`: backtest model versions against persistence and record it.

Each version gets its own MLflow run (experiment `kronos-evaluation`) tagged with the
version it scored, holding params, metrics (its own and the persistence baseline's), the
windows as `windows.csv` and a fan chart `fan_chart.png`; the headline metrics are copied
to the version as `eval.*` tags, which `promote` reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # the OO API: no pyplot, no GUI backend
from mlflow.entities.model_registry import ModelVersion
from tqdm import tqdm

from model_package import KronosForecaster
from model_package.frames import CANDLE_COLUMNS

from .backtest import BacktestSpec, Window, cut_windows, persistence_paths, score, windows_table
from .errors import BadDataError
from .registry import EVAL_EXPERIMENT, Registry, start_run

CHUNK = 4  # windows per forecast call (one progress-bar tick)
FAN_WINDOWS = 3


def setup_digest(spec: BacktestSpec, data: str, rows: int) -> str:
    """Identifies an evaluation setup: only metrics with the same digest are comparable."""
    payload = json.dumps({"data": data, "rows": rows, **spec.describe()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _chunks(windows: list[Window], size: int) -> Iterator[list[Window]]:
    for start in range(0, len(windows), size):
        yield windows[start : start + size]


def load_forecaster(registry: Registry, version: ModelVersion) -> KronosForecaster:
    """The KronosForecaster inside a registered version's pyfunc."""
    model = mlflow.pyfunc.load_model(f"models:/{registry.model_name}/{version.version}")
    return model.unwrap_python_model().forecaster


def sample_candles(
    forecaster: KronosForecaster,
    windows: list[Window],
    spec: BacktestSpec,
    progress: tqdm | None = None,
    chunk_size: int = CHUNK,
) -> np.ndarray:
    """[W, S, H, 6] sampled candles (CANDLE_COLUMNS) for every window, `chunk_size` windows a
    forecast call (the chunking decides the per-series seeds, so keep it to reproduce)."""
    out = []
    for chunk in _chunks(windows, chunk_size):
        history = pd.concat([w.history.assign(series_id=w.window_id) for w in chunk], ignore_index=True)
        future = pd.concat(
            [pd.DataFrame({"series_id": w.window_id, "timestamp": w.actual["timestamp"]}) for w in chunk],
            ignore_index=True,
        )
        paths = forecaster.predict_paths(
            history, spec.horizon, future_timestamps=future, sample_count=spec.samples, seed=spec.seed
        )
        for w in chunk:
            rows = paths.loc[paths["series_id"] == w.window_id].sort_values(["path", "timestamp"])
            out.append(rows[list(CANDLE_COLUMNS)].to_numpy().reshape(spec.samples, spec.horizon, len(CANDLE_COLUMNS)))
        if progress is not None:
            progress.update(1)
    return np.stack(out)


def sample_paths(forecaster: KronosForecaster, windows: list[Window], spec: BacktestSpec, progress: tqdm) -> np.ndarray:
    """[W, S, H] sampled close paths for every window (batched, `CHUNK` windows a call)."""
    return sample_candles(forecaster, windows, spec, progress)[..., CANDLE_COLUMNS.index("close")]


def fan_chart(windows: list[Window], paths: np.ndarray, band: tuple[float, float], title: str) -> Figure:
    """Context tail, actual closes, mean forecast and the quantile band of a few windows."""
    shown = list(range(len(windows)))[-FAN_WINDOWS:]
    fig = Figure(figsize=(5 * len(shown), 3.5))
    axes = fig.subplots(1, len(shown), squeeze=False)
    for ax, index in zip(axes[0], shown, strict=True):
        w, p = windows[index], paths[index]
        tail = w.history.tail(3 * len(w.actual))
        ax.plot(tail["timestamp"], tail["close"], color="black", lw=1, label="history")
        ax.plot(w.actual["timestamp"], w.actual["close"], color="black", ls="--", lw=1, label="actual")
        ax.plot(w.actual["timestamp"], p.mean(axis=0), color="tab:blue", label="forecast mean")
        if p.shape[0] > 1:
            low, high = np.quantile(p, band, axis=0)
            ax.fill_between(
                w.actual["timestamp"], low, high, color="tab:blue", alpha=0.25, label=f"q{band[0]:g}-q{band[1]:g}"
            )
        ax.set_title(w.window_id, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}


def record(
    registry: Registry,
    version: ModelVersion,
    spec: BacktestSpec,
    data: str,
    digest: str,
    windows: list[Window],
    paths: np.ndarray,
    metrics: dict[str, float],
    baseline: dict[str, float],
) -> str:
    """Log one version's evaluation run and copy its headline metrics to version tags."""
    name = registry.model_name
    with start_run(registry, EVAL_EXPERIMENT, f"eval-{name}-v{version.version}") as run:
        mlflow.set_tags(
            {
                "kronos.model_name": name,
                "kronos.model_version": version.version,
                "kronos.model_uri": f"models:/{name}/{version.version}",
                "kronos.eval_setup": digest,
                "kronos.data": data,
            }
        )
        mlflow.log_params(
            {**spec.describe(), "data": data, "model_version": version.version, "n_windows": len(windows)}
        )
        mlflow.log_metrics(_finite(metrics))
        mlflow.log_metrics({f"persistence_{k}": v for k, v in _finite(baseline).items()})
        mlflow.log_text(windows_table(windows, paths).to_csv(index=False), "windows.csv")
        mlflow.log_figure(fan_chart(windows, paths, spec.band, f"{name} v{version.version} on {data}"), "fan_chart.png")
    tags = {f"eval.{k}": f"{v:.6g}" for k, v in metrics.items()}
    tags.update(
        {
            "eval.run_id": run.info.run_id,
            "eval.setup": digest,
            "eval.data": data,
            "eval.windows": str(len(windows)),
            "eval.persistence_mae": f"{baseline['mae']:.6g}",
            "eval.at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    for key, value in tags.items():
        registry.client.set_model_version_tag(name, version.version, key, value)
    return run.info.run_id


def evaluate(
    registry: Registry, versions: list[ModelVersion], candles: pd.DataFrame, data: str, spec: BacktestSpec
) -> dict[str, dict[str, float]]:
    """Backtest each version and persistence on the same windows; returns metrics by label."""
    try:
        windows = cut_windows(candles, spec)
    except ValueError as exc:
        raise BadDataError(f"{data}: {exc}") from None
    digest = setup_digest(spec, data, len(candles))
    baseline = score(persistence_paths(windows), windows, spec.band, baseline_mae=None)
    baseline["mase"] = 1.0
    results: dict[str, dict[str, float]] = {"persistence": baseline}
    total = len(versions) * math.ceil(len(windows) / CHUNK)
    with tqdm(
        total=total, desc="backtest", unit="chunk", file=sys.stderr, disable=None, dynamic_ncols=True
    ) as progress:
        for version in versions:
            progress.set_postfix_str(f"v{version.version}")
            paths = sample_paths(load_forecaster(registry, version), windows, spec, progress)
            metrics = score(paths, windows, spec.band, baseline["mae"])
            record(registry, version, spec, data, digest, windows, paths, metrics, baseline)
            results[f"v{version.version}"] = metrics
    return results


def format_results(results: dict[str, dict[str, float]]) -> str:
    """A small text table of the metrics per label."""
    columns = ["mae", "rmse", "mase", "direction_acc", "crps", "coverage"]
    lines = [f"{'model':<12}" + "".join(f"{c:>14}" for c in columns)]
    for label, metrics in results.items():
        cells = "".join(f"{metrics[c]:>14.4f}" if isinstance(metrics.get(c), float) else f"{'-':>14}" for c in columns)
        lines.append(f"{label:<12}{cells}")
    return "\n".join(lines)
