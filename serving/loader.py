"""Load the Kronos pyfunc from an MLflow URI, with aliases resolved to a concrete version.

`models:/kronos@champion` is turned into `models:/kronos/<n>` before loading, so the
server knows (and reports) exactly which version it serves, and alias polling can tell
when the alias moved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient

from model_package.forecaster import KronosForecaster
from model_package.settings import ModelSettings

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ResolvedUri:
    """What a model URI points at: the URI to load and its registry version (if any)."""

    requested: str
    load_uri: str
    version: str  # registry version number, or "unregistered"
    name: str | None = None
    alias: str | None = None


@dataclass
class LoadedModel:
    """A loaded Kronos pyfunc and where it came from."""

    source: ResolvedUri
    forecaster: KronosForecaster
    settings: ModelSettings

    @property
    def version(self) -> str:
        return self.source.version


def resolve_uri(uri: str, client: MlflowClient | None = None) -> ResolvedUri:
    """`models:/name@alias` -> `models:/name/<version>`; `models:/name/<n>` keeps <n>;
    any other URI (runs:/, a path) loads as is and reports "unregistered"."""
    match = _REGISTRY_URI.match(uri)
    if match is None:
        return ResolvedUri(uri, uri, "unregistered")
    name, alias = match["name"], match["alias"]
    if alias is None:
        return ResolvedUri(uri, uri, match["version"], name)
    version = str((client or MlflowClient()).get_model_version_by_alias(name, alias).version)
    return ResolvedUri(uri, f"models:/{name}/{version}", version, name, alias)


def load_model(source: ResolvedUri) -> LoadedModel:
    """Load the pyfunc and take its forecaster and settings (blocking: run in a thread)."""
    pyfunc = mlflow.pyfunc.load_model(source.load_uri)
    python_model = pyfunc.unwrap_python_model()
    # duck-typed: MLflow may import the logged copy of model_package (code_paths)
    if not hasattr(python_model, "forecaster") or not hasattr(python_model, "settings"):
        raise TypeError(f"{source.requested} is not a Kronos pyfunc (got {type(python_model).__name__})")
    return LoadedModel(source, python_model.forecaster, python_model.settings)
