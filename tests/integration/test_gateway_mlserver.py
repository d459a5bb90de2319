"""End to end: a client -> real nginx gateway -> real MLServer serving the tiny Kronos.

One MLServer and one gateway serve the whole module (see conftest.py). The `traffic`
fixture sends one REST and one gRPC forecast through the gateway, each with its own
client `X-Request-ID`; the tests check the answers, the metrics the monitoring reads and
the runtime's request log line.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest
from integration_helpers import ADMIN, CLIENT, Stack
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import (
    MODEL_NAME,
    grpc_request,
    grpc_response_frame,
    history,
    response_frame,
    v2_request,
)

from serving.monitoring.metric_names import model_server_metric_names

pytestmark = pytest.mark.integration

SERIES = ["AAPL", "MSFT"]
PRED_LEN = 4
# greedy (top_k=1): REST and gRPC must give the same forecast; the float parameters still
# travel (as JSON numbers over REST, as strings over gRPC) and must be accepted
REST_PARAMS = {"pred_len": PRED_LEN, "top_k": 1, "temperature": 0.7, "top_p": 0.5}
GRPC_PARAMS: dict[str, str | int] = {"pred_len": PRED_LEN, "top_k": 1, "temperature": "0.7", "top_p": "0.5"}
TIMEOUT_S = 120.0


@dataclass
class Traffic:
    """What the REST and gRPC requests sent through the gateway got back."""

    history: pd.DataFrame
    rest_id: str
    rest_status: int
    rest_header_id: str | None
    rest_body: dict
    grpc_id: str
    grpc_header_id: str | None
    grpc_parameters: dict[str, str | int]
    grpc_frame: pd.DataFrame
    actuals_status: dict[str, int]  # POST /kronos/live/actuals through the gateway: source -> status
    accuracy: list[dict]  # the live accuracy rows after the realised candles arrived


def new_request_id(kind: str) -> str:
    return f"it-{kind}-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Traffic:
    """One REST and one gRPC forecast through the gateway, each with a client request id."""
    frame = history(SERIES, seed=3)
    rest_id, grpc_id = new_request_id("rest"), new_request_id("grpc")
    with httpx.Client(timeout=TIMEOUT_S) as client:
        reply = client.post(
            f"{stack.gateway.http_url}/v2/models/{MODEL_NAME}/infer",
            json=v2_request(frame, REST_PARAMS),
            headers={"X-Request-ID": rest_id},
        )
    with grpc.insecure_channel(stack.gateway.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        grpc_reply, call = stub.ModelInfer.with_call(
            grpc_request(frame, GRPC_PARAMS), timeout=TIMEOUT_S, metadata=(("x-request-id", grpc_id),)
        )
    initial = dict(call.initial_metadata() or ())
    actuals_status, accuracy = send_realised_candles(stack, reply.json() if reply.status_code == 200 else None)
    return Traffic(
        history=frame,
        rest_id=rest_id,
        rest_status=reply.status_code,
        rest_header_id=reply.headers.get("x-request-id"),
        rest_body=reply.json() if reply.status_code == 200 else {"error": reply.text},
        grpc_id=grpc_id,
        grpc_header_id=initial.get("x-request-id"),
        grpc_parameters={k: v.string_param or v.int64_param for k, v in grpc_reply.parameters.items()},
        grpc_frame=grpc_response_frame(grpc_reply),
        actuals_status=actuals_status,
        accuracy=accuracy,
    )


def send_realised_candles(stack: Stack, rest_body: dict | None) -> tuple[dict[str, int], list[dict]]:
    """The REST forecast's candles as if realised 1% higher, posted by an ordinary client
    (refused) and by the admin network (stored; the live gauges get values)."""
    if rest_body is None:
        return {}, []
    forecast = response_frame(rest_body)
    columns = ["series_id", "timestamp", "close"]
    rows = [[sid, ts.isoformat(), close * 1.01] for sid, ts, close in forecast[columns].to_numpy()]
    body = {"dataframe_split": {"columns": columns, "data": rows}}
    statuses, accuracy = {}, []
    for name, source in (("client", CLIENT), ("admin", ADMIN)):
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(timeout=TIMEOUT_S, transport=transport) as client:
            reply = client.post(f"{stack.gateway.http_url}/kronos/live/actuals", json=body)
        statuses[name] = reply.status_code
        if reply.status_code == 200:
            accuracy = reply.json()["accuracy"]
    return statuses, accuracy


def assert_forecast(forecast: pd.DataFrame, history_frame: pd.DataFrame) -> None:
    """PRED_LEN finite future candles per requested series, after that series' history."""
    assert sorted(forecast["series_id"].unique()) == sorted(SERIES)
    for sid, rows in forecast.groupby("series_id"):
        assert len(rows) == PRED_LEN, rows
        last = history_frame.loc[history_frame["series_id"] == sid, "timestamp"].max()
        assert (rows["timestamp"] > last).all()
    values = forecast[["open", "high", "low", "close"]].to_numpy(dtype=float)
    assert np.isfinite(values).all()


