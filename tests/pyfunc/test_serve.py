"""A real `mlflow models serve -m models:/kronos@champion` process: forecasts over
/invocations, and HTTP 400 naming the problem for bad requests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from pyfunc_helpers import MODEL_NAME, TINY_MAX_CONTEXT, clean_env

from model_package import KronosForecaster
from model_package.data import load_index

START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 60


@dataclass
class Server:
    url: str
    log: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory) -> Iterator[Server]:
    """`mlflow models serve` of the champion on 127.0.0.1 and a free port."""
    workdir = tmp_path_factory.mktemp("serve")
    port = _free_port()
    log = workdir / "server.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve",
               "-m", f"models:/{MODEL_NAME}@champion", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    env = clean_env(MLFLOW_TRACKING_URI=registry.tracking_uri)
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"server exited:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"not ready in {START_TIMEOUT_S}s:\n" \
                                                f"{log.read_text()[-4000:]}"
            time.sleep(0.5)
        yield Server(url, log)
    finally:
        _stop(process)


def _invoke(server: Server, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _split(frame: pd.DataFrame) -> dict:
    """A frame as the `dataframe_split` JSON a client sends (timestamps as ISO strings)."""
    frame = frame.assign(timestamp=frame["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S"))
    return json.loads(frame.to_json(orient="split", index=False))


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    return load_index("SP500", last=40)


def test_forecast_over_invocations(server, history, tiny_checkpoints):
    params = {"pred_len": 3, "top_k": 1, "quantiles": [0.5]}
    status, body = _invoke(server, {"dataframe_split": _split(history), "params": params})
    assert status == 200, body
    forecast = pd.DataFrame(body["predictions"])
    forecaster = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=TINY_MAX_CONTEXT,
                                                  device="cpu")
    expected = forecaster.predict(history, 3, top_k=1, quantiles=[0.5])
    assert list(forecast.columns) == list(expected.columns)
    assert pd.to_datetime(forecast["timestamp"]).tolist() == [
        pd.Timestamp("2019-01-01"), pd.Timestamp("2019-01-02"), pd.Timestamp("2019-01-03")]
    pd.testing.assert_frame_equal(forecast.drop(columns="timestamp"),
                                  expected.drop(columns="timestamp"), rtol=1e-6)


def test_integer_prices_in_json_are_accepted(server, history):
    as_ints = history.assign(**{c: history[c].round().astype("int64")
                                for c in ("open", "high", "low", "close", "volume")})
    body = _split(as_ints)
    assert isinstance(body["data"][0][2], int)  # `open` travels as 2531 rather than 2531.0
    status, answer = _invoke(server, {"dataframe_split": body, "params": {"pred_len": 2}})
    assert status == 200, answer
    assert len(answer["predictions"]) == 2


def test_defaults_apply_without_params(server, history):
    status, body = _invoke(server, {"dataframe_split": _split(history)})
    assert status == 200, body
    assert len(body["predictions"]) == 10


@pytest.mark.parametrize(("change", "params", "needle"), [
    (None, {"pred_len": 0}, "pred_len: must be >= 1"),
    (None, {"top_p": 1.5}, "top_p: must be in (0, 1]"),
    (None, {"pred_len": "many"}, "pred_len"),
    (None, {"sample_count": 10_000}, "sample_count: must be <= 64 (max_sample_count)"),
    ("drop_close", {}, "missing inputs ['close']"),  # MLflow's schema check
    ("nan_low", {}, "low: must not contain NaN"),
    ("unsorted", {}, "timestamp: must be strictly increasing"),
])
def test_bad_requests_get_400_naming_the_problem(server, history, change, params, needle):
    frame = history
    if change == "drop_close":
        frame = history.drop(columns="close")
    elif change == "nan_low":
        frame = history.assign(low=history["low"].where(history.index != 5))
    elif change == "unsorted":
        frame = history.iloc[[1, 0, *range(2, len(history))]]
    status, body = _invoke(server, {"dataframe_split": _split(frame), "params": params})
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert needle in body["message"], body["message"]
