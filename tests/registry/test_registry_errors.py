"""Failures a script must be able to tell apart: one line on stderr, a distinct exit code."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from registry_helpers import one_line_error, run_cli

from serving.local_server import free_port


@pytest.fixture(scope="module")
def bare_registry(new_sqlite_uri: Callable[[str], str]) -> str:
    """A sqlite registry holding model `kronos` with no versions (cheap: no weights)."""
    uri = new_sqlite_uri("bare-registry")
    MlflowClient(tracking_uri=uri, registry_uri=uri).create_registered_model("kronos")
    return uri


def test_unreachable_registry_fails_fast_with_code_4() -> None:
    started = time.monotonic()
    line = one_line_error(run_cli(f"http://127.0.0.1:{free_port()}", "history"), 4)
    assert "unreachable" in line
    assert time.monotonic() - started < 120


@pytest.mark.parametrize("args", [["promote", "nosuchalias"], ["show", "42"]], ids=["alias", "version"])
def test_unknown_alias_or_version_gives_code_5(bare_registry: str, args: list[str]) -> None:
    line = one_line_error(run_cli(bare_registry, *args), 5)
    assert "nosuchalias" in line or "'42'" in line


def test_corrupt_csv_gives_code_6(bare_registry: str, tmp_path: Path) -> None:
    path = tmp_path / "corrupt.csv"
    path.write_bytes(b'timestamp,open,high,low,close\n2024-01-02,1,2,0.5,1.5\n"2024-01-03,1,2\x00\xff')
    line = one_line_error(run_cli(bare_registry, "evaluate", "1", "--data", str(path)), 6)
    assert "corrupt.csv" in line