def test_rest_and_grpc_inference_through_the_gateway(traffic: Traffic) -> None:
    assert traffic.rest_status == 200, traffic.rest_body
    assert traffic.rest_header_id == traffic.rest_id  # the client's id is echoed
    assert traffic.rest_body["parameters"]["model_version"] == "1"
    rest = response_frame(traffic.rest_body)
    assert_forecast(rest, traffic.history)

    assert traffic.grpc_parameters["model_version"] == "1"
    assert traffic.grpc_header_id == traffic.grpc_id
    assert_forecast(traffic.grpc_frame, traffic.history)
    key = ["series_id", "timestamp"]
    pd.testing.assert_frame_equal(
        traffic.grpc_frame.sort_values(key).reset_index(drop=True)[rest.columns],
        rest.sort_values(key).reset_index(drop=True),
        rtol=1e-6,
        check_dtype=False,
    )


def test_realised_candles_go_in_through_the_gateway_from_the_admin_network_only(traffic: Traffic) -> None:
    assert traffic.actuals_status == {"client": 403, "admin": 200}
    rows = [row for row in traffic.accuracy if row["role"] == "champion" and row["model_version"] == "1"]
    # the REST and the gRPC answer forecast the same candles: both were recorded and matched
    assert sum(row["forecasts"] for row in rows) == 2 * PRED_LEN * len(SERIES)
    assert {row["horizon"] for row in rows} == {"1", "2-5"}


def exported_names(text: str) -> set[str]:
    """Every name a Prometheus scrape exposes: sample names (x_bucket, x_sum, x_count,
    x_total, ...) and family names (a counter family `x` is also listed as `x_total`)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        names.update(sample.name for sample in family.samples)
    return names


def test_live_server_exports_every_metric_the_monitoring_reads(stack: Stack, traffic: Traffic) -> None:
    assert traffic.rest_status == 200, traffic.rest_body  # the traffic did reach the model
    wanted = model_server_metric_names()
    assert wanted, "the alerts and dashboard read no model server metric?"
    exported = exported_names(stack.server.metrics())
    missing = sorted(set(wanted) - exported)
    assert not missing, f"alerts/dashboard read metrics that MLServer does not export: {missing}"


def runtime_log_entries(log_text: str) -> list[dict]:
    """Every line of the server's output that is (or ends in) a JSON object."""
    entries = []
    for line in log_text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            entry = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def find_request_line(stack: Stack, request_id: str, wait_s: float = 30.0) -> dict | None:
    """The runtime's JSON log line for `request_id` (waits briefly for the write)."""
    deadline = time.monotonic() + wait_s
    while True:
        for entry in runtime_log_entries(stack.server_log()):
            if entry.get("request_id") == request_id:
                return entry
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def test_request_id_appears_in_the_runtime_log_line(stack: Stack, traffic: Traffic) -> None:
    assert traffic.rest_status == 200, traffic.rest_body
    for request_id in (traffic.rest_id, traffic.grpc_id):
        entry = find_request_line(stack, request_id)
        assert entry is not None, (
            f"no JSON log line with request_id={request_id} in the server output:\n{stack.server_log()[-3000:]}"
        )
        assert entry["outcome"] == "ok" and entry["model_version"] == "1"
        assert entry["series"] == len(SERIES) and entry["horizon"] == PRED_LEN
        for field in ("queue_wait_s", "inference_s", "total_s"):
            assert isinstance(entry[field], int | float) and entry[field] >= 0
        line = json.dumps(entry)
        assert "AAPL" not in line and "MSFT" not in line  # no payload in the log


def test_a_non_admin_cannot_unload_the_model_through_the_gateway(stack: Stack) -> None:
    """The repository RPCs of the inference service (and the REST repository routes) are
    refused by the gateway for a client that is not an admin; the model keeps serving."""
    from mlserver.grpc import dataplane_pb2 as pb

    with grpc.insecure_channel(stack.gateway.grpc_target) as channel:
        unload = channel.unary_unary(
            "/inference.GRPCInferenceService/RepositoryModelUnload",
            request_serializer=pb.RepositoryModelUnloadRequest.SerializeToString,
            response_deserializer=pb.RepositoryModelUnloadResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as denied:
            unload(pb.RepositoryModelUnloadRequest(model_name=MODEL_NAME), timeout=TIMEOUT_S)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        ready = pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(
            pb.ModelReadyRequest(name=MODEL_NAME), timeout=TIMEOUT_S
        )
        assert ready.ready
    reply = httpx.post(f"{stack.gateway.http_url}/v2/repository/models/{MODEL_NAME}/unload", timeout=TIMEOUT_S)
    assert reply.status_code == 403, reply.text
    assert httpx.get(f"{stack.server.url}/v2/models/{MODEL_NAME}/ready", timeout=TIMEOUT_S).status_code == 200
