"""Fixtures of the pyfunc tests: a fresh sqlite registry holding the tiny Kronos as
`kronos` version 1 (alias `champion`), and helpers to run Python in a clean subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.models.model import ModelInfo

from model_package.log_model import log_kronos_model

MODEL_NAME = "kronos"
TINY_MAX_CONTEXT = 128
SUBPROCESS_TIMEOUT_S = 300


@dataclass
class Registry:
    """A sqlite registry in a temp dir with one logged and registered Kronos version."""

    tracking_uri: str
    root: Path
    info: ModelInfo


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory,
             tiny_checkpoints: tuple[Path, Path]) -> Registry:
    """Log the tiny checkpoint pair as `kronos` v1 with alias `champion`.

    Artifacts go to the temp dir (not ./mlruns); the global tracking URI is restored after.
    """
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.create_experiment("kronos-pyfunc-tests",
                                              artifact_location=(root / "artifacts").as_uri())
        tokenizer_dir, model_dir = tiny_checkpoints
        with mlflow.start_run(experiment_id=experiment):
            info = log_kronos_model(tokenizer_dir, model_dir, registered_model_name=MODEL_NAME,
                                    max_context=TINY_MAX_CONTEXT)
        client.set_registered_model_alias(MODEL_NAME, "champion", info.registered_model_version)
        yield Registry(uri, root, info)
    finally:
        mlflow.set_tracking_uri(previous)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: no PYTHONPATH, CPU only, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update({"KRONOS_DEVICE": "cpu", "OMP_NUM_THREADS": "2", **extra})
    return env


def run_python(code: str, cwd: Path, env: dict[str, str], isolated: bool = False) -> dict:
    """Run `code` with this venv's Python in `cwd`; it prints one JSON object last."""
    args = [sys.executable, *(["-I"] if isolated else []), "-c", code]
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"child failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_frame(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)
