"""Throughput of batch forecasting, series per second, four ways on the same input:

    python -m batch.bench                                # 2,000 series x 256 candles -> 20, greedy
    python -m batch.bench --series 60 --loop-series 20   # a quick run
    python -m batch.bench --modes spark2,pyfunc --json bench.json

- `spark1`, `spark2`: the batch job (`batch.spark_job.run_job`) on `local[1]` / `local[2]`,
  torch threads per worker = cores // slots; the session (JVM start) is created before the
  clock, the job's own overhead (read, shuffle, worker model loads, writes) is inside it;
- `pyfunc`: one in-process `pyfunc.predict` call on every series (limits raised to fit);
- `loop`: `pyfunc.predict` on each series alone (`--loop-series M`: the first M series are
  timed and series/s extrapolated), the baseline of the ratios.

In-process modes use 2 torch threads; the pyfunc load is outside the clock. The shipped
demo model is registered in a temporary sqlite registry (alias `champion`), and the
input is random-walk candles written to Parquet in the same temporary folder. Forecasts
are greedy (top_k=1), so Spark's and pyfunc's `close` are compared (printed, not asserted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient

from model_package.data import random_walk_candles
from model_package.demo import DEMO_MAX_CONTEXT, demo_checkpoints
from model_package.frames import SERIES_ID, TIMESTAMP
from model_package.log_model import log_kronos_model
from model_package.pyfunc import sampling_params

from .cli import worker_threads
from .model import PinnedModel, pin_model
from .options import BatchOptions, BatchSettings
from .spark_job import JobRequest, run_job, spark_session

MODES = ("spark1", "spark2", "pyfunc", "loop")
MASTERS = {"spark1": "local[1]", "spark2": "local[2]"}
IN_PROCESS_THREADS = 2
SEED = 0
DESCRIPTION = "Series/s of Spark local[1], local[2], one pyfunc.predict and a per-series pyfunc loop."


@dataclass
class Row:
    """One mode's timing: `series` forecast in `seconds` (wall time)."""

    mode: str
    series: int
    seconds: float
    note: str = ""

    @property
    def series_per_second(self) -> float:
        return self.series / self.seconds if self.seconds > 0 else math.nan


def make_input(series: int, history: int) -> pd.DataFrame:
    """`series` random walks of `history` candles each, long format ([series x history] rows)."""
    parts = [random_walk_candles(history, seed=i, series_id=f"s{i:05d}") for i in range(series)]
    return pd.concat(parts, ignore_index=True)


def raise_limits(series: int, history: int, pred_len: int) -> None:
    """Let one pyfunc request carry every series (read by ModelSettings at load)."""
    os.environ["KRONOS_MAX_SERIES_PER_REQUEST"] = str(max(series, 64))
    os.environ["KRONOS_MAX_HISTORY_CANDLES"] = str(max(history, 4096))
    os.environ["KRONOS_MAX_REQUEST_CANDLES"] = str(max(series * pred_len, 262_144))
    os.environ["KRONOS_MAX_REQUEST_MEMORY_MB"] = str(1 << 20)  # 1 TiB: the bench's own choice of size


