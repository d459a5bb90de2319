"""Helpers of the serving tests: candle frames, a real `mlserver start` process, clients.

Ports, the MLServer process and its settings come from `serving.local_server`, random-walk
candles from `model_package.data`.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx
import pandas as pd

from model_package.data import random_walk_candles
from serving.local_server import MODEL_NAME, LocalServer

if TYPE_CHECKING:
    from mlserver.grpc import dataplane_pb2 as pb

TINY_MAX_CONTEXT = 128
START_TIMEOUT_S = 180
QUEUE_BUDGET_MB = 256  # the test server's queue and per-request budget (MiB)


def history(ids: list[str], seed: int, length: int = 40) -> pd.DataFrame:
    """Several series (lengths length, length+1, ...) in one long frame."""
    return pd.concat(
        [random_walk_candles(length + i, seed=seed + i, series_id=sid) for i, sid in enumerate(ids)], ignore_index=True
    )


def v2_request(frame: pd.DataFrame, params: dict) -> dict:
    """The JSON body of a V2 REST request (pandas codec columns)."""
    inputs = []
    for column in frame.columns:
        values = frame[column]
        if column == "timestamp":
            data = [t.isoformat() for t in pd.DatetimeIndex(values)]
            inputs.append(
                {
                    "name": column,
                    "datatype": "BYTES",
                    "shape": [len(data), 1],
                    "parameters": {"content_type": "datetime"},
                    "data": data,
                }
            )
        elif values.dtype == object:
            inputs.append(
                {
                    "name": column,
                    "datatype": "BYTES",
                    "shape": [len(values), 1],
                    "parameters": {"content_type": "str"},
                    "data": values.tolist(),
                }
            )
        else:
            inputs.append(
                {"name": column, "datatype": "FP64", "shape": [len(values), 1], "data": values.astype(float).tolist()}
            )
    return {"inputs": inputs, "parameters": {"content_type": "pd", **params}}


def response_frame(body: dict) -> pd.DataFrame:
    """A V2 response's outputs as a frame (timestamps parsed)."""
    frame = pd.DataFrame({o["name"]: o["data"] for o in body["outputs"]})
    frame["timestamp"] = pd.to_datetime(frame["timestamp"])
    return frame


class Server(LocalServer):
    """A running `mlserver start` process and its ports, with the tests' shortcuts."""

    def infer(self, client: httpx.Client, frame: pd.DataFrame, params: dict) -> httpx.Response:
        return client.post(f"{self.url}/v2/models/{MODEL_NAME}/infer", json=v2_request(frame, params))

    def logs(self) -> str:
        return self.tail(6000)


def start_server(
    workdir: Path, tracking_uri: str, env: dict[str, str] | None = None, model_settings: dict | None = None
) -> Server:
    """MLServer with serving/ settings on free ports in `workdir`, one torch thread, ready."""
    return Server.start(
        workdir,
        tracking_uri,
        env={"KRONOS_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", **(env or {})},
        model_settings=model_settings,
        timeout_s=START_TIMEOUT_S,
    )


class RawPost:
    """A REST request sent over a plain socket, so that a test decides when the client
    goes away (`close`) or reads the answer (`status`)."""

    def __init__(self, port: int, path: str, body: dict, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        head = [
            f"POST {path} HTTP/1.1",
            "Host: 127.0.0.1",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
            "Connection: close",
            *[f"{k}: {v}" for k, v in (headers or {}).items()],
        ]
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + payload)

    def status(self, timeout_s: float = 300) -> int:
        """The answer's HTTP status (waits for it at most `timeout_s`)."""
        self.sock.settimeout(timeout_s)
        data = b""
        while b"\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed before a status line: {data!r}")
            data += chunk
        return int(data.split(b" ", 2)[1])

    def close(self) -> None:
        """Go away without reading the answer."""
        self.sock.close()


def grpc_response_frame(reply: pb.ModelInferResponse) -> pd.DataFrame:
    """A ModelInferResponse's outputs as a frame (BYTES decoded, timestamps parsed)."""
    columns: dict[str, list] = {}
    for output in reply.outputs:
        if output.datatype == "BYTES":
            columns[output.name] = [b.decode() for b in output.contents.bytes_contents]
        else:
            columns[output.name] = list(output.contents.fp64_contents)
    frame = pd.DataFrame(columns)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"])
    return frame


def grpc_request(frame: pd.DataFrame, params: dict[str, str | int | bool]):
    """A V2 ModelInferRequest for the served model (floats in `params` as strings)."""
    from serving.grpc_request import infer_request

    return infer_request(frame, params, MODEL_NAME)


def grpc_infer(
    server: Server, frame: pd.DataFrame, params: dict[str, str | int | bool], timeout_s: float = 120
) -> pd.DataFrame:
    """One ModelInfer call (BYTES as UTF-8, params as gRPC's bool/int64/string)."""
    import grpc
    from mlserver.grpc import dataplane_pb2_grpc as pb_grpc

    request = grpc_request(frame, params)
    with grpc.insecure_channel(server.grpc_target) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout_s)
    result = grpc_response_frame(reply)
    result.attrs["parameters"] = {k: v.string_param or v.int64_param for k, v in reply.parameters.items()}
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


T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout_s: float = 180.0, poll_s: float = 0.2) -> T:
    """Poll `condition` every `poll_s` s until it returns something truthy (returned); an
    assertion error naming `what` after `timeout_s` s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f} s for {what}"
        time.sleep(poll_s)
