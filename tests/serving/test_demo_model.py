"""The shipped trained demo model replaces random weights outside the tests: `make serve`'s
bootstrap registers it when the hub is unreachable, and the load tools' registries
(`serving.local_server.register_model`, default of soak and compare) serve it.

Both check the registered version byte for byte against the safetensors files on disk
(model_package/demo_weights), in throwaway sqlite registries.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from model_package.demo import DEMO_MAX_CONTEXT, demo_checkpoints
from model_package.pyfunc import MODEL_ARTIFACT, TOKENIZER_ARTIFACT
from serving.local_server import MODEL_NAME, ROOT, register_model


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_digests() -> dict[str, str]:
    """sha256 of the shipped tokenizer and predictor weights, by pyfunc artifact name."""
    tokenizer_dir, model_dir = demo_checkpoints()
    return {
        TOKENIZER_ARTIFACT: sha256(tokenizer_dir / "model.safetensors"),
        MODEL_ARTIFACT: sha256(model_dir / "model.safetensors"),
    }


def download(uri: str, version: str, path: str, workdir: Path) -> Path:
    """One file of a registered version's model directory, downloaded into `workdir`."""
    root = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri(MODEL_NAME, version)
    workdir.mkdir(parents=True, exist_ok=True)
    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{path}", dst_path=str(workdir), tracking_uri=uri)
    )


def assert_shipped_demo(uri: str, version: str, workdir: Path) -> None:
    """The version is tagged as the demo model, carries the shipped weights byte for byte
    (its pyfunc artifacts, not the package copy in its code) and the demo's context."""
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(MODEL_NAME, version).tags
    assert tags["kronos.weights"] == "demo-trained"
    assert tags["kronos.demo"] == "true"
    registered = {
        name: sha256(download(uri, version, f"artifacts/{name}/model.safetensors", workdir / name))
        for name in (TOKENIZER_ARTIFACT, MODEL_ARTIFACT)
    }
    assert registered == shipped_digests()
    mlmodel = yaml.safe_load(download(uri, version, "MLmodel", workdir / "mlmodel").read_text())
    assert mlmodel["metadata"]["max_context"] == DEMO_MAX_CONTEXT


@pytest.mark.integration
def test_offline_bootstrap_registers_the_shipped_demo_model(tmp_path: Path) -> None:
    """`python -m serving`'s bootstrap with the hub off and an empty Hugging Face cache."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HF_", "KRONOS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(ROOT))
    script = (
        "import logging, sys; from pathlib import Path; from serving.bootstrap import ensure_champion;"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s');"
        "print('champion', ensure_champion(sys.argv[1], Path(sys.argv[2])))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, uri, str(tmp_path / "artifacts")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split()[-2:] == ["champion", "1"]
    assert "model_package/demo_weights/MODEL_CARD.md" in done.stderr
    assert "RANDOM" not in done.stderr
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    assert_shipped_demo(uri, "1", tmp_path / "download")
    assert client.get_model_version(MODEL_NAME, "1").tags["kronos.bootstrap"] == "make serve"


@pytest.mark.integration
def test_load_tool_registries_serve_the_shipped_demo_model_by_default(tmp_path: Path) -> None:
    """`register_model(workdir)` (soak's and compare's default, `--preset` unset)."""
    registry, tokenizer_dir, model_dir = register_model(tmp_path / "registry", experiment="kronos-loadtest")
    assert (tokenizer_dir, model_dir) == demo_checkpoints()
    version = str(registry.client().get_model_version_by_alias(MODEL_NAME, "champion").version)
    assert_shipped_demo(registry.tracking_uri, version, tmp_path / "download")
