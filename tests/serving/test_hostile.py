"""Hostile and unusual clients against the real server: every transport answers bad input
with 400 / INVALID_ARGUMENT naming the field and the rule (never a 5xx, never a wrong
200), standard V2 clients (tritonclient, HTTP and gRPC) work, streams answer every
request, made-up names create no metric series, and every log line is one JSON object.

Shares the session's MLServer (tests/serving/conftest.py).
"""

from __future__ import annotations

import json
import struct

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc
from serving_helpers import MODEL_NAME, grpc_infer, grpc_request, history, response_frame, v2_request

pytestmark = pytest.mark.integration

INFER = f"/v2/models/{MODEL_NAME}/infer"
GOOD = history(["A", "B"], seed=31)
GREEDY = {"pred_len": 3, "top_k": 1}


def assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), rtol=1e-5, check_dtype=False)


def near_2262() -> pd.DataFrame:
    frame = history(["late"], seed=3).copy()
    frame["timestamp"] = pd.date_range("2262-04-09", periods=len(frame), freq="h")
    return frame


def edited(column: str, row: int, value: object) -> pd.DataFrame:
    frame = GOOD.copy()
    frame[column] = frame[column].astype(object)
    frame.loc[row, column] = value
    return frame


# (frame, params, the field or rule the error must name); the same cases over REST and gRPC
PARAM_AND_FRAME_CASES = [
    pytest.param(GOOD, {"pred_len": 2, "freq": "0D"}, "freq", id="freq-zero"),
    pytest.param(GOOD, {"pred_len": 2, "freq": "1000Y"}, "freq", id="freq-huge"),
    pytest.param(GOOD, {"pred_len": 2, "freq": "-1D"}, "freq", id="freq-negative"),
    pytest.param(near_2262(), {"pred_len": 100}, "timestamp", id="horizon-past-2262"),
    pytest.param(GOOD, {"pred_len": 2, "top_k": 2**63 - 1}, "top_k", id="top-k-huge"),
    pytest.param(GOOD, {"pred_len": 2, "seed": -1}, "seed", id="seed-negative"),
    pytest.param(edited("close", 3, 1e300), GREEDY, "close", id="close-1e300"),
    pytest.param(edited("low", 2, -5.0), GREEDY, "low", id="negative-price"),
    pytest.param(edited("high", 4, 1.0), GREEDY, "high", id="high-below-low"),
    pytest.param(GOOD, {"pred_len": 2, "temperature": "nan"}, "temperature", id="temperature-nan"),
    pytest.param(GOOD, {"pred_len": 2, "strict_candle": False}, "unknown param", id="typo-param"),
]


@pytest.mark.parametrize(("frame", "params", "needle"), PARAM_AND_FRAME_CASES)
def test_bad_params_and_candles_are_400_over_rest(server, frame, params, needle):
    with httpx.Client(timeout=120) as client:
        reply = client.post(f"{server.url}{INFER}", json=v2_request(frame, params))
    assert reply.status_code == 400, reply.text
    assert needle in reply.json()["error"], reply.text


@pytest.mark.parametrize(("frame", "params", "needle"), PARAM_AND_FRAME_CASES)
def test_bad_params_and_candles_are_invalid_argument_over_grpc(server, frame, params, needle):
    grpc_params = {k: (str(v) if isinstance(v, float) else v) for k, v in params.items()}
    with pytest.raises(grpc.RpcError) as caught:
        grpc_infer(server, frame, grpc_params)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert needle in caught.value.details()


def test_strict_candles_opt_out_and_the_largest_seed(server, serving_registry):
    """A negative price is accepted with strict_candles=false; seeds span 0..2**64-1."""
    spread = GOOD.copy()
    spread[["open", "high", "low", "close"]] -= 150.0  # a spread that goes negative
    with httpx.Client(timeout=120) as client:
        reply = server.infer(client, spread, {**GREEDY, "strict_candles": False})
        assert reply.status_code == 200, reply.text
        top = client.post(f"{server.url}{INFER}", json=v2_request(GOOD, {"pred_len": 2, "seed": 2**64 - 1}))
        assert top.status_code == 200, top.text
        over = client.post(f"{server.url}{INFER}", json=v2_request(GOOD, {"pred_len": 2, "seed": 2**64}))
        assert over.status_code == 400 and "seed" in over.json()["error"]
    want = serving_registry.forecaster("1").predict(spread, **GREEDY, strict_candles=False)
    assert_same(response_frame(reply.json()), want)


def _tensor(name: str, datatype: str, shape: list[int], data: list) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _with_input(tensor: dict) -> dict:
    body = v2_request(GOOD, GREEDY)
    body["inputs"] = [t for t in body["inputs"] if t["name"] != tensor["name"]] + [tensor]
    return body


