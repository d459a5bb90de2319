"""Helpers for the gateway tests: recording upstreams, an HTTP client bound to a source
address, and access-log reading."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import grpc
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc
from mlserver.grpc import model_repository_pb2 as repo_pb
from mlserver.grpc import model_repository_pb2_grpc as repo_grpc

from serving.gateway.process import GatewayProcess

CLIENT = "127.0.0.1"  # allowed, not admin
OUTSIDER = "127.0.0.2"  # not in the allow-list
ADMIN = "127.0.0.3"  # allowed and admin


@dataclass
class SeenRequest:
    """What the upstream received."""

    method: str
    path: str
    headers: dict[str, str]
    body_length: int


@dataclass
class RecordingUpstream:
    """A threaded stdlib HTTP server that records requests and echoes them as JSON."""

    port: int
    seen: list[SeenRequest] = field(default_factory=list)

    def paths(self) -> list[str]:
        """Paths of every request received, in order."""
        return [request.path for request in self.seen]


def make_handler(upstream: RecordingUpstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            upstream.seen.append(SeenRequest(self.command, self.path, dict(self.headers), len(body)))
            if self.path.startswith("/v2/models/slow/"):
                time.sleep(2.0)
            payload = json.dumps({"path": self.path, "headers": dict(self.headers), "body_length": len(body)}).encode()
            status = 404 if self.path.startswith("/v2/models/missing/") else 200
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("X-Request-ID", "upstream-must-not-leak")
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the gateway gave up first (the /slow timeout test)

        do_GET = _serve  # noqa: N815
        do_POST = _serve  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The V2 dataplane, every RPC answered trivially; ModelInfer echoes the request id."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []

    def ServerLive(
        self,
        request: pb.ServerLiveRequest,
        context: grpc.ServicerContext,
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(
        self,
        request: pb.ServerReadyRequest,
        context: grpc.ServicerContext,
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(
        self,
        request: pb.ModelReadyRequest,
        context: grpc.ServicerContext,
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=True)

    def ServerMetadata(
        self,
        request: pb.ServerMetadataRequest,
        context: grpc.ServicerContext,
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="upstream")

    def ModelMetadata(
        self,
        request: pb.ModelMetadataRequest,
        context: grpc.ServicerContext,
    ) -> pb.ModelMetadataResponse:
        return pb.ModelMetadataResponse(name=request.name)

    def ModelInfer(
        self,
        request: pb.ModelInferRequest,
        context: grpc.ServicerContext,
    ) -> pb.ModelInferResponse:
        metadata = dict(context.invocation_metadata())
        request_id = str(metadata.get("x-request-id", ""))
        self.request_ids.append(request_id)
        if request.model_name == "missing":  # an error before any message: trailers-only
            context.abort(grpc.StatusCode.NOT_FOUND, "model missing not found")
        return pb.ModelInferResponse(model_name=request.model_name, id=request_id)

    def ModelStreamInfer(
        self,
        request_iterator: Iterator[pb.ModelInferRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[pb.ModelInferResponse]:
        for request in request_iterator:
            yield pb.ModelInferResponse(model_name=request.model_name, id=request.id)

    def RepositoryIndex(
        self,
        request: pb.RepositoryIndexRequest,
        context: grpc.ServicerContext,
    ) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse()

    def RepositoryModelLoad(
        self,
        request: pb.RepositoryModelLoadRequest,
        context: grpc.ServicerContext,
    ) -> pb.RepositoryModelLoadResponse:
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        return pb.RepositoryModelUnloadResponse()


class RepositoryServicer(repo_grpc.ModelRepositoryServiceServicer):
    """The model repository service (admin only through the gateway)."""

    def RepositoryIndex(
        self,
        request: repo_pb.RepositoryIndexRequest,
        context: grpc.ServicerContext,
    ) -> repo_pb.RepositoryIndexResponse:
        return repo_pb.RepositoryIndexResponse()

    def RepositoryModelLoad(
        self, request: repo_pb.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> repo_pb.RepositoryModelLoadResponse:
        return repo_pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(
        self, request: repo_pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> repo_pb.RepositoryModelUnloadResponse:
        return repo_pb.RepositoryModelUnloadResponse()


class RecordingInterceptor(grpc.ServerInterceptor):
    """Records (full method name, x-request-id) of every call that reaches the upstream,
    known method or not (interceptors run before the method lookup)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: grpc.HandlerCallDetails) -> Any:
        metadata = dict(handler_call_details.invocation_metadata or ())
        self.calls.append((handler_call_details.method, str(metadata.get("x-request-id", ""))))
        return continuation(handler_call_details)


@dataclass
class GrpcUpstream:
    """The gRPC upstream standing in for MLServer's gRPC port."""

    port: int
    inference: InferenceServicer
    received: RecordingInterceptor

    def methods_for(self, request_id: str) -> list[str]:
        """Methods of the calls that reached the upstream with this x-request-id."""
        return [method for method, seen_id in self.received.calls if seen_id == request_id]


GatewayFactory = Callable[..., GatewayProcess]


@dataclass
class Reply:
    """An HTTP response, read completely."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def call(
    gateway: GatewayProcess,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    source: str = CLIENT,
    chunked: bool = False,
) -> Reply:
    """One HTTP/1.1 request to the gateway's REST port from the `source` address."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", gateway.settings.http_port, timeout=10, source_address=(source, 0)
    )
    try:
        if chunked:
            assert body is not None
            connection.request(method, path, body=iter([body]), headers=headers or {}, encode_chunked=True)
        else:
            connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def log_entries(gateway: GatewayProcess, timeout_s: float = 2.0, request_id: str | None = None) -> list[dict[str, Any]]:
    """Parsed access-log lines; with `request_id`, waits until that request is logged."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = gateway.access_log.read_text() if gateway.access_log.exists() else ""
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        if request_id is None or any(e["request_id"] == request_id for e in entries):
            return entries
        if time.monotonic() > deadline:
            raise AssertionError(f"request {request_id} not in the access log")
        time.sleep(0.05)
