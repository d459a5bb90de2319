"""Fixtures of the pyfunc tests: a fresh sqlite registry holding the tiny Kronos as
`kronos` version 1 (alias `champion`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from pyfunc_helpers import MODEL_NAME, TINY_MAX_CONTEXT, Registry

from model_package.log_model import log_kronos_model


@contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow (and its env var, which children inherit) at `uri`, then restore."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory,
             tiny_checkpoints: tuple[Path, Path]) -> Registry:
    """Log the tiny checkpoint pair as `kronos` v1 with alias `champion`, in a fresh sqlite
    registry whose artifacts live in the temp dir (not ./mlruns)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("kronos-pyfunc-tests",
                                          artifact_location=(root / "artifacts").as_uri())
    tokenizer_dir, model_dir = tiny_checkpoints
    with tracking_uri(uri), mlflow.start_run(experiment_id=experiment):
        info = log_kronos_model(tokenizer_dir, model_dir, registered_model_name=MODEL_NAME,
                                max_context=TINY_MAX_CONTEXT)
    client.set_registered_model_alias(MODEL_NAME, "champion", info.registered_model_version)
    return Registry(uri, root, info, experiment)


@pytest.fixture
def tracking(registry: Registry) -> Iterator[Registry]:
    """The test registry as MLflow's tracking URI for the duration of one test."""
    with tracking_uri(registry.tracking_uri):
        yield registry
