"""The gateway for real: nginx rendered from settings, in front of recording upstreams."""

from __future__ import annotations

import re
import socket
import time
import uuid
from typing import Any

import grpc
import pytest
from gateway_helpers import (
    ADMIN,
    CLIENT,
    OUTSIDER,
    GatewayFactory,
    GrpcUpstream,
    RecordingUpstream,
    call,
    log_entries,
)
from google.protobuf.message import Message
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc
from mlserver.grpc import model_repository_pb2 as repo_pb

from serving.gateway.process import GatewayProcess
from serving.local_server import free_port

pytestmark = pytest.mark.integration  # real nginx processes

INFER = "/v2/models/kronos/infer"


def test_allowed_client_is_proxied_with_generated_request_id(
    gateway: GatewayProcess, upstream: RecordingUpstream
) -> None:
    reply = call(gateway, INFER, method="POST", body=b'{"inputs": []}')
    assert reply.status == 200
    request_id = reply.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id  # nginx's $request_id
    assert reply.headers.get_all("X-Request-ID") == [request_id]  # upstream's is hidden
    seen = reply.json()["headers"]
    assert seen["X-Request-ID"] == request_id
    assert seen["X-Real-IP"] == CLIENT
    assert reply.json()["body_length"] == len(b'{"inputs": []}')


def test_client_request_id_is_forwarded_and_echoed(gateway: GatewayProcess) -> None:
    request_id = f"client-{uuid.uuid4()}"
    reply = call(gateway, INFER, method="POST", body=b"{}", headers={"X-Request-ID": request_id})
    assert reply.status == 200
    assert reply.headers["X-Request-ID"] == request_id
    assert reply.json()["headers"]["X-Request-ID"] == request_id


def test_malformed_request_id_is_replaced(gateway: GatewayProcess) -> None:
    reply = call(gateway, INFER, method="POST", body=b"{}", headers={"X-Request-ID": 'bad id with spaces"{}'})
    assert reply.status == 200
    generated = reply.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert reply.json()["headers"]["X-Request-ID"] == generated


def test_client_outside_allow_list_gets_403_and_never_reaches_upstream(
    gateway: GatewayProcess, upstream: RecordingUpstream
) -> None:
    marker = f"/v2/models/kronos/infer?outsider={uuid.uuid4().hex}"
    reply = call(gateway, marker, method="POST", body=b"{}", source=OUTSIDER)
    assert reply.status == 403
    assert reply.json() == {"error": "forbidden: client address not allowed"}
    assert reply.headers["X-Request-ID"]
    assert marker not in upstream.paths()


def test_allow_list_excluding_loopback_denies_everything(make_gateway: GatewayFactory) -> None:
    closed = make_gateway(allow_cidrs=["10.0.0.0/8"], admin_cidrs=["10.0.0.1/32"])
    assert call(closed, "/v2/health/ready").status == 403
    assert call(closed, "/v2/health/ready", source=ADMIN).status == 403


