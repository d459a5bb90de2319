"""Which model a job runs, and the forecaster each Python worker loads once.

The driver pins the model URI to one registry version before any work starts
(`models:/kronos@champion` -> `models:/kronos/7`), so every worker forecasts with the same
weights even if the alias moves mid-job, and the output says which version it was.
Workers load that URI through the registry (`mlflow.pyfunc.load_model`) the first time a
task of the job runs in them, and keep it for the worker's life (Spark reuses its Python
workers between tasks).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient

from model_package.forecaster import KronosForecaster

_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+|latest)$", re.IGNORECASE)


@dataclass(frozen=True)
class PinnedModel:
    """A model URI as the job will load it.

    `load_uri` names one registry version when `requested` is a registry URI (alias,
    version or `latest`); any other MLflow URI (runs:/, models:/<model id>, a path) is
    loaded as given. `version` is the registry version ("7"), else the URI itself."""

    requested: str
    load_uri: str
    version: str
    tracking_uri: str
    registry_uri: str


def pin_model(uri: str, client: MlflowClient | None = None) -> PinnedModel:
    """Resolve `uri` against the registry (raises MlflowException when it names nothing)."""
    client = client or MlflowClient()
    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    alias = _ALIAS_URI.match(uri)
    numbered = _VERSION_URI.match(uri)
    if alias:
        name = alias["name"]
        version = client.get_model_version_by_alias(name, alias["alias"]).version
    elif numbered and numbered["version"].lower() == "latest":
        name = numbered["name"]
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise mlflow.MlflowException(f"registered model {name!r} has no versions")
        version = str(max(int(v.version) for v in versions))
    elif numbered:
        name, version = numbered["name"], numbered["version"]
        client.get_model_version(name, version)  # exists
    else:
        return PinnedModel(uri, uri, uri, tracking, registry)
    return PinnedModel(uri, f"models:/{name}/{version}", str(version), tracking, registry)


_LOADED: dict[str, KronosForecaster] = {}
_LOCK = threading.Lock()


def worker_forecaster(model: PinnedModel, torch_threads: int = 0) -> KronosForecaster:
    """The forecaster of `model` in this Python process, loaded on first use.

    `torch_threads` > 0 sets torch's intra-op threads (a local master runs several workers
    on the same cores)."""
    with _LOCK:
        forecaster = _LOADED.get(model.load_uri)
        if forecaster is None:
            if torch_threads > 0:
                import torch

                torch.set_num_threads(torch_threads)
            mlflow.set_tracking_uri(model.tracking_uri)
            mlflow.set_registry_uri(model.registry_uri)
            python_model = mlflow.pyfunc.load_model(model.load_uri).unwrap_python_model()
            forecaster = getattr(python_model, "forecaster", None)
            # duck-typed: MLflow may import the logged copy of model_package (code_paths)
            if forecaster is None or not hasattr(forecaster, "prepare"):
                raise TypeError(f"{model.requested} is not a Kronos pyfunc (got {type(python_model).__name__})")
            _LOADED[model.load_uri] = forecaster
        return forecaster
