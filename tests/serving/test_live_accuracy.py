"""Live accuracy against the real MLServer process of conftest.py: answered forecasts are
recorded in its live store (sqlite, `workdir/live.db`), realised candles come back through
`POST /kronos/live/actuals`, and the accuracy table, the Prometheus gauges and
`kronos-registry live` agree with numbers computed here from the answers themselves."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import httpx
import numpy as np
import pandas as pd
import pytest
from serving_helpers import history, metric_value, response_frame, v2_request, wait_for

from serving.local_server import MODEL_NAME

pytestmark = pytest.mark.integration

PRED_LEN = 3
LEVELS = [0.1, 0.9]


def live_store_uri(server) -> str:
    return f"sqlite:///{server.log.parent.resolve() / 'live.db'}"


def answer(client: httpx.Client, server, frame: pd.DataFrame, request_id: str) -> pd.DataFrame:
    params = {"pred_len": PRED_LEN, "sample_count": 5, "seed": 3, "quantiles": LEVELS}
    reply = client.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer",
        json=v2_request(frame, params),
        headers={"X-Request-ID": request_id},
    )
    assert reply.status_code == 200, reply.text
    return response_frame(reply.json())


def expected_row(forecast: pd.DataFrame, actual: np.ndarray, last_close: np.ndarray) -> dict[str, float]:
    """The accuracy metrics of `forecast` rows against `actual` closes (definitions of
    serving.live.accuracy), computed from the answer the client got."""
    error = np.abs(actual - forecast["close"].to_numpy()) / last_close
    persistence = np.abs(actual - last_close) / last_close
    moved = actual != last_close
    right = np.sign(forecast["close"].to_numpy() - last_close) == np.sign(actual - last_close)
    inside = (forecast["close_q0.1"].to_numpy() <= actual) & (actual <= forecast["close_q0.9"].to_numpy())
    return {
        "forecasts": len(actual),
        "mae": float(error.mean()),
        "mase": float(error.sum() / persistence.sum()),
        "directional_accuracy": float(right[moved].mean()),
        "coverage": float(inside.mean()),
    }


def test_answers_and_realised_candles_give_live_accuracy(server):
    tag = uuid.uuid4().hex[:8]
    ids = [f"live-{tag}-a", f"live-{tag}-b"]
    frame = history(ids, seed=21)
    last_close = frame.groupby("series_id")["close"].last()
    with httpx.Client(timeout=120) as client:
        forecast = answer(client, server, frame, f"live-{tag}")
        # realised candles: the forecast moved by a known amount, one series up, one down
        shift = np.where(forecast["series_id"] == ids[0], 1.03, 0.96)
        actual = forecast["close"].to_numpy() * shift
        actuals = {
            "dataframe_split": {
                "columns": ["series_id", "timestamp", "close"],
                "data": [
                    [sid, ts.isoformat(), float(close)]
                    for sid, ts, close in zip(forecast["series_id"], forecast["timestamp"], actual, strict=True)
                ],
            }
        }
        stored = client.post(f"{server.url}/kronos/live/actuals", json=actuals)
        assert stored.status_code == 200, stored.text
        assert stored.json()["received"] == len(forecast)
        bad = client.post(
            f"{server.url}/kronos/live/actuals",
            json={"dataframe_split": {"columns": ["series_id", "timestamp", "close"], "data": [["x", "soon", 1.0]]}},
        )
        assert bad.status_code == 400 and "timestamp" in bad.json()["error"], bad.text
        table = pd.DataFrame(client.get(f"{server.url}/kronos/live/accuracy").json()["accuracy"])
    last = last_close.reindex(forecast["series_id"]).to_numpy()
    mine = table[(table["role"] == "champion")]
    step = forecast.groupby("series_id").cumcount() + 1
    for horizon, rows in (("1", step == 1), ("2-5", step > 1)):
        row = mine[mine["horizon"] == horizon]
        assert len(row) == 1, table
        want = expected_row(forecast[rows.to_numpy()], actual[rows.to_numpy()], last[rows.to_numpy()])
        got = row.iloc[0]
        # only this test's series have realised candles, so the live rows are exactly ours
        assert got["forecasts"] == want["forecasts"]
        for name in ("mae", "mase", "directional_accuracy", "coverage"):
            assert got[name] == pytest.approx(want[name], rel=1e-5), name
        assert got["crps"] > 0
        assert str(got["model_version"]) == str(row.iloc[0]["model_version"])
    version = str(mine.iloc[0]["model_version"])

    def live_gauges() -> str | None:
        text = server.metrics()
        return text if "kronos_live_mae{" in text else None

    metrics = wait_for(live_gauges, "the live gauges", timeout_s=60)
    gauge = metric_value(metrics, "kronos_live_mae", model_version=version, role="champion", horizon="1")
    assert gauge == pytest.approx(float(mine[mine["horizon"] == "1"].iloc[0]["mae"]), rel=1e-6)
    assert metric_value(metrics, "kronos_live_coverage_nominal") == pytest.approx(0.8)
    assert metric_value(metrics, "kronos_live_records_total", result="recorded") >= len(forecast)
    assert metric_value(metrics, "kronos_live_actuals_total") >= len(forecast)


def test_the_cli_stores_actuals_from_a_file_and_prints_the_table(server, tmp_path):
    tag = uuid.uuid4().hex[:8]
    ids = [f"cli-{tag}"]
    frame = history(ids, seed=40)
    with httpx.Client(timeout=120) as client:
        forecast = answer(client, server, frame, f"cli-{tag}")
        wait_for(lambda: client.get(f"{server.url}/kronos/live/accuracy").status_code == 200, "the live store")
    realised = forecast[["series_id", "timestamp", "close"]].assign(close=forecast["close"] * 1.02)
    realised.to_csv(tmp_path / "actuals.csv", index=False)
    done = subprocess.run(
        [sys.executable, "-m", "registry_scripts", "live", "--actuals", str(tmp_path / "actuals.csv"), "--json"],
        env={"KRONOS_LIVE_STORE_URI": live_store_uri(server), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["stored_actuals"] == PRED_LEN
    assert report["store"]["actuals"] >= PRED_LEN
    assert any(row["role"] == "champion" and row["forecasts"] >= 1 for row in report["accuracy"])
    text = subprocess.run(
        [sys.executable, "-m", "registry_scripts", "live", "--store", live_store_uri(server)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert text.returncode == 0, text.stderr
    assert "mase" in text.stdout and "champion" in text.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "registry_scripts", "live", "--actuals", str(tmp_path / "none.csv")],
        env={"KRONOS_LIVE_STORE_URI": live_store_uri(server), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 6, missing.stderr