def test_repository_endpoints_only_from_admin_network(gateway: GatewayProcess, upstream: RecordingUpstream) -> None:
    path = f"/v2/repository/models/kronos/load?t={uuid.uuid4().hex}"
    denied = call(gateway, path, method="POST", body=b"")
    assert denied.status == 403
    assert denied.json() == {"error": "forbidden: admin only"}
    assert path not in upstream.paths()
    allowed = call(gateway, path, method="POST", body=b"", source=ADMIN)
    assert allowed.status == 200
    assert path in upstream.paths()
    # the admin is an ordinary client elsewhere
    assert call(gateway, "/v2/health/ready", source=ADMIN).status == 200


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/v2", "other"),
        ("/v2/health/live", "health"),
        ("/v2/health/ready", "health"),
        ("/kronos/health/live", "health"),
        ("/v2/models/kronos", "other"),
        ("/v2/models/kronos/versions/1", "other"),
        ("/v2/models/kronos/ready", "health"),
        ("/v2/models/kronos/versions/1/ready", "health"),
        ("/v2/models/kronos/infer", "infer"),
        ("/v2/models/kronos/versions/1/infer", "infer"),
        ("/v2/models/kronos/infer_stream", "infer"),  # the model server answers these itself
        ("/v2/models/kronos/generate", "infer"),
        ("/v2/models/kronos/generate_stream", "infer"),
        ("/invocations", "infer"),
    ],
)
def test_rest_inference_api_is_open_to_allowed_clients(
    gateway: GatewayProcess, upstream: RecordingUpstream, path: str, route: str
) -> None:
    request_id = f"open-{uuid.uuid4().hex}"
    marked = f"{path}?t={request_id}"
    reply = call(gateway, marked, method="POST", body=b"{}", headers={"X-Request-ID": request_id})
    assert reply.status == 200
    assert marked in upstream.paths()
    entry = next(e for e in log_entries(gateway, request_id=request_id) if e["request_id"] == request_id)
    assert entry["route"] == route and entry["status"] == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v2/docs",
        "/v2/docs/dataplane.json",
        "/v2/models/kronos/docs",
        "/v2/models/kronos/docs/dataplane.json",
        "/v2/models/kronos/versions/1/docs",
        "/kronos/live/actuals",  # realised candles in: ingest jobs and operators
        "/kronos/live/accuracy",
    ],
)
def test_rest_api_docs_and_live_ingest_are_admin_only(
    gateway: GatewayProcess, upstream: RecordingUpstream, path: str
) -> None:
    marked = f"{path}?t={uuid.uuid4().hex}"
    denied = call(gateway, marked)
    assert denied.status == 403
    assert denied.json() == {"error": "forbidden: admin only"}
    assert marked not in upstream.paths()
    assert call(gateway, marked, source=ADMIN).status == 200
    assert marked in upstream.paths()


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/metrics",
        "/docs",
        "/openapi.json",
        "/ping",
        "/v2/",
        "/v2/models",
        "/v2/models/kronos/infer/extra",
        "/v2/models/kronos/versions/1/unload",
        "/v2/repository",
        "/kronos/live",
        "/kronos/live/actuals/x",
        "/V2/health/live",
        "/inference.GRPCInferenceService/ModelInfer",
    ],
)
def test_rest_paths_off_the_allow_list_get_404_from_the_gateway(
    gateway: GatewayProcess, upstream: RecordingUpstream, path: str
) -> None:
    marked = f"{path}?t={uuid.uuid4().hex}"
    for source in (CLIENT, ADMIN):
        request_id = f"unknown-{uuid.uuid4().hex}"
        reply = call(gateway, marked, method="POST", body=b"{}", source=source, headers={"X-Request-ID": request_id})
        assert reply.status == 404
        assert reply.json() == {"error": "not found: path not served through the gateway"}
        assert reply.headers["X-Request-ID"] == request_id
        entry = next(e for e in log_entries(gateway, request_id=request_id) if e["request_id"] == request_id)
        assert (entry["status"], entry["route"]) == (404, "other")
    assert marked not in upstream.paths()
    # an address outside the allow-list learns nothing about paths: 403 first
    assert call(gateway, marked, source=OUTSIDER).status == 403


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/kronos/../../repository/models/kronos/unload",
        "/v2/%72epository/models/kronos/unload",
        "/v2//repository/models/kronos/unload",
    ],
)
def test_rest_spellings_of_admin_paths_are_judged_after_normalisation(
    gateway: GatewayProcess, upstream: RecordingUpstream, path: str
) -> None:
    reply = call(gateway, path, method="POST", body=b"")
    assert reply.status == 403
    assert reply.json() == {"error": "forbidden: admin only"}
    assert path not in upstream.paths()


def test_upstream_404_passes_through_unchanged(gateway: GatewayProcess) -> None:
    # the gateway's own 404 answer is only for paths off the allow-list
    reply = call(gateway, "/v2/models/missing/infer", method="POST", body=b"{}")
    assert reply.status == 404
    assert reply.json()["path"] == "/v2/models/missing/infer"  # the upstream's body


