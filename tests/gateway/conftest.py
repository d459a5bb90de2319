"""Gateway fixtures: a recording HTTP upstream, a gRPC upstream and real nginx gateways."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from gateway_helpers import (
    ADMIN,
    CLIENT,
    GatewayFactory,
    GrpcUpstream,
    InferenceServicer,
    RecordingInterceptor,
    RecordingUpstream,
    RepositoryServicer,
    make_handler,
)
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc
from mlserver.grpc import model_repository_pb2_grpc as repo_grpc

from serving.gateway.process import GatewayProcess
from serving.gateway.render import GatewaySettings
from serving.local_server import free_port, free_ports


@pytest.fixture(scope="session")
def upstream() -> Iterator[RecordingUpstream]:
    """The REST upstream standing in for MLServer's HTTP port."""
    recorder = RecordingUpstream(port=free_port())
    server = ThreadingHTTPServer(("127.0.0.1", recorder.port), make_handler(recorder))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield recorder
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def grpc_upstream() -> Iterator[GrpcUpstream]:
    """A real grpcio server with the V2 dataplane and repository services."""
    received = RecordingInterceptor()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[received])
    inference = InferenceServicer()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    repo_grpc.add_ModelRepositoryServiceServicer_to_server(RepositoryServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield GrpcUpstream(port=port, inference=inference, received=received)
    server.stop(grace=None)


@pytest.fixture(scope="session")
def make_gateway(
    tmp_path_factory: pytest.TempPathFactory, upstream: RecordingUpstream, grpc_upstream: GrpcUpstream
) -> Iterator[GatewayFactory]:
    """Start a real nginx gateway with the given setting overrides (stopped at the end)."""
    started: list[GatewayProcess] = []

    def make(**overrides: Any) -> GatewayProcess:
        http_port, grpc_port, status_port = free_ports(3)
        values: dict[str, Any] = {
            "listen_host": "127.0.0.1",  # connections from CLIENT, OUTSIDER and ADMIN reach it too
            "http_port": http_port,
            "grpc_port": grpc_port,
            "status_port": status_port,
            "upstream_http": [f"127.0.0.1:{upstream.port}"],
            "upstream_grpc": [f"127.0.0.1:{grpc_upstream.port}"],
            "allow_cidrs": [f"{CLIENT}/32", f"{ADMIN}/32"],
            "admin_cidrs": [f"{ADMIN}/32"],
            "worker_processes": "1",
            # As root, nginx workers would switch to `nobody`, who cannot write pytest's
            # private tmp dirs; keep them as the current user.
            "user": "root" if os.geteuid() == 0 else "",
        }
        values.update(overrides)
        prefix = tmp_path_factory.mktemp("gateway")
        gateway = GatewayProcess(GatewaySettings(**values), prefix=prefix).start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="session")
def gateway(make_gateway: GatewayFactory) -> GatewayProcess:
    """The main gateway: generous rate limit, 1 KiB body limit, short deadline."""
    return make_gateway(
        rate_limit="100r/s", rate_limit_burst=100, max_body_size="1k", server_deadline_s=0.5, timeout_margin_s=0.3
    )
