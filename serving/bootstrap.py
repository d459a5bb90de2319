"""Make sure the registry has a `champion` to serve (used by `make serve`).

Order: keep an existing champion; otherwise log `NeoQuasar/Kronos-small` from the hub (or
the local Hugging Face cache); when that is unreachable, log **random demo weights** of
the same shape with a loud warning, so that the stack still comes up offline.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from model_package.kronos import write_random_checkpoint
from model_package.kronos.presets import preset_by_name
from model_package.log_model import log_kronos_model

logger = logging.getLogger("kronos.bootstrap")

HUB_MODEL = "NeoQuasar/Kronos-small"
EXPERIMENT = "kronos-serving"
DEMO_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! WARNING: the Hugging Face hub is unreachable ({error}).
!! Registering RANDOM DEMO WEIGHTS (Kronos-small shape) as {name}@champion.
!! Its forecasts are meaningless. Register real weights with
!!   kronos-registry log NeoQuasar/Kronos-small   (or log_kronos_model) and promote them.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def champion_version(client: MlflowClient, name: str, alias: str = "champion") -> str | None:
    """The version `alias` points at, or None when the model or alias does not exist."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def ensure_champion(tracking_uri: str, artifact_root: Path, name: str = "kronos") -> str:
    """Return the champion version, registering one first when there is none."""
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = champion_version(client, name)
    if version is not None:
        logger.info("serving %s@champion = version %s", name, version)
        return version
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:  # a local registry keeps its artifacts beside it; a tracking server picks its own
        local = tracking_uri.startswith("sqlite:")
        experiment_id = client.create_experiment(
            EXPERIMENT, artifact_location=artifact_root.as_uri() if local else None
        )
    with mlflow.start_run(experiment_id=experiment_id, run_name="bootstrap-champion"):
        try:
            info = log_kronos_model(None, HUB_MODEL, registered_model_name=name, tags={"kronos.weights": "hub"})
        except Exception as exc:  # offline, hub error, no cache
            print(
                DEMO_WARNING.format(error=f"{type(exc).__name__}: {exc}"[:200], name=name), file=sys.stderr, flush=True
            )
            info = _log_demo(name)
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, "champion", version)
    client.set_model_version_tag(name, version, "kronos.bootstrap", "make serve")
    return version


def _log_demo(name: str) -> mlflow.models.model.ModelInfo:
    preset = preset_by_name(HUB_MODEL)
    assert preset is not None
    with tempfile.TemporaryDirectory(prefix="kronos-demo-") as tmp:
        tokenizer = write_random_checkpoint(preset.tokenizer_config, Path(tmp) / "tokenizer", 1)
        model = write_random_checkpoint(preset.model_config, Path(tmp) / "model", 2)
        return log_kronos_model(
            tokenizer,
            model,
            registered_model_name=name,
            max_context=preset.max_context,
            tags={"kronos.weights": "random-demo"},
        )