def test_oversized_body_gets_413_before_reaching_upstream(gateway: GatewayProcess, upstream: RecordingUpstream) -> None:
    path = f"{INFER}?big={uuid.uuid4().hex}"
    reply = call(gateway, path, method="POST", body=b"x" * 2048)  # limit is 1k
    assert reply.status == 413
    assert reply.json()["error"].startswith("request body larger than")
    chunked_path = f"{INFER}?chunked={uuid.uuid4().hex}"
    chunked = call(gateway, chunked_path, method="POST", body=b"y" * 4096, chunked=True)
    assert chunked.status == 413
    assert path not in upstream.paths()
    assert chunked_path not in upstream.paths()
    # just under the limit passes, body intact
    ok = call(gateway, INFER, method="POST", body=b"z" * 1000)
    assert ok.status == 200
    assert ok.json()["body_length"] == 1000


def test_over_the_rate_gets_429(make_gateway: GatewayFactory) -> None:
    limited = make_gateway(rate_limit="1r/m", rate_limit_burst=2)
    statuses = [call(limited, "/v2/health/live").status for _ in range(8)]
    assert statuses[:3] == [200, 200, 200]  # one at the rate (1 per minute) plus a burst of two
    assert statuses[3:] == [429] * 5
    reply = call(limited, "/v2/health/live")
    assert reply.status == 429
    assert reply.json() == {"error": "rate limit exceeded, retry later"}
    # the limit is per client address: another allowed client is unaffected
    assert call(limited, "/v2/health/live", source=ADMIN).status == 200


def test_upstream_slower_than_deadline_gets_504(gateway: GatewayProcess) -> None:
    # deadline 0.5 s + margin 0.3 s; the upstream sleeps 2 s for the model "slow"
    reply = call(gateway, "/v2/models/slow/infer", method="POST", body=b"{}")
    assert reply.status == 504
    assert reply.json() == {"error": "model server did not answer in time"}


def test_upstream_down_gets_502(make_gateway: GatewayFactory) -> None:
    dead = make_gateway(upstream_http=[f"127.0.0.1:{free_port()}"])
    reply = call(dead, INFER, method="POST", body=b"{}")
    assert reply.status == 502
    assert reply.json() == {"error": "model server unavailable"}


def test_gateway_health_endpoint(gateway: GatewayProcess) -> None:
    import urllib.request

    url = f"http://{gateway.settings.status_host}:{gateway.settings.status_port}/gateway/health"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200


def test_access_log_is_json_with_request_id_status_upstream_time_client(gateway: GatewayProcess) -> None:
    request_id = f"log-{uuid.uuid4().hex}"
    assert call(gateway, INFER, method="POST", body=b"{}", headers={"X-Request-ID": request_id}).status == 200
    denied_id = f"denied-{uuid.uuid4().hex}"
    assert (
        call(gateway, INFER, method="POST", body=b"{}", source=OUTSIDER, headers={"X-Request-ID": denied_id}).status
        == 403
    )
    entries = log_entries(gateway, request_id=denied_id)
    entry = next(e for e in entries if e["request_id"] == request_id)
    assert entry["status"] == 200
    assert entry["client"] == CLIENT
    assert entry["route"] == "infer"
    assert entry["method"] == "POST"
    assert float(entry["upstream_time"]) >= 0
    assert float(entry["request_time"]) >= 0
    assert entry["upstream_status"] == "200"
    denied = next(e for e in entries if e["request_id"] == denied_id)
    assert denied["status"] == 403 and denied["client"] == OUTSIDER
    assert denied["upstream_time"] == ""  # never went upstream
    assert {e["route"] for e in entries} <= {"infer", "grpc", "health", "repository", "other"}


# ----------------------------------------------------------------------------- gRPC


def _stub(gateway: GatewayProcess, source: str = CLIENT) -> pb_grpc.GRPCInferenceServiceStub:
    channel = grpc.insecure_channel(gateway.grpc_target, options=[("grpc.enable_http_proxy", 0)])
    return pb_grpc.GRPCInferenceServiceStub(channel)


