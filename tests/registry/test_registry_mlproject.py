"""`mlflow run . -e log --env-manager local -P demo=true` works offline on a tmp registry."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from registry_helpers import CLI_TIMEOUT_S, ROOT, cli_env


@pytest.mark.integration
@pytest.mark.slow
def test_mlproject_log_entry_point_registers_a_demo_challenger(
    tmp_path: Path, new_sqlite_uri: Callable[[str], str]
) -> None:
    uri = new_sqlite_uri("mlproject-registry")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("kronos-project", artifact_location=(tmp_path / "project").as_uri())
    env = cli_env(uri)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `python` of this venv
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "run",
            str(ROOT),
            "-e",
            "log",
            "--env-manager",
            "local",
            "--experiment-name",
            "kronos-project",
            "-P",
            "demo=true",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    version = client.get_model_version_by_alias("kronos", "challenger")
    assert version.version in (1, "1") and version.tags["kronos.demo"] == "true"
    log_run = client.get_run(version.run_id)  # in our experiment, linked to the project run
    project_run = client.get_run(log_run.data.tags["kronos.mlproject_run_id"])
    assert project_run.info.experiment_id == client.get_experiment_by_name("kronos-project").experiment_id
    assert project_run.data.tags["kronos.run.log-demo"] == log_run.info.run_id
    assert log_run.info.artifact_uri.startswith(Path(uri.removeprefix("sqlite:///")).parent.as_uri())
