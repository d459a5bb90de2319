"""The gateway for real: nginx rendered from settings, in front of recording upstreams."""

from __future__ import annotations

import re
import uuid

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
    free_port,
    log_entries,
)
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc
from mlserver.grpc import model_repository_pb2 as repo_pb
from mlserver.grpc import model_repository_pb2_grpc as repo_grpc

from serving.gateway.process import GatewayProcess

pytestmark = pytest.mark.integration  # real nginx processes

INFER = "/v2/models/kronos/infer"


def test_allowed_client_is_proxied_with_generated_request_id(
        gateway: GatewayProcess, upstream: RecordingUpstream) -> None:
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
    reply = call(gateway, INFER, method="POST", body=b"{}",
                 headers={"X-Request-ID": request_id})
    assert reply.status == 200
    assert reply.headers["X-Request-ID"] == request_id
    assert reply.json()["headers"]["X-Request-ID"] == request_id


def test_malformed_request_id_is_replaced(gateway: GatewayProcess) -> None:
    reply = call(gateway, INFER, method="POST", body=b"{}",
                 headers={"X-Request-ID": "bad id with spaces\"{}"})
    assert reply.status == 200
    generated = reply.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert reply.json()["headers"]["X-Request-ID"] == generated


def test_client_outside_allow_list_gets_403_and_never_reaches_upstream(
        gateway: GatewayProcess, upstream: RecordingUpstream) -> None:
    marker = f"/v2/models/kronos/infer?outsider={uuid.uuid4().hex}"
    reply = call(gateway, marker, method="POST", body=b"{}", source=OUTSIDER)
    assert reply.status == 403
    assert reply.json() == {"error": "forbidden: client address not allowed"}
    assert reply.headers["X-Request-ID"]
    assert marker not in upstream.paths()


def test_allow_list_excluding_loopback_denies_everything(
        make_gateway: GatewayFactory) -> None:
    closed = make_gateway(allow_cidrs=["10.0.0.0/8"], admin_cidrs=["10.0.0.1/32"])
    assert call(closed, "/v2/health/ready").status == 403
    assert call(closed, "/v2/health/ready", source=ADMIN).status == 403


def test_repository_endpoints_only_from_admin_network(
        gateway: GatewayProcess, upstream: RecordingUpstream) -> None:
    path = f"/v2/repository/models/kronos/load?t={uuid.uuid4().hex}"
    denied = call(gateway, path, method="POST", body=b"")
    assert denied.status == 403
    assert path not in upstream.paths()
    allowed = call(gateway, path, method="POST", body=b"", source=ADMIN)
    assert allowed.status == 200
    assert path in upstream.paths()
    # the admin is an ordinary client elsewhere
    assert call(gateway, "/v2/health/ready", source=ADMIN).status == 200


def test_oversized_body_gets_413_before_reaching_upstream(
        gateway: GatewayProcess, upstream: RecordingUpstream) -> None:
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
    # deadline 0.5 s + margin 0.3 s; the upstream sleeps 2 s on /slow
    reply = call(gateway, "/slow")
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


def test_access_log_is_json_with_request_id_status_upstream_time_client(
        gateway: GatewayProcess) -> None:
    request_id = f"log-{uuid.uuid4().hex}"
    assert call(gateway, INFER, method="POST", body=b"{}",
                headers={"X-Request-ID": request_id}).status == 200
    denied_id = f"denied-{uuid.uuid4().hex}"
    assert call(gateway, INFER, method="POST", body=b"{}", source=OUTSIDER,
                headers={"X-Request-ID": denied_id}).status == 403
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
    channel = grpc.insecure_channel(gateway.grpc_target,
                                    options=[("grpc.enable_http_proxy", 0)])
    return pb_grpc.GRPCInferenceServiceStub(channel)