def test_grpc_round_trip_through_gateway_forwards_request_id(
    gateway: GatewayProcess, grpc_upstream: GrpcUpstream
) -> None:
    stub = _stub(gateway)
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live is True
    request_id = f"grpc-{uuid.uuid4().hex}"
    response, call_info = stub.ModelInfer.with_call(
        pb.ModelInferRequest(model_name="kronos"), timeout=5, metadata=[("x-request-id", request_id)]
    )
    assert response.model_name == "kronos"
    assert response.id == request_id  # the upstream saw the client's id
    assert dict(call_info.initial_metadata())["x-request-id"] == request_id
    generated, info = stub.ModelInfer.with_call(pb.ModelInferRequest(model_name="kronos"), timeout=5)
    assert re.fullmatch(r"[0-9a-f]{32}", generated.id)
    assert dict(info.initial_metadata())["x-request-id"] == generated.id
    entry = next(e for e in log_entries(gateway, request_id=request_id) if e["request_id"] == request_id)
    assert entry["route"] == "grpc"
    assert entry["protocol"] == "HTTP/2.0"
    assert entry["grpc_status"] == "0"


def test_grpc_upstream_error_passes_through_and_is_logged_once(gateway: GatewayProcess) -> None:
    request_id = f"missing-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError) as missing:
        _stub(gateway).ModelInfer(
            pb.ModelInferRequest(model_name="missing"), timeout=5, metadata=[("x-request-id", request_id)]
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert missing.value.details() == "model missing not found"
    entry = next(e for e in log_entries(gateway, request_id=request_id) if e["request_id"] == request_id)
    assert entry["status"] == 200 and entry["grpc_status"] == "5"


INFERENCE = "/inference.GRPCInferenceService/"
REPOSITORY = "/inference.model_repository.ModelRepositoryService/"

# The inference RPCs every allowed client may call: (method, request, response type).
OPEN_RPCS: list[tuple[str, Message, type[Message]]] = [
    (f"{INFERENCE}ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse),
    (f"{INFERENCE}ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse),
    (f"{INFERENCE}ModelReady", pb.ModelReadyRequest(name="kronos"), pb.ModelReadyResponse),
    (f"{INFERENCE}ServerMetadata", pb.ServerMetadataRequest(), pb.ServerMetadataResponse),
    (f"{INFERENCE}ModelMetadata", pb.ModelMetadataRequest(name="kronos"), pb.ModelMetadataResponse),
    (f"{INFERENCE}ModelInfer", pb.ModelInferRequest(model_name="kronos"), pb.ModelInferResponse),
]
# The repository RPCs of both services: admin networks only.
ADMIN_RPCS: list[tuple[str, Message, type[Message]]] = [
    (f"{INFERENCE}RepositoryIndex", pb.RepositoryIndexRequest(), pb.RepositoryIndexResponse),
    (
        f"{INFERENCE}RepositoryModelLoad",
        pb.RepositoryModelLoadRequest(model_name="kronos"),
        pb.RepositoryModelLoadResponse,
    ),
    (
        f"{INFERENCE}RepositoryModelUnload",
        pb.RepositoryModelUnloadRequest(model_name="kronos"),
        pb.RepositoryModelUnloadResponse,
    ),
    (f"{REPOSITORY}RepositoryIndex", repo_pb.RepositoryIndexRequest(), repo_pb.RepositoryIndexResponse),
    (
        f"{REPOSITORY}RepositoryModelLoad",
        repo_pb.RepositoryModelLoadRequest(model_name="kronos"),
        repo_pb.RepositoryModelLoadResponse,
    ),
    (
        f"{REPOSITORY}RepositoryModelUnload",
        repo_pb.RepositoryModelUnloadRequest(model_name="kronos"),
        repo_pb.RepositoryModelUnloadResponse,
    ),
]
# Off the allow-list for everyone, admins included; some are spellings that nginx would
# normalise into an allowed method while MLServer would see the raw path.
UNKNOWN_METHODS = [
    f"{INFERENCE}NoSuchMethod",
    "/no.such.Service/Call",
    "/grpc.health.v1.Health/Check",
    f"{INFERENCE}modelinfer",
    "/inference.grpcinferenceservice/ModelInfer",
    f"{INFERENCE}ModelInfer/extra",
    f"{INFERENCE}RepositoryModelUnload/../ModelInfer",
    f"{INFERENCE}Model%49nfer",
    "/inference.GRPCInferenceService//ModelInfer",
    "/",
]


@pytest.fixture(scope="module")
def admin_gateway(make_gateway: GatewayFactory) -> GatewayProcess:
    """A gateway whose admin network is 127.0.0.1 (gRPC clients cannot pick a source
    address, so the admin role goes to the address they connect from)."""
    return make_gateway(admin_cidrs=[f"{CLIENT}/32"])


def _unary(
    gateway: GatewayProcess, method: str, request: Message, response_type: type[Message], request_id: str
) -> Message:
    """One unary call of `method` (any path) through the gateway."""
    with grpc.insecure_channel(gateway.grpc_target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        rpc = channel.unary_unary(
            method, request_serializer=type(request).SerializeToString, response_deserializer=response_type.FromString
        )
        return rpc(request, timeout=5, metadata=[("x-request-id", request_id)])


def _logged(gateway: GatewayProcess, request_id: str) -> dict[str, Any]:
    return next(e for e in log_entries(gateway, request_id=request_id) if e["request_id"] == request_id)


@pytest.mark.parametrize(
    ("method", "request_message", "response_type"), OPEN_RPCS, ids=[rpc[0].rsplit("/", 1)[1] for rpc in OPEN_RPCS]
)
def test_grpc_inference_rpcs_are_open_to_allowed_clients(
    gateway: GatewayProcess,
    grpc_upstream: GrpcUpstream,
    method: str,
    request_message: Message,
    response_type: type[Message],
) -> None:
    request_id = f"open-{uuid.uuid4().hex}"
    reply = _unary(gateway, method, request_message, response_type, request_id)
    assert isinstance(reply, response_type)
    assert grpc_upstream.methods_for(request_id) == [method]
    entry = _logged(gateway, request_id)
    assert (entry["status"], entry["grpc_status"], entry["route"]) == (200, "0", "grpc")


def test_grpc_stream_infer_reaches_the_model_server(gateway: GatewayProcess, grpc_upstream: GrpcUpstream) -> None:
    # The gateway lets streaming inference through: the model server decides (and refuses
    # it clearly), so clients get the same answer with or without the gateway.
    request_id = f"stream-{uuid.uuid4().hex}"
    replies = list(
        _stub(gateway).ModelStreamInfer(
            iter(
                [pb.ModelInferRequest(model_name="kronos", id="a"), pb.ModelInferRequest(model_name="kronos", id="b")]
            ),
            timeout=5,
            metadata=[("x-request-id", request_id)],
        )
    )
    assert [reply.id for reply in replies] == ["a", "b"]
    assert grpc_upstream.methods_for(request_id) == [f"{INFERENCE}ModelStreamInfer"]


@pytest.mark.parametrize(
    ("method", "request_message", "response_type"), ADMIN_RPCS, ids=[rpc[0].split(".", 1)[1] for rpc in ADMIN_RPCS]
)
def test_grpc_repository_rpcs_of_both_services_are_denied_to_non_admins(
    gateway: GatewayProcess,
    grpc_upstream: GrpcUpstream,
    method: str,
    request_message: Message,
    response_type: type[Message],
) -> None:
    request_id = f"denied-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError) as denied:
        _unary(gateway, method, request_message, response_type, request_id)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (denied.value.details() or "").startswith("admin only")
    assert grpc_upstream.methods_for(request_id) == []  # answered by the gateway itself
    entry = _logged(gateway, request_id)
    assert (entry["status"], entry["grpc_status"], entry["route"]) == (403, "7", "repository")


@pytest.mark.parametrize(
    ("method", "request_message", "response_type"), ADMIN_RPCS, ids=[rpc[0].split(".", 1)[1] for rpc in ADMIN_RPCS]
)
def test_grpc_repository_rpcs_of_both_services_pass_for_admins(
    admin_gateway: GatewayProcess,
    grpc_upstream: GrpcUpstream,
    method: str,
    request_message: Message,
    response_type: type[Message],
) -> None:
    request_id = f"admin-{uuid.uuid4().hex}"
    reply = _unary(admin_gateway, method, request_message, response_type, request_id)
    assert isinstance(reply, response_type)
    assert grpc_upstream.methods_for(request_id) == [method]
    entry = _logged(admin_gateway, request_id)
    assert (entry["status"], entry["grpc_status"], entry["route"]) == (200, "0", "repository")


@pytest.mark.parametrize("method", UNKNOWN_METHODS)
def test_grpc_methods_off_the_allow_list_are_denied_to_everyone(
    gateway: GatewayProcess, admin_gateway: GatewayProcess, grpc_upstream: GrpcUpstream, method: str
) -> None:
    request_id = f"unknown-{uuid.uuid4().hex}"
    for target in (gateway, admin_gateway):
        with pytest.raises(grpc.RpcError) as denied:
            _unary(target, method, pb.ModelInferRequest(model_name="kronos"), pb.ModelInferResponse, request_id)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert denied.value.details() == "method not served through the gateway"
        entry = _logged(target, request_id)
        assert (entry["status"], entry["grpc_status"]) == (403, "7")
    assert grpc_upstream.methods_for(request_id) == []  # never reached the model server


def test_grpc_unknown_method_is_logged_with_route_other(gateway: GatewayProcess) -> None:
    request_id = f"other-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError):
        _unary(gateway, f"{INFERENCE}NoSuchMethod", pb.ServerLiveRequest(), pb.ServerLiveResponse, request_id)
    entry = _logged(gateway, request_id)
    assert entry["route"] == "other" and entry["uri"] == f"{INFERENCE}NoSuchMethod"


def test_grpc_outside_allow_list_is_denied(make_gateway: GatewayFactory) -> None:
    closed = make_gateway(allow_cidrs=["10.0.0.0/8"])
    request_id = f"outsider-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError) as denied:
        _stub(closed).ServerLive(pb.ServerLiveRequest(), timeout=5, metadata=[("x-request-id", request_id)])
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied.value.details() == "client address not allowed"
    entry = _logged(closed, request_id)
    assert (entry["status"], entry["grpc_status"], entry["route"]) == (403, "7", "grpc")


def test_grpc_oversized_message_is_refused_before_upstream(
    gateway: GatewayProcess, grpc_upstream: GrpcUpstream
) -> None:
    seen_before = list(grpc_upstream.inference.request_ids)
    request_id = f"big-{uuid.uuid4().hex}"
    big = pb.ModelInferRequest(model_name="kronos", raw_input_contents=[b"x" * 8192])
    with pytest.raises(grpc.RpcError) as refused:
        _stub(gateway).ModelInfer(big, timeout=5, metadata=[("x-request-id", request_id)])
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "request larger than 1k" in (refused.value.details() or "")
    assert grpc_upstream.inference.request_ids == seen_before
    entry = next(e for e in log_entries(gateway, request_id=request_id) if e["request_id"] == request_id)
    assert entry["status"] == 413 and entry["route"] == "grpc"


def test_grpc_over_the_rate_gets_resource_exhausted(make_gateway: GatewayFactory) -> None:
    limited = make_gateway(rate_limit="1r/m", rate_limit_burst=1)
    stub = _stub(limited)
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    request_id = f"limited-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError) as limited_error:
        stub.ServerLive(pb.ServerLiveRequest(), timeout=5, metadata=[("x-request-id", request_id)])
    assert limited_error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    entries = log_entries(limited, request_id=request_id)
    assert [e["status"] for e in entries] == [200, 200, 429]
    assert entries[-1]["grpc_status"] == "8"
    assert entries[0]["grpc_status"] == "0"


def test_error_log_has_no_configuration_warnings(gateway: GatewayProcess) -> None:
    call(gateway, INFER, method="POST", body=b"{}")
    call(gateway, INFER, method="POST", body=b"{}", source=OUTSIDER)
    call(gateway, "/not-served")
    # a malformed request line is refused (400) before any rewrite directive runs
    with socket.create_connection(("127.0.0.1", gateway.settings.http_port), timeout=5) as raw:
        raw.sendall(b"GARBAGE\r\n\r\n")
        assert raw.recv(64).startswith(b"HTTP/1.1 400")
    deadline = time.monotonic() + 10
    while not any(e["status"] == 400 for e in log_entries(gateway)):
        assert time.monotonic() < deadline, "the 400 was not logged"
        time.sleep(0.05)
    errors = gateway.stderr_path.read_text()
    for bad in ("uninitialized", "[emerg]", "[alert]", "[crit]"):
        assert bad not in errors, errors
