"""Helpers of the pyfunc tests: the registry record and clean child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mlflow.models.model import ModelInfo

from serving.local_server import LocalRegistry

MODEL_NAME = "kronos"
TINY_MAX_CONTEXT = 128
SUBPROCESS_TIMEOUT_S = 300


@dataclass(frozen=True)
class Registry(LocalRegistry):
    """A sqlite registry in a temp dir with one logged and registered Kronos version."""

    info: ModelInfo


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: no PYTHONPATH, CPU only, this venv's scripts
    first on PATH (mlflow runs `uvicorn` by name), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({"KRONOS_DEVICE": "cpu", "OMP_NUM_THREADS": "2", **extra})
    return env


def run_python(code: str, cwd: Path, env: dict[str, str], isolated: bool = False) -> dict:
    """Run `code` with this venv's Python in `cwd`; it prints one JSON object last."""
    args = [sys.executable, *(["-I"] if isolated else []), "-c", code]
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"child failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])
