"""Fixtures of the serving tests: a sqlite registry with two tiny Kronos versions (v1 is
`champion`), and a real MLServer process serving `models:/kronos@champion` from it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from serving_helpers import MODEL_NAME, TINY_MAX_CONTEXT, Server, start_server

from model_package import KronosForecaster
from model_package.kronos import load_model, write_random_checkpoint
from model_package.log_model import log_kronos_model


@dataclass
class ServingRegistry:
    """The registry both versions live in, and their checkpoint directories."""

    tracking_uri: str
    root: Path
    checkpoints: dict[str, tuple[Path, Path]]  # version -> (tokenizer_dir, model_dir)

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def forecaster(self, version: str) -> KronosForecaster:
        tokenizer_dir, model_dir = self.checkpoints[version]
        return KronosForecaster.from_pretrained(tokenizer_dir, model_dir,
                                                max_context=TINY_MAX_CONTEXT, device="cpu")

    def set_champion(self, version: str) -> None:
        self.client().set_registered_model_alias(MODEL_NAME, "champion", version)


@pytest.fixture(scope="session")
def serving_registry(tmp_path_factory: pytest.TempPathFactory,
                     tiny_checkpoints: tuple[Path, Path]) -> Iterator[ServingRegistry]:
    """`kronos` v1 (the tiny pair) and v2 (other random predictor weights); v1 = champion."""
    root = tmp_path_factory.mktemp("serving-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tokenizer_dir, model_dir = tiny_checkpoints
    other_model = write_random_checkpoint(load_model(model_dir).config, root / "model-v2", seed=99)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.create_experiment("kronos-serving-tests",
                                              artifact_location=(root / "artifacts").as_uri())
        checkpoints = {}
        for pair in ((tokenizer_dir, model_dir), (tokenizer_dir, other_model)):
            with mlflow.start_run(experiment_id=experiment):
                info = log_kronos_model(*pair, registered_model_name=MODEL_NAME,
                                        max_context=TINY_MAX_CONTEXT, example_rows=16)
            checkpoints[str(info.registered_model_version)] = pair
        registry = ServingRegistry(uri, root, checkpoints)
        registry.set_champion("1")
        yield registry
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def server(serving_registry: ServingRegistry,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """MLServer serving the champion, small queue limits so that tests can overload it."""
    running = start_server(tmp_path_factory.mktemp("mlserver"), serving_registry.tracking_uri,
                           env={"KRONOS_QUEUE_CAPACITY_SERIES": "48",
                                "KRONOS_MAX_HISTORY_CANDLES": "512"},
                           model_settings={"max_batch_size": 32, "max_batch_time": 0.2})
    try:
        yield running
    finally:
        running.stop()