def test_grpc_round_trip_through_gateway_forwards_request_id(
        gateway: GatewayProcess, grpc_upstream: GrpcUpstream) -> None:
    stub = _stub(gateway)
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live is True
    request_id = f"grpc-{uuid.uuid4().hex}"
    response, call_info = stub.ModelInfer.with_call(
        pb.ModelInferRequest(model_name="kronos"), timeout=5,
        metadata=[("x-request-id", request_id)])
    assert response.model_name == "kronos"
    assert response.id == request_id  # the upstream saw the client's id
    assert dict(call_info.initial_metadata())["x-request-id"] == request_id
    generated, info = stub.ModelInfer.with_call(pb.ModelInferRequest(model_name="kronos"),
                                                timeout=5)
    assert re.fullmatch(r"[0-9a-f]{32}", generated.id)
    assert dict(info.initial_metadata())["x-request-id"] == generated.id
    entry = next(e for e in log_entries(gateway, request_id=request_id)
                 if e["request_id"] == request_id)
    assert entry["route"] == "grpc"
    assert entry["protocol"] == "HTTP/2.0"
    assert entry["grpc_status"] == "0"


def test_grpc_upstream_error_passes_through_and_is_logged_once(
        gateway: GatewayProcess) -> None:
    request_id = f"missing-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError) as missing:
        _stub(gateway).ModelInfer(pb.ModelInferRequest(model_name="missing"), timeout=5,
                                  metadata=[("x-request-id", request_id)])
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert missing.value.details() == "model missing not found"
    entry = next(e for e in log_entries(gateway, request_id=request_id)
                 if e["request_id"] == request_id)
    assert entry["status"] == 200 and entry["grpc_status"] == "5"


def test_grpc_repository_service_only_from_admin(gateway: GatewayProcess) -> None:
    channel = grpc.insecure_channel(gateway.grpc_target,
                                    options=[("grpc.enable_http_proxy", 0)])
    stub = repo_grpc.ModelRepositoryServiceStub(channel)
    with pytest.raises(grpc.RpcError) as denied:
        stub.RepositoryIndex(repo_pb.RepositoryIndexRequest(), timeout=5)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_grpc_repository_service_from_admin_passes(make_gateway: GatewayFactory) -> None:
    # gRPC clients cannot pick a source address, so give 127.0.0.1 the admin role here
    admin_gateway = make_gateway(admin_cidrs=[f"{CLIENT}/32"])
    channel = grpc.insecure_channel(admin_gateway.grpc_target,
                                    options=[("grpc.enable_http_proxy", 0)])
    stub = repo_grpc.ModelRepositoryServiceStub(channel)
    assert stub.RepositoryIndex(repo_pb.RepositoryIndexRequest(), timeout=5) is not None


def test_grpc_outside_allow_list_is_denied(make_gateway: GatewayFactory) -> None:
    closed = make_gateway(allow_cidrs=["10.0.0.0/8"])
    with pytest.raises(grpc.RpcError) as denied:
        _stub(closed).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_grpc_oversized_message_is_refused_before_upstream(
        gateway: GatewayProcess, grpc_upstream: GrpcUpstream) -> None:
    seen_before = list(grpc_upstream.inference.request_ids)
    request_id = f"big-{uuid.uuid4().hex}"
    big = pb.ModelInferRequest(model_name="kronos", raw_input_contents=[b"x" * 8192])
    with pytest.raises(grpc.RpcError) as refused:
        _stub(gateway).ModelInfer(big, timeout=5, metadata=[("x-request-id", request_id)])
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "request larger than 1k" in (refused.value.details() or "")
    assert grpc_upstream.inference.request_ids == seen_before
    entry = next(e for e in log_entries(gateway, request_id=request_id)
                 if e["request_id"] == request_id)
    assert entry["status"] == 413 and entry["route"] == "grpc"


def test_grpc_over_the_rate_gets_resource_exhausted(make_gateway: GatewayFactory) -> None:
    limited = make_gateway(rate_limit="1r/m", rate_limit_burst=1)
    stub = _stub(limited)
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    request_id = f"limited-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError) as limited_error:
        stub.ServerLive(pb.ServerLiveRequest(), timeout=5,
                        metadata=[("x-request-id", request_id)])
    assert limited_error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    entries = log_entries(limited, request_id=request_id)
    assert [e["status"] for e in entries] == [200, 200, 429]
    assert entries[-1]["grpc_status"] == "8"
    assert entries[0]["grpc_status"] == "0"


def test_error_log_has_no_configuration_warnings(gateway: GatewayProcess) -> None:
    call(gateway, INFER, method="POST", body=b"{}")
    call(gateway, INFER, method="POST", body=b"{}", source=OUTSIDER)
    errors = gateway.stderr_path.read_text()
    for bad in ("uninitialized", "[emerg]", "[alert]", "[crit]"):
        assert bad not in errors, errors
