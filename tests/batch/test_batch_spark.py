"""`kronos-batch` on a real local Spark, loading the model from a real MLflow server on
PostgreSQL: 200 series of mixed lengths with rows shuffled across series, some bad."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from batch_helpers import BAD_FIELDS, BatchRegistry, good_ids, mixed_candles, one_series

from batch.options import id_seed
from batch.series import realised_column
from model_package.frames import CANDLE_COLUMNS
from model_package.kronos.checkpoint import weights_sha256
from serving.local_server import tracking_uri

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]  # the checkout (MLproject)

GOOD = 194  # + 6 bad series = 200
PRED_LEN = 4
JOB_TIMEOUT_S = 600


def run_batch(registry: BatchRegistry, *args: str) -> subprocess.CompletedProcess:
    """`python -m batch ...` (= kronos-batch) as a user runs it, against the test registry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYSPARK_", "KRONOS_"))}
    env.update({"MLFLOW_TRACKING_URI": registry.url, "OMP_NUM_THREADS": "1", "KRONOS_DEVICE": "cpu"})
    return subprocess.run(
        [sys.executable, "-m", "batch", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        check=False,
    )


def run_mlproject(registry: BatchRegistry, cwd: Path, **params: str) -> subprocess.CompletedProcess:
    """`mlflow run <checkout> -e batch_forecast --env-manager local -P ...` (MLproject)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYSPARK_", "KRONOS_"))}
    env.update({"MLFLOW_TRACKING_URI": registry.url, "OMP_NUM_THREADS": "1", "KRONOS_DEVICE": "cpu"})
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the MLproject's `python`
    command = [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "batch_forecast"]
    command += ["--env-manager", "local", *[a for k, v in params.items() for a in ("-P", f"{k}={v}")]]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False)


def summary_of(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, f"kronos-batch failed ({done.returncode}):\n{done.stderr[-6000:]}"
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return mixed_candles(good=GOOD, seed=0)


@pytest.fixture(scope="module")
def greedy_job(batch_registry: BatchRegistry, table: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One greedy job over the Parquet table, on two local task slots, 16 series per call."""
    root = tmp_path_factory.mktemp("batch-greedy")
    table.to_parquet(root / "candles.parquet")  # pandas' nanosecond timestamps
    done = run_batch(
        batch_registry,
        str(root / "candles.parquet"),
        str(root / "out"),
        "--pred-len",
        str(PRED_LEN),
        "--top-k",
        "1",
        "--quantiles",
        "0.1,0.9",
        "--master",
        "local[2]",
        "--chunk-series",
        "16",
    )
    return {
        "summary": summary_of(done),
        "forecasts": pd.read_parquet(root / "out" / "forecasts"),
        "errors": pd.read_parquet(root / "out" / "errors"),
    }


@pytest.fixture(scope="module")
def pyfunc(batch_registry: BatchRegistry):
    with tracking_uri(batch_registry.url):
        return mlflow.pyfunc.load_model(f"models:/kronos/{batch_registry.version}")


def test_every_good_series_equals_the_pyfunc_on_that_series_alone(greedy_job, table, pyfunc, batch_registry):
    forecasts = greedy_job["forecasts"]
    assert sorted(forecasts["series_id"].unique()) == good_ids(GOOD)
    assert (forecasts["model_version"] == batch_registry.version).all()
    params = {"pred_len": PRED_LEN, "top_k": 1, "quantiles": [0.1, 0.9]}
    for series_id in good_ids(GOOD):
        alone = pyfunc.predict(one_series(table, series_id), params=params)
        mine = forecasts[forecasts["series_id"] == series_id].sort_values("timestamp").reset_index(drop=True)
        assert list(mine["timestamp"]) == list(alone["timestamp"]), series_id
        for column in [*CANDLE_COLUMNS, "close_q0.1", "close_q0.9"]:
            np.testing.assert_allclose(mine[column], alone[column], rtol=1e-4, atol=1e-6, err_msg=series_id)


def test_the_errors_output_lists_exactly_the_bad_series(greedy_job):
    errors = greedy_job["errors"]
    assert list(errors.columns) == ["series_id", "field", "rule"]
    assert errors.set_index("series_id")["field"].to_dict() == BAD_FIELDS
    assert errors["rule"].str.len().min() > 10


def test_the_summary_is_printed_and_logged_to_an_mlflow_run(greedy_job, batch_registry):
    summary = greedy_job["summary"]
    assert summary["series_ok"] == GOOD
    assert summary["series_failed"] == len(BAD_FIELDS)
    assert summary["forecast_rows"] == summary["candles_generated"] == GOOD * PRED_LEN
    assert summary["model_version"] == batch_registry.version
    run = mlflow.MlflowClient(tracking_uri=batch_registry.url).get_run(summary["mlflow_run_id"])
    assert run.data.metrics["series_ok"] == GOOD
    assert run.data.metrics["series_failed"] == len(BAD_FIELDS)
    assert run.data.params["model_version"] == batch_registry.version
    assert run.data.params["model_uri"] == "models:/kronos@champion"
    assert int(run.data.params["seed"]) == summary["seed"]  # replayable


def test_as_of_from_csv_via_mlproject_writes_realised_values_and_seeds_by_id(
    batch_registry, table, pyfunc, tmp_path, tiny_checkpoints
):
    """A sampled backtest from CSV through the MLproject entry point: history up to the
    cut-off (last 40 candles), realised candles beside the forecast, each series seeded by
    its id whatever its partition; the job's run is linked to the project's run."""
    table.to_csv(tmp_path / "candles.csv", index=False)
    as_of = pd.Timestamp("2024-01-02 09:30") + pd.Timedelta(minutes=5 * 60)
    done = run_mlproject(
        batch_registry,
        tmp_path,
        input=str(tmp_path / "candles.csv"),
        output=str(tmp_path / "out"),
        pred_len=str(PRED_LEN),
        sample_count="2",
        seed="5",
        as_of=str(as_of),
        last="40",
        calendar="XNYS",  # the cut-off is mid-session: the same bars as the series' own spacing
        master="local[1]",
        chunk_series="7",
    )
    summary = summary_of(done)
    forecasts = pd.read_parquet(tmp_path / "out" / "forecasts")
    assert summary["candles_generated"] == 2 * summary["forecast_rows"]
    long_ids = [s for s in good_ids(GOOD) if one_series(table, s)["timestamp"].iloc[-1] > as_of + pd.Timedelta("20min")]
    assert long_ids, "the table has series that go on after the cut-off"
    for series_id in long_ids[:5] + good_ids(GOOD)[:2]:
        rows = one_series(table, series_id)
        mine = forecasts[forecasts["series_id"] == series_id].sort_values("timestamp").reset_index(drop=True)
        realised = rows.set_index("timestamp").reindex(mine["timestamp"])
        for column in CANDLE_COLUMNS:
            np.testing.assert_allclose(mine[realised_column(column)], realised[column].to_numpy(), rtol=1e-12)
        history = rows[rows["timestamp"] <= as_of].tail(40)
        assert mine["seed"].nunique() == 1 and int(mine["seed"].iloc[0]) == id_seed(5, series_id)
        params = {**json.loads(mine["params"].iloc[0]), "seed": int(mine["seed"].iloc[0])}  # the replay columns
        assert params["pred_len"] == PRED_LEN and params["sample_count"] == 2 and params["calendar"] == "XNYS"
        alone = pyfunc.predict(history, params=params)
        np.testing.assert_allclose(mine["close"], alone["close"], rtol=1e-4, err_msg=series_id)
    assert forecasts.loc[forecasts["series_id"].isin(long_ids), realised_column("close")].notna().all()
    assert forecasts["weights_digest"].eq(weights_sha256(tiny_checkpoints[1])).all()
    run = mlflow.MlflowClient(tracking_uri=batch_registry.url).get_run(summary["mlflow_run_id"])
    assert run.data.params["as_of"] == str(as_of) and run.data.params["chunk_series"] == "7"
    assert "kronos.mlproject_run_id" in run.data.tags


def test_bad_arguments_data_and_models_exit_with_the_field_named(batch_registry, table, tmp_path):
    """The registry CLI's exit codes: 2 usage, 5 no such model, 6 bad data."""
    table.drop(columns=["close"]).to_parquet(tmp_path / "no-close.parquet")
    out = str(tmp_path / "out")
    done = run_batch(batch_registry, str(tmp_path / "no-close.parquet"), out, "--pred-len", "3")
    assert done.returncode == 6, done.stderr[-3000:]
    assert "close: required column missing" in done.stderr
    done = run_batch(batch_registry, str(tmp_path / "nowhere.parquet"), out, "--pred-len", "3")
    assert done.returncode == 6 and "input: cannot be read as parquet" in done.stderr, done.stderr[-3000:]
    done = run_batch(batch_registry, "in.parquet", out, "--pred-len", "0", "--top-k", "1")
    assert done.returncode == 2 and "pred_len: must be >= 1" in done.stderr
    done = run_batch(batch_registry, "in.parquet", out, "--pred-len", "3", "--model-uri", "models:/kronos@nobody")
    assert done.returncode == 5 and "model_uri" in done.stderr
    assert not (tmp_path / "out").exists()
