"""Fixtures of the registry tests: a sqlite registry and an MLflow server on PostgreSQL."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support import Postgres, start_mlflow_server


@pytest.fixture(scope="session")
def new_sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """Makes fresh sqlite registries by copying one migrated empty database (the MLflow
    schema migrations take several seconds per database)."""
    template = tmp_path_factory.mktemp("sqlite-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()

    def make(label: str) -> str:
        target = tmp_path_factory.mktemp(label) / "mlflow.db"
        shutil.copyfile(template, target)
        return f"sqlite:///{target}"

    return make


@pytest.fixture(scope="module")
def sqlite_uri(new_sqlite_uri: Callable[[str], str]) -> str:
    """A fresh sqlite registry (artifacts land beside it, in `artifacts/`)."""
    return new_sqlite_uri("sqlite-registry")


@pytest.fixture(scope="module")
def postgres_server_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on a real PostgreSQL cluster, with proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow-server")
    cluster = Postgres.start()
    try:
        server = start_mlflow_server(cluster.url, root / "artifacts", root / "server.log")
        try:
            yield server.url
        finally:
            server.stop()
    finally:
        cluster.stop()


@pytest.fixture
def registry_uri(request: pytest.FixtureRequest) -> str:
    """Indirect parametrisation: `sqlite` or `postgres`."""
    name = {"sqlite": "sqlite_uri", "postgres": "postgres_server_uri"}[request.param]
    return request.getfixturevalue(name)


def artifact_dir(uri: str) -> Path | None:
    """The artifact dir beside a sqlite registry (None for servers)."""
    return Path(uri.split(":///", 1)[1]).parent / "artifacts" if uri.startswith("sqlite") else None
