"""Fixtures of the pyfunc tests: a fresh sqlite registry holding the tiny Kronos as
`kronos` version 1 (alias `champion`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pyfunc_helpers import TINY_MAX_CONTEXT, Registry

from serving.local_server import LocalRegistry, tracking_uri


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: tuple[Path, Path]) -> Registry:
    """Log the tiny checkpoint pair as `kronos` v1 with alias `champion`, in a fresh sqlite
    registry whose artifacts live in the temp dir (not ./mlruns)."""
    local = LocalRegistry.create(tmp_path_factory.mktemp("registry"), "kronos-pyfunc-tests")
    info = local.log_version(*tiny_checkpoints, max_context=TINY_MAX_CONTEXT, champion=True)
    return Registry(local.tracking_uri, local.root, local.experiment_id, info)


@pytest.fixture
def tracking(registry: Registry) -> Iterator[Registry]:
    """The test registry as MLflow's tracking URI for the duration of one test."""
    with tracking_uri(registry.tracking_uri):
        yield registry