ROWS = len(GOOD)
TENSOR_CASES = [
    pytest.param(
        _with_input(_tensor("close", "FP64", [ROWS + 1, 1], GOOD["close"].tolist())), "shape", id="shape-disagrees"
    ),
    pytest.param(_with_input(_tensor("close", "FP64", [ROWS, 1], ["1.0"] * ROWS)), "close", id="fp64-with-text"),
    pytest.param(
        _with_input(_tensor("close", "FP99", [ROWS, 1], GOOD["close"].tolist())), "datatype", id="unknown-datatype"
    ),
    pytest.param(
        _with_input(_tensor("timestamp", "FP64", [ROWS, 1], list(range(ROWS)))), "timestamp", id="timestamps-as-numbers"
    ),
    pytest.param(_with_input(_tensor("clsoe", "FP64", [ROWS, 1], GOOD["close"].tolist())), "clsoe", id="unknown-input"),
    pytest.param({**v2_request(GOOD, GREEDY), "outputs": [{"name": "nope"}]}, "outputs", id="unknown-output"),
    pytest.param({"inputs": "not a list"}, "inputs", id="inputs-not-a-list"),
    pytest.param({"inputs": []}, "inputs", id="no-inputs"),
]


@pytest.mark.parametrize(("body", "needle"), TENSOR_CASES)
def test_malformed_v2_tensors_are_400(server, body, needle):
    with httpx.Client(timeout=60) as client:
        reply = client.post(f"{server.url}{INFER}", json=body)
    assert reply.status_code == 400, reply.text
    assert needle in reply.json()["error"], reply.text


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        pytest.param(b'{"inputs": [', "JSON", id="truncated-json"),
        pytest.param(b"[1, 2, 3]", "body", id="not-an-object"),
        pytest.param(b'"text"', "body", id="a-string"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "body", id="deep-json"),
        pytest.param(b"\xff\xfe garbage", "body", id="not-utf8"),
    ],
)
def test_unreadable_bodies_are_400_in_the_error_shape(server, raw, needle):
    with httpx.Client(timeout=60) as client:
        for path in (INFER, "/invocations"):
            reply = client.post(f"{server.url}{path}", content=raw, headers={"content-type": "application/json"})
            assert reply.status_code == 400, (path, reply.text)
            assert set(reply.json()) == {"error"} and needle.lower() in reply.json()["error"].lower(), reply.text


SPLIT = json.loads(GOOD.assign(timestamp=GOOD["timestamp"].astype(str)).to_json(orient="split", index=False))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        pytest.param(
            {"dataframe_split": {**SPLIT, "data": [row[:3] for row in SPLIT["data"]]}},
            "data",
            id="rows-shorter-than-columns",
        ),
        pytest.param({"dataframe_split": {"columns": "abc", "data": "def"}}, "columns", id="strings"),
        pytest.param(
            {"dataframe_split": {**SPLIT, "columns": ["close"] * len(SPLIT["columns"])}},
            "close",
            id="duplicate-columns",
        ),
        pytest.param(
            {"dataframe_split": {**SPLIT, "data": [[[1], {"a": 2}] + row[2:] for row in SPLIT["data"]]}},
            "series_id",
            id="list-and-dict-cells",
        ),
        pytest.param({"dataframe_records": [1, 2, 3]}, "dataframe_records", id="records-not-objects"),
        pytest.param({"instances": [[1, 2]]}, "dataframe_split", id="instances"),
        pytest.param({"dataframe_split": SPLIT, "params": [1]}, "params", id="params-not-an-object"),
    ],
)
def test_malformed_invocations_bodies_are_400(server, body, needle):
    with httpx.Client(timeout=60) as client:
        reply = client.post(f"{server.url}/invocations", json=body)
    assert reply.status_code == 400, reply.text
    assert needle in reply.json()["error"], reply.text


# -- gRPC-specific forms ---------------------------------------------------------------------


def _grpc_call(server, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        return dataplane_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)


