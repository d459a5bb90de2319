"""Fixtures of the batch tests: a real MLflow server on PostgreSQL holding the tiny Kronos
as `kronos` version 1 (alias `champion`), which Spark's Python workers load over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from batch_helpers import TINY_MAX_CONTEXT, BatchRegistry
from support import Postgres, start_mlflow_server

from model_package.log_model import log_kronos_model
from serving.local_server import tracking_uri


@pytest.fixture(scope="session")
def batch_registry(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: tuple[Path, Path]
) -> Iterator[BatchRegistry]:
    root = tmp_path_factory.mktemp("batch-registry")
    cluster = Postgres.start()
    try:
        server = start_mlflow_server(cluster.url, root / "artifacts", root / "server.log")
        try:
            with tracking_uri(server.url):
                mlflow.set_experiment("kronos-batch-tests")
                with mlflow.start_run():
                    info = log_kronos_model(
                        *tiny_checkpoints, registered_model_name="kronos", max_context=TINY_MAX_CONTEXT
                    )
                version = str(info.registered_model_version)
                mlflow.MlflowClient().set_registered_model_alias("kronos", "champion", version)
            yield BatchRegistry(server.url, version)
        finally:
            server.stop()
    finally:
        cluster.stop()
