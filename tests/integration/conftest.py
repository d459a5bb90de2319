"""Fixtures of the end-to-end tests: a sqlite registry with the tiny Kronos as
`kronos@champion`, a real `mlserver start` process serving it, and a real nginx gateway
in front of that server (REST and gRPC), all on 127.0.0.1 and free ports.

The MLServer process is started by `start_server` from tests/serving/serving_helpers.py
(made importable by integration_helpers.py; `serving.local_server` underneath), which captures the server's stdout and
stderr (its inference worker's included) in the file `Server.log`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_helpers import ADMIN, CLIENT, Stack
from serving_helpers import TINY_MAX_CONTEXT, start_server

from serving.gateway.process import GatewayProcess
from serving.gateway.render import GatewaySettings
from serving.local_server import LocalRegistry, free_ports


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: tuple[Path, Path]) -> str:
    """A sqlite registry holding the tiny pair as `kronos` version 1, alias `champion`."""
    registry = LocalRegistry.create(tmp_path_factory.mktemp("integration-registry"), "kronos-integration-tests")
    registry.log_version(*tiny_checkpoints, max_context=TINY_MAX_CONTEXT, champion=True, example_rows=16)
    return registry.tracking_uri


@pytest.fixture(scope="module")
def stack(registry_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A real MLServer behind a real nginx gateway; both stopped at the end of the module."""
    server = start_server(
        tmp_path_factory.mktemp("integration-mlserver"),
        registry_uri,
        model_settings={"max_batch_size": 32, "max_batch_time": 0.02},
    )
    try:
        http_port, grpc_port, status_port = free_ports(3)
        settings = GatewaySettings(
            listen_host="127.0.0.1",
            http_port=http_port,
            grpc_port=grpc_port,
            status_port=status_port,
            upstream_http=[f"127.0.0.1:{server.http_port}"],
            upstream_grpc=[f"127.0.0.1:{server.grpc_port}"],
            allow_cidrs=[f"{CLIENT}/32", f"{ADMIN}/32"],
            admin_cidrs=[f"{ADMIN}/32"],
            rate_limit="100r/s",
            rate_limit_burst=100,
            worker_processes="1",
            # as root, nginx workers would switch to `nobody`, who cannot write pytest's
            # private tmp dirs: keep them as the current user
            user="root" if os.geteuid() == 0 else "",
        )
        gateway = GatewayProcess(settings, prefix=tmp_path_factory.mktemp("integration-gw"))
        with gateway:
            yield Stack(server, gateway)
    finally:
        server.stop()