def _grpc_refused(server, request: pb.ModelInferRequest, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _grpc_call(server, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert needle in caught.value.details(), caught.value.details()


def _replace_contents(request: pb.ModelInferRequest, name: str, **contents: list) -> pb.ModelInferRequest:
    for tensor in request.inputs:
        if tensor.name == name:
            tensor.ClearField("contents")
            for field, values in contents.items():
                getattr(tensor.contents, field).extend(values)
    return request


def test_grpc_tensors_must_match_their_datatype_and_shape(server):
    closes = GOOD["close"].tolist()
    request = _replace_contents(grpc_request(GOOD, GREEDY), "close", fp32_contents=closes)  # declared FP64
    _grpc_refused(server, request, "fp64_contents")
    request = grpc_request(GOOD, GREEDY)
    request.inputs[-1].shape[:] = [ROWS + 3, 1]
    _grpc_refused(server, request, "shape")
    bad_text = _replace_contents(grpc_request(GOOD, GREEDY), "series_id", bytes_contents=[b"\xff\xfe"] * ROWS)
    _grpc_refused(server, bad_text, "UTF-8")
    raw = grpc_request(GOOD, GREEDY)
    for tensor in raw.inputs:
        tensor.ClearField("contents")
    raw.raw_input_contents.extend([b"\x00" * 7] * len(raw.inputs))  # not whole elements
    _grpc_refused(server, raw, "raw")


def _with_unknown_parameter_field(request: pb.ModelInferRequest, name: str, field: int, wire: bytes) -> bytes:
    """The request's bytes plus one parameter whose value sits in protobuf field `field`
    (a field MLServer's schema does not know)."""
    value = bytes([(field << 3) | wire[0]]) + wire[1:]
    entry = b"\x0a" + bytes([len(name)]) + name.encode() + b"\x12" + bytes([len(value)]) + value
    return request.SerializeToString() + b"\x22" + bytes([len(entry)]) + entry  # field 4: parameters


def test_grpc_double_and_uint64_params_are_honoured_and_others_refused(server, serving_registry):
    """Floats as double_param (field 4) and big integers as uint64_param (field 5) change the
    forecast as they should; a parameter in any other field is INVALID_ARGUMENT."""
    forecaster = serving_registry.forecaster("1")
    base = grpc_request(GOOD, {"pred_len": 3, "sample_count": 4, "top_p": "0.6"})
    seed = 2**63 + 11  # beyond int64: only uint64_param carries it
    answers = {}
    for temperature in (0.05, 5.0):
        data = _with_unknown_parameter_field(base, "temperature", 4, b"\x01" + struct.pack("<d", temperature))
        request = pb.ModelInferRequest.FromString(data)
        seed_value = b"\x00" + _varint(seed)
        request = pb.ModelInferRequest.FromString(_with_unknown_parameter_field(request, "seed", 5, seed_value))
        reply = _grpc_call(server, request)
        answers[temperature] = [list(o.contents.fp64_contents) for o in reply.outputs if o.datatype == "FP64"]
        want = forecaster.predict(GOOD, pred_len=3, sample_count=4, top_p=0.6, temperature=temperature, seed=seed)
        assert np.allclose(answers[temperature][3], want["close"], rtol=1e-5)
    assert answers[0.05] != answers[5.0]
    odd = pb.ModelInferRequest.FromString(_with_unknown_parameter_field(base, "temperature", 9, b"\x00\x01"))
    _grpc_refused(server, odd, "temperature")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# -- standard clients --------------------------------------------------------------------------

# tritonclient's gRPC module brings its own copy of the V2 protos, which cannot live beside
# MLServer's in one process: its half of the test runs in a child interpreter.
TRITON_GRPC_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton_grpc
port, params, columns = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
inputs = []
for name, (datatype, values) in columns.items():
    array = np.array([v.encode() for v in values], dtype=np.object_) if datatype == "BYTES" else np.array(values)
    tensor = triton_grpc.InferInput(name, [len(values), 1], datatype)
    tensor.set_data_from_numpy(array.reshape(-1, 1))
    inputs.append(tensor)
client = triton_grpc.InferenceServerClient(url="127.0.0.1:" + port)
result = client.infer("kronos", inputs, parameters=params)
print(json.dumps({"close": result.as_numpy("close").ravel().tolist(), "ready": client.is_model_ready("kronos")}))
"""


def _triton_columns(frame: pd.DataFrame) -> dict[str, tuple[str, list]]:
    columns = {}
    for column in frame.columns:
        if column == "series_id":
            columns[column] = ("BYTES", frame[column].astype(str).tolist())
        elif column == "timestamp":
            columns[column] = ("BYTES", [t.isoformat() for t in pd.DatetimeIndex(frame[column])])
        else:
            columns[column] = ("FP64", frame[column].astype(float).tolist())
    return columns


def test_tritonclient_http_and_grpc(server, serving_registry):
    """NVIDIA's tritonclient with its defaults (binary tensors over HTTP, raw contents and
    double_param over gRPC) gets the direct forecaster's answer; temperature is honoured."""
    import subprocess
    import sys

    import tritonclient.http as triton_http

    forecaster = serving_registry.forecaster("1")
    params = {"pred_len": 3, "sample_count": 4, "seed": 5, "temperature": 0.35, "top_p": 0.6}
    want = forecaster.predict(GOOD, **params)
    other = forecaster.predict(GOOD, **{**params, "temperature": 3.0})
    assert not np.allclose(want["close"], other["close"])
    columns = _triton_columns(GOOD)
    http_client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    inputs = []
    for name, (datatype, values) in columns.items():
        array = (
            np.array([v.encode() for v in values], dtype=np.object_) if datatype == "BYTES" else np.array(values)
        ).reshape(-1, 1)
        tensor = triton_http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)  # binary tensor extension (tritonclient's default)
        inputs.append(tensor)
    result = http_client.infer(MODEL_NAME, inputs, parameters=params)
    assert np.allclose(result.as_numpy("close").astype(float).ravel(), want["close"], rtol=1e-5)
    assert http_client.is_server_live()
    child = subprocess.run(
        [sys.executable, "-c", TRITON_GRPC_CLIENT, str(server.grpc_port), json.dumps(params), json.dumps(columns)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    answer = json.loads(child.stdout)
    assert answer["ready"] is True
    assert np.allclose(answer["close"], want["close"], rtol=1e-5)


def test_every_request_of_a_grpc_stream_is_answered(server, serving_registry):
    forecaster = serving_registry.forecaster("1")
    frames = [history(["S"], seed=41), history(["T", "U"], seed=42)]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(iter([grpc_request(f, GREEDY) for f in frames]), timeout=120))
    assert len(replies) == 2
    for reply, frame in zip(replies, frames, strict=True):
        closes = [list(o.contents.fp64_contents) for o in reply.outputs if o.name == "close"][0]
        assert np.allclose(closes, forecaster.predict(frame, **GREEDY)["close"], rtol=1e-5)


def test_rest_infer_stream_answers_as_an_event(server):
    with httpx.Client(timeout=120) as client:
        reply = client.post(f"{server.url}/v2/models/{MODEL_NAME}/infer_stream", json=v2_request(GOOD, GREEDY))
    assert reply.status_code == 200, reply.text
    events = [line for line in reply.text.splitlines() if line.startswith("data: ")]
    assert len(events) == 1 and json.loads(events[0][6:])["outputs"]


# -- names, ids, logs, metrics -----------------------------------------------------------------


def test_made_up_model_names_create_no_metric_series(server):
    before = len(server.metrics())
    names = [f"x{i}" + "n" * 2000 for i in range(20)]
    with httpx.Client(timeout=60) as client:
        for name in names:
            reply = client.post(f"{server.url}/v2/models/{name}/infer", json=v2_request(GOOD, GREEDY))
            assert reply.status_code == 404
    for name in names[:5]:
        request = grpc_request(GOOD, GREEDY)
        request.model_name = name
        with pytest.raises(grpc.RpcError) as caught:
            _grpc_call(server, request)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    after = server.metrics()
    assert "nnnnnnnnnn" not in after
    assert len(after) - before < 20_000  # a few counters moved; no series per name


def test_request_ids_and_log_lines(server):
    """X-Request-ID: first of duplicates wins, malformed ones are replaced, it is echoed and
    logged; a forged newline in a gRPC model name stays inside one JSON line; a 400 writes
    one WARNING line with the id and no traceback."""
    with httpx.Client(timeout=60) as client:
        echoed = client.post(
            f"{server.url}{INFER}",
            json=v2_request(GOOD, GREEDY),
            headers=[("X-Request-ID", "first-id"), ("X-Request-ID", "second-id")],
        )
        assert echoed.status_code == 200 and echoed.headers.get_list("x-request-id") == ["first-id"]
        replaced = client.post(
            f"{server.url}/invocations",
            headers={"X-Request-ID": "bad id\u0007"},
            json={"dataframe_split": SPLIT, "params": GREEDY},
        )
        assert replaced.status_code == 200, replaced.text
        new_id = replaced.headers["x-request-id"]
        assert new_id != "bad id\u0007" and new_id.isalnum()
        bad = client.post(
            f"{server.url}{INFER}", json=v2_request(GOOD, {"pred_len": 0}), headers={"X-Request-ID": "hostile-400"}
        )
        assert bad.status_code == 400
    forged = grpc_request(GOOD, GREEDY)
    forged.model_name = 'kronos\n{"level": "INFO", "message": "forged"}'
    with pytest.raises(grpc.RpcError):
        _grpc_call(server, forged)
    lines = [line for line in server.log.read_text(errors="replace").splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) for r in records)
    assert not any(r.get("message") == "forged" for r in records)
    about_400 = [r for r in records if r.get("request_id") == "hostile-400"]
    assert len(about_400) == 1 and about_400[0]["level"] == "WARNING", about_400
    assert "exc_info" not in about_400[0] and "pred_len" in about_400[0]["error"]
    assert [r for r in records if r.get("request_id") == new_id]
    assert [r for r in records if r.get("request_id") == "first-id"]
