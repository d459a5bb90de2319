"""Make sure the registry has a `champion` to serve (used by `make serve`).

Order: keep an existing champion; otherwise log `NeoQuasar/Kronos-small` from the hub (or
the local Hugging Face cache); when that is unreachable, log the **trained demo model**
that ships with the package (`model_package.demo`: a small Kronos trained on S&P 500 and
NASDAQ daily candles, see model_package/demo_weights/MODEL_CARD.md), tagged
`kronos.weights=demo-trained` and `kronos.demo=true`, so that the stack still comes up
offline with a model whose forecasts are real forecasts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from model_package.demo import DEMO_DIR, DEMO_MAX_CONTEXT, DEMO_SOURCE, demo_checkpoints
from model_package.log_model import log_kronos_model

logger = logging.getLogger("kronos.bootstrap")

HUB_MODEL = "NeoQuasar/Kronos-small"
EXPERIMENT = "kronos-serving"
DEMO_CARD = DEMO_DIR / "MODEL_CARD.md"
# The model version tags of the offline fallback (and of `serving.local_server`'s demo
# registries): how to recognise the shipped demo model in the registry.
DEMO_TAGS = {"kronos.weights": "demo-trained", "kronos.demo": "true", "kronos.weights.source": DEMO_SOURCE}
HUB_TAGS = {"kronos.weights": "hub", "kronos.demo": "false"}


def champion_version(client: MlflowClient, name: str, alias: str = "champion") -> str | None:
    """The version `alias` points at, or None when the model or alias does not exist."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (a checkout), else
    absolute (an installed package)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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
            info = log_kronos_model(None, HUB_MODEL, registered_model_name=name, tags=HUB_TAGS)
            tags = HUB_TAGS
        except Exception as exc:  # offline, hub error, no cache
            logger.warning(
                "%s is not available (%s); registering the shipped demo model instead: a small Kronos "
                "trained on S&P 500 and NASDAQ daily candles, context %d (model card: %s). For the "
                "published model: kronos-registry log %s --promote",
                HUB_MODEL,
                f"{type(exc).__name__}: {exc}"[:200],
                DEMO_MAX_CONTEXT,
                shown_path(DEMO_CARD),
                HUB_MODEL,
            )
            info = log_demo(name)
            tags = DEMO_TAGS
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, "champion", version)
    for key, value in {**tags, "kronos.bootstrap": "make serve"}.items():
        client.set_model_version_tag(name, version, key, value)
    logger.info("registered %s version %s (%s) as %s@champion", name, version, tags["kronos.weights"], name)
    return version


def log_demo(name: str) -> mlflow.models.model.ModelInfo:
    """Log and register the shipped demo pair (in the active run) as a version of `name`."""
    tokenizer, model = demo_checkpoints()  # FileNotFoundError naming `make demo-model`
    return log_kronos_model(tokenizer, model, registered_model_name=name, max_context=DEMO_MAX_CONTEXT, tags=DEMO_TAGS)
