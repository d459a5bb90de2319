"""Where the registry is and how to talk to it: tracking URI, client, reachability,
experiments, and turning `champion` / `3` / `v3` into a model version."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from .errors import NotFoundError, UnreachableError

ROOT = Path(__file__).resolve().parents[1]
# The same embedded registry `make serve` (python -m serving) uses: under $KRONOS_STATE_DIR,
# by default the checkout's .state/.
DEFAULT_STATE_DIR = ROOT / ".state"
DEFAULT_MODEL_NAME = "kronos"
CHAMPION = "champion"
CHALLENGER = "challenger"
LOG_EXPERIMENT = "kronos-serving"
EVAL_EXPERIMENT = "kronos-evaluation"
HEALTH_TIMEOUT_S = 5.0
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
MISSING_CODES = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def default_model_name() -> str:
    """The registered model name: $KRONOS_REGISTERED_MODEL or `kronos`."""
    return os.environ.get("KRONOS_REGISTERED_MODEL") or DEFAULT_MODEL_NAME


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, or the sqlite file of `make serve`'s embedded registry,
    `<KRONOS_STATE_DIR>/mlflow/mlflow.db` (absolute, so CWD never matters afterwards)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    database = default_database()
    database.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{database}"


def default_database() -> Path:
    """The embedded registry's sqlite file ($KRONOS_STATE_DIR: relative to the current
    directory, as `python -m serving` reads it)."""
    state = os.environ.get("KRONOS_STATE_DIR") or DEFAULT_STATE_DIR
    return Path(state).expanduser().resolve() / "mlflow" / "mlflow.db"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI, else None."""
    if not uri.startswith("sqlite:") or ":///" not in uri:
        return None
    return Path(uri.split(":///", 1)[1])


def artifact_root(uri: str) -> str | None:
    """Artifact location for new experiments: $KRONOS_ARTIFACT_ROOT, or `artifacts/` beside
    a sqlite file; None lets a tracking server decide (proxied `mlflow-artifacts:`)."""
    explicit = os.environ.get("KRONOS_ARTIFACT_ROOT")
    if explicit:
        return explicit if "://" in explicit else Path(explicit).expanduser().resolve().as_uri()
    db = sqlite_path(uri)
    return (db.resolve().parent / "artifacts").as_uri() if db is not None else None


def check_reachable(uri: str) -> None:
    """Fail fast (exit 4) when the registry cannot be reached, instead of long retries."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S)
        except requests.RequestException as exc:
            raise UnreachableError(f"registry unreachable at {uri} ({type(exc).__name__})") from None
        if response.status_code >= 500:
            raise UnreachableError(f"registry unhealthy at {uri} (HTTP {response.status_code})")
        return
    database = scheme.split("+", 1)[0]
    parsed = urlparse(uri)
    if database in DB_PORTS and parsed.hostname:  # MLflow itself retries for ~100 s
        try:
            socket.create_connection(
                (parsed.hostname, parsed.port or DB_PORTS[database]), timeout=HEALTH_TIMEOUT_S
            ).close()
        except OSError as exc:
            raise UnreachableError(
                f"registry database unreachable at {parsed.hostname}:"
                f"{parsed.port or DB_PORTS[database]} ({type(exc).__name__})"
            ) from None
        return
    db = sqlite_path(uri)
    if db is not None and not db.parent.is_dir():
        raise UnreachableError(f"registry unreachable: directory {db.parent} does not exist")


@dataclass
class Registry:
    """A connected registry and the registered model this CLI works on."""

    uri: str
    client: MlflowClient
    model_name: str

    def model_exists(self) -> bool:
        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException as exc:
            if exc.error_code in MISSING_CODES:
                return False
            raise
        return True

    def require_model(self) -> None:
        if not self.model_exists():
            raise NotFoundError(f"registered model {self.model_name!r} not found at {self.uri}")

    def alias_version(self, alias: str) -> str | None:
        """The version an alias points at, as a string (int on sqlite, str over HTTP), or None."""
        if not self.model_exists():
            return None
        aliases = self.client.get_registered_model(self.model_name).aliases or {}
        version = aliases.get(alias)
        return str(version) if version is not None else None

    def resolve(self, ref: str) -> ModelVersion:
        """`champion`, `@champion`, `3` or `v3` -> that model version (NotFoundError otherwise)."""
        self.require_model()
        ref = str(ref).strip().lstrip("@")
        number = ref[1:] if ref[:1] in ("v", "V") and ref[1:].isdigit() else ref
        try:
            if number.isdigit():
                return self.client.get_model_version(self.model_name, number)
            return self.client.get_model_version_by_alias(self.model_name, ref)
        except MlflowException as exc:
            if exc.error_code in MISSING_CODES:
                kind = "version" if number.isdigit() else "alias"
                raise NotFoundError(f"unknown {kind} {ref!r} of model {self.model_name!r}") from None
            raise

    def versions(self) -> list[ModelVersion]:
        """All versions of the model, oldest first."""
        found = self.client.search_model_versions(f"name='{self.model_name}'")
        return sorted(found, key=lambda v: int(v.version))

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created with a CWD-independent artifact root."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(name, artifact_location=artifact_root(self.uri))


@contextmanager
def start_run(registry: Registry, experiment: str, run_name: str) -> Iterator[mlflow.ActiveRun]:
    """A run in our own `experiment` (its artifact root never depends on the CWD). Under
    `mlflow run` (MLFLOW_RUN_ID set) the two runs point at each other with tags."""
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)  # else start_run would resume it
    try:
        with mlflow.start_run(experiment_id=registry.experiment_id(experiment), run_name=run_name) as run:
            if project_run:
                mlflow.set_tag("kronos.mlproject_run_id", project_run)
                registry.client.set_tag(project_run, f"kronos.run.{run_name}", run.info.run_id)
            yield run
    finally:
        if project_run:
            os.environ["MLFLOW_RUN_ID"] = project_run


def connect(model_name: str | None = None) -> Registry:
    """Point MLflow at the registry (checked reachable) and return a Registry handle."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return Registry(uri, client, model_name or default_model_name())
