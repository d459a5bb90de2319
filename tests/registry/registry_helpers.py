"""Helpers of the registry tests: run the CLI as a subprocess (PostgreSQL and `mlflow
server` are in tests/support.py, free ports in serving.local_server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 600


def cli_env(tracking_uri: str) -> dict[str, str]:
    """The environment of a CLI child: this registry, no inherited run, a fixed user."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KRONOS_"))}
    env.update(
        {
            "MLFLOW_TRACKING_URI": tracking_uri,
            "KRONOS_USER": "registry-tests",
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "2",
            "KRONOS_DEVICE": "cpu",
        }
    )
    return env


def run_cli(
    tracking_uri: str, *args: str, cwd: Path | None = None, timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """`python -m registry_scripts ARGS` against `tracking_uri`."""
    return subprocess.run(
        [sys.executable, "-m", "registry_scripts", *args],
        env=cli_env(tracking_uri),
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a CLI run that failed with exit code `code` (no traceback)."""
    assert result.returncode == code, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]
