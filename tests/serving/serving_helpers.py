"""Helpers of the serving tests: candle frames, a real `mlserver start` process, clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
SERVING = ROOT / "serving"
MODEL_NAME = "kronos"
TINY_MAX_CONTEXT = 128
START_TIMEOUT_S = 180


def candles(length: int, seed: int = 0, series_id: str | None = None,
            start: str = "2024-01-02 09:30", freq: str = "5min") -> pd.DataFrame:
    """A random-walk OHLCV frame in the long format."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, length)))
    open_ = np.concatenate([[close[0]], close[:-1]]) * (1 + rng.normal(0, 0.002, length))
    frame = pd.DataFrame({
        "timestamp": pd.date_range(start, periods=length, freq=freq),
        "open": open_,
        "high": np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.003, length))),
        "low": np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.003, length))),
        "close": close,
        "volume": rng.uniform(1e3, 5e3, length),
    })
    frame["amount"] = frame["volume"] * frame["close"]
    if series_id is not None:
        frame.insert(0, "series_id", series_id)
    return frame


def history(ids: list[str], seed: int, length: int = 40) -> pd.DataFrame:
    """Several series (lengths length, length+1, ...) in one long frame."""
    return pd.concat([candles(length + i, seed=seed + i, series_id=sid)
                      for i, sid in enumerate(ids)], ignore_index=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def v2_request(frame: pd.DataFrame, params: dict) -> dict:
    """The JSON body of a V2 REST request (pandas codec columns)."""
    inputs = []
    for column in frame.columns:
        values = frame[column]
        if column == "timestamp":
            data = [t.isoformat() for t in pd.DatetimeIndex(values)]
            inputs.append({"name": column, "datatype": "BYTES", "shape": [len(data), 1],
                           "parameters": {"content_type": "datetime"}, "data": data})
        elif values.dtype == object:
            inputs.append({"name": column, "datatype": "BYTES", "shape": [len(values), 1],
                           "parameters": {"content_type": "str"}, "data": values.tolist()})
        else:
            inputs.append({"name": column, "datatype": "FP64", "shape": [len(values), 1],
                           "data": values.astype(float).tolist()})
    return {"inputs": inputs, "parameters": {"content_type": "pd", **params}}


def response_frame(body: dict) -> pd.DataFrame:
    """A V2 response's outputs as a frame (timestamps parsed)."""
    frame = pd.DataFrame({o["name"]: o["data"] for o in body["outputs"]})
    frame["timestamp"] = pd.to_datetime(frame["timestamp"])
    return frame


@dataclass
class Server:
    """A running `mlserver start` process and its ports."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def infer(self, client: httpx.Client, frame: pd.DataFrame, params: dict) -> httpx.Response:
        return client.post(f"{self.url}/v2/models/{MODEL_NAME}/infer",
                           json=v2_request(frame, params))

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).text

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def start_server(workdir: Path, tracking_uri: str, env: dict[str, str] | None = None,
                 model_settings: dict | None = None) -> Server:
    """Copy serving/ settings into `workdir` with free ports and start MLServer there."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(3)]
    settings = json.loads((SERVING / "settings.json").read_text())
    settings.update(http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                    metrics_dir=str(workdir / "metrics"))
    (workdir / "settings.json").write_text(json.dumps(settings))
    model_dir = workdir / "models" / MODEL_NAME
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    spec = json.loads((SERVING / "models" / MODEL_NAME / "model-settings.json").read_text())
    spec.update(model_settings or {})
    (model_dir / "model-settings.json").write_text(json.dumps(spec))
    child_env = {k: v for k, v in os.environ.items()
                 if not k.startswith(("KRONOS_", "MLSERVER", "PYTHON"))}
    child_env.update({"MLFLOW_TRACKING_URI": tracking_uri, "KRONOS_DEVICE": "cpu",
                      "KRONOS_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
                      "PYTHONPATH": str(ROOT), **(env or {})})
    log = workdir / "mlserver.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlserver")), "start", str(workdir)],
            cwd=workdir, env=child_env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    server = Server(process, *ports, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlserver exited with {process.returncode}:\n{server.logs()}")
        try:
            ready = httpx.get(f"{server.url}/v2/models/{MODEL_NAME}/ready", timeout=5)
            if ready.status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"mlserver not ready after {START_TIMEOUT_S} s:\n{server.logs()}")


def grpc_request(frame: pd.DataFrame, params: dict[str, str | int | bool]):
    """A V2 ModelInferRequest for the served model (floats in `params` as strings)."""
    from serving.grpc_request import infer_request

    return infer_request(frame, params, MODEL_NAME)


def grpc_infer(server: Server, frame: pd.DataFrame, params: dict[str, str | int | bool],
               timeout_s: float = 120) -> pd.DataFrame:
    """One ModelInfer call (BYTES as UTF-8, params as gRPC's bool/int64/string)."""
    import grpc
    from mlserver.grpc import dataplane_pb2_grpc as pb_grpc

    request = grpc_request(frame, params)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout_s)
    columns = {}
    for output in reply.outputs:
        if output.datatype == "BYTES":
            columns[output.name] = [b.decode() for b in output.contents.bytes_contents]
        else:
            columns[output.name] = list(output.contents.fp64_contents)
    result = pd.DataFrame(columns)
    result["timestamp"] = pd.to_datetime(result["timestamp"])
    result.attrs["parameters"] = {k: v.string_param or v.int64_param
                                  for k, v in reply.parameters.items()}
    return result


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        if sample != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total
