"""Fixtures of the end-to-end tests: a sqlite registry with the tiny Kronos as
`kronos@champion`, a real `mlserver start` process serving it, and a real nginx gateway
in front of that server (REST and gRPC), all on 127.0.0.1 and free ports.

The MLServer process is started by `start_server` from tests/serving/serving_helpers.py
(made importable by integration_helpers.py), which captures the server's stdout and
stderr (its inference worker's included) in the file `Server.log`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from integration_helpers import ADMIN, CLIENT, Stack
from mlflow import MlflowClient
from serving_helpers import MODEL_NAME, TINY_MAX_CONTEXT, free_port, start_server

from model_package.log_model import log_kronos_model
from serving.gateway.process import GatewayProcess
from serving.gateway.render import GatewaySettings


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory: pytest.TempPathFactory,
                 tiny_checkpoints: tuple[Path, Path]) -> Iterator[str]:
    """A sqlite registry holding the tiny pair as `kronos` version 1, alias `champion`."""
    root = tmp_path_factory.mktemp("integration-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.create_experiment("kronos-integration-tests",
                                              artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_kronos_model(*tiny_checkpoints, registered_model_name=MODEL_NAME,
                                    max_context=TINY_MAX_CONTEXT, example_rows=16)
        client.set_registered_model_alias(MODEL_NAME, "champion",
                                          str(info.registered_model_version))
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def stack(registry_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A real MLServer behind a real nginx gateway; both stopped at the end of the module."""
    server = start_server(tmp_path_factory.mktemp("integration-mlserver"), registry_uri,
                          model_settings={"max_batch_size": 32, "max_batch_time": 0.02})
    try:
        settings = GatewaySettings(
            listen_host="127.0.0.1", http_port=free_port(), grpc_port=free_port(),
            status_port=free_port(),
            upstream_http=[f"127.0.0.1:{server.http_port}"],
            upstream_grpc=[f"127.0.0.1:{server.grpc_port}"],
            allow_cidrs=[f"{CLIENT}/32"], admin_cidrs=[f"{ADMIN}/32"],
            rate_limit="100r/s", rate_limit_burst=100, worker_processes="1",
            # as root, nginx workers would switch to `nobody`, who cannot write pytest's
            # private tmp dirs: keep them as the current user
            user="root" if os.geteuid() == 0 else "")
        gateway = GatewayProcess(settings, prefix=tmp_path_factory.mktemp("integration-gw"))
        with gateway:
            yield Stack(server, gateway)
    finally:
        server.stop()