def register_demo(tmp: Path) -> PinnedModel:
    """The demo model in a sqlite registry under `tmp`, as `models:/kronos@champion`, pinned."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    client = MlflowClient()
    experiment = client.create_experiment("kronos-batch-bench", artifact_location=(tmp / "artifacts").as_uri())
    tokenizer, model = demo_checkpoints()
    with mlflow.start_run(experiment_id=experiment):
        info = log_kronos_model(tokenizer, model, registered_model_name="kronos", max_context=DEMO_MAX_CONTEXT)
    client.set_registered_model_alias("kronos", "champion", str(info.registered_model_version))
    return pin_model("models:/kronos@champion", client)


def time_spark(mode: str, job: JobRequest) -> tuple[Row, pd.DataFrame]:
    """Run the job on a fresh local session (created before the clock, stopped after)."""
    spark = spark_session(MASTERS[mode])
    try:
        started = time.perf_counter()
        summary = run_job(spark, job)
        seconds = time.perf_counter() - started
    finally:
        spark.stop()
    note = f"{job.worker_threads} torch thread(s)/worker; {summary.series_failed} failed"
    forecasts = pd.read_parquet(summary.forecasts_path)
    return Row(mode, summary.series_ok + summary.series_failed, seconds, note), forecasts


def max_relative_diff(left: pd.DataFrame, right: pd.DataFrame, column: str = "close") -> tuple[float, int]:
    """max |left - right| / |right| of `column` over the (series_id, timestamp) rows both
    hold, and how many rows only one of them holds."""
    keys = [SERIES_ID, TIMESTAMP]
    frames = [
        f[[*keys, column]].assign(**{TIMESTAMP: pd.to_datetime(f[TIMESTAMP]).astype("datetime64[ns]")})
        for f in (left, right)
    ]
    both = frames[0].merge(frames[1], on=keys, how="outer", suffixes=("_a", "_b"), indicator=True)
    matched = both[both["_merge"] == "both"]
    a, b = matched[f"{column}_a"].to_numpy(float), matched[f"{column}_b"].to_numpy(float)
    diff = float(np.max(np.abs(a - b) / np.abs(b))) if len(matched) else math.nan
    return diff, int((both["_merge"] != "both").sum())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every requested mode on one input; returns the numbers (also printed)."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    raise_limits(args.series, args.history, args.pred_len)
    params = {"pred_len": args.pred_len, "top_k": 1, "seed": SEED}
    rows: list[Row] = []
    checks: dict[str, dict[str, float | int]] = {}
    spark_forecasts: dict[str, pd.DataFrame] = {}
    with tempfile.TemporaryDirectory(prefix="kronos-batch-bench-") as folder:
        tmp = Path(folder)
        candles = make_input(args.series, args.history)
        input_path = str(tmp / "candles.parquet")
        candles.to_parquet(input_path, index=False, coerce_timestamps="us")
        pinned = register_demo(tmp)
        options = BatchOptions(sampling_params(params), pinned.version, chunk_series=args.chunk_series)
        for mode in (m for m in MODES if m in modes and m in MASTERS):
            threads = worker_threads(0, MASTERS[mode])
            job = JobRequest(
                input_path, str(tmp / f"out-{mode}"), pinned, options, overwrite=True, worker_threads=threads
            )
            row, spark_forecasts[mode] = time_spark(mode, job)
            rows.append(row)
        if "pyfunc" in modes or "loop" in modes:
            import torch

            torch.set_num_threads(IN_PROCESS_THREADS)
            model = mlflow.pyfunc.load_model(pinned.load_uri)
            if "pyfunc" in modes:
                started = time.perf_counter()
                predicted = model.predict(candles, params=params)
                rows.append(Row("pyfunc", args.series, time.perf_counter() - started, "one predict call"))
                for mode, forecasts in spark_forecasts.items():
                    diff, unmatched = max_relative_diff(forecasts, predicted)
                    checks[f"{mode}_vs_pyfunc"] = {"max_rel_diff_close": diff, "unmatched_rows": unmatched}
            if "loop" in modes:
                count = min(args.loop_series or args.series, args.series)
                groups = [group for _, group in candles.groupby(SERIES_ID, sort=True)][:count]
                started = time.perf_counter()
                for group in groups:
                    model.predict(group, params=params)
                seconds = time.perf_counter() - started
                note = f"{count} of {args.series} series timed, series/s extrapolated" if count < args.series else ""
                rows.append(Row("loop", count, seconds, note))
    return report(args, rows, checks)


def report(args: argparse.Namespace, rows: list[Row], checks: dict[str, dict[str, float | int]]) -> dict[str, Any]:
    """Print the table and the checks; the same numbers as a dict."""
    loop = next((r for r in rows if r.mode == "loop"), None)
    print(
        f"{args.series} series x {args.history} candles -> pred_len {args.pred_len}, greedy, demo model, "
        f"chunk_series {args.chunk_series}, {os.cpu_count()} cores"
    )
    print(f"{'mode':<8} {'seconds':>9} {'series/s':>10} {'vs loop':>8}  note")
    result_rows = []
    for row in rows:
        ratio = row.series_per_second / loop.series_per_second if loop else math.nan
        shown = f"{ratio:.2f}x" if loop else "-"
        print(f"{row.mode:<8} {row.seconds:>9.2f} {row.series_per_second:>10.1f} {shown:>8}  {row.note}")
        result_rows.append({**asdict(row), "series_per_second": row.series_per_second, "ratio_vs_loop": ratio})
    for name, check in checks.items():
        print(
            f"check {name}: max |a-b|/|b| of close = {check['max_rel_diff_close']:.3g} "
            f"({check['unmatched_rows']} rows in only one output)"
        )
    if not checks:
        print("check: skipped (needs pyfunc and a spark mode)")
    return {
        "series": args.series,
        "history": args.history,
        "pred_len": args.pred_len,
        "chunk_series": args.chunk_series,
        "cores": os.cpu_count(),
        "rows": result_rows,
        "checks": checks,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m batch.bench", description=DESCRIPTION)
    parser.add_argument("--series", type=int, default=2000, help="series in the input (default: %(default)s)")
    parser.add_argument("--history", type=int, default=DEMO_MAX_CONTEXT, help="candles per series")
    parser.add_argument("--pred-len", type=int, default=20, help="forecast steps per series")
    parser.add_argument("--chunk-series", type=int, default=BatchSettings().chunk_series, help="series per model call")
    parser.add_argument("--modes", default=",".join(MODES), help="any of %(default)s, comma-separated")
    parser.add_argument("--loop-series", type=int, default=None, help="series timed by the loop (default: all)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
