"""Fixtures of the serving tests: a sqlite registry with two tiny Kronos versions (v1 is
`champion`), and a real MLServer process serving `models:/kronos@champion` from it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from serving_helpers import QUEUE_BUDGET_MB, TINY_MAX_CONTEXT, Server, start_server

from model_package import KronosForecaster
from model_package.kronos import load_model, write_random_checkpoint
from serving.local_server import LocalRegistry


@dataclass(frozen=True)
class ServingRegistry(LocalRegistry):
    """The registry both versions live in, and their checkpoint directories."""

    checkpoints: dict[str, tuple[Path, Path]]  # version -> (tokenizer_dir, model_dir)

    def forecaster(self, version: str) -> KronosForecaster:
        tokenizer_dir, model_dir = self.checkpoints[version]
        return KronosForecaster.from_pretrained(tokenizer_dir, model_dir, max_context=TINY_MAX_CONTEXT, device="cpu")


@pytest.fixture(scope="session")
def serving_registry(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: tuple[Path, Path]) -> ServingRegistry:
    """`kronos` v1 (the tiny pair) and v2 (other random predictor weights); v1 = champion."""
    root = tmp_path_factory.mktemp("serving-registry")
    tokenizer_dir, model_dir = tiny_checkpoints
    other_model = write_random_checkpoint(load_model(model_dir).config, root / "model-v2", seed=99)
    registry = LocalRegistry.create(root, "kronos-serving-tests")
    checkpoints = {}
    for pair in ((tokenizer_dir, model_dir), (tokenizer_dir, other_model)):
        info = registry.log_version(*pair, max_context=TINY_MAX_CONTEXT, example_rows=16)
        checkpoints[str(info.registered_model_version)] = pair
    registry.set_champion("1")
    return ServingRegistry(registry.tracking_uri, root, registry.experiment_id, checkpoints)


@pytest.fixture(scope="session")
def server(serving_registry: ServingRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """MLServer serving the champion (shared by the serving test modules), with budgets
    small enough that tests can overload it."""
    running = start_server(
        tmp_path_factory.mktemp("mlserver"),
        serving_registry.tracking_uri,
        env={
            "KRONOS_QUEUE_BUDGET_MB": str(QUEUE_BUDGET_MB),
            "KRONOS_MAX_REQUEST_MEMORY_MB": str(QUEUE_BUDGET_MB),
            "KRONOS_RUNNING_BUDGET_MB": str(2 * QUEUE_BUDGET_MB),
            "KRONOS_MAX_HISTORY_CANDLES": "512",
        },
        model_settings={"max_batch_size": 32, "max_batch_time": 0.2},
    )
    try:
        yield running
    finally:
        running.stop()
