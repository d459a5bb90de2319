"""Load the Kronos pyfunc from an MLflow URI, with aliases resolved to a concrete version,
through the local model cache, and with or without the registry.

`models:/kronos@champion` is turned into `models:/kronos/<n>` before loading, so the
server knows (and reports) exactly which version it serves, and alias polling can tell
when the alias moved. Registry versions are loaded from `serving.model_cache` (downloaded
there once), so a restarted worker needs the registry only to learn where the alias points:

    apply_registry_limits(settings.registry_limits)    # serving.registry_health: first
    source = locate("models:/kronos@champion", cache)  # registry answers: download if new
    source.offline                                     # None, or why the cache was used
    loaded = load_model(source)
    remember(loaded.source, cache)                     # alias record, eviction

When the registry does not answer (connection refused or reset, timeout, HTTP 5xx), the
alias' last recorded version is served from the cache (`source.offline` says why); an
answer such as "alias not found" stays an error, and so does an outage without a cached
copy (`RegistryUnavailableError`, one line).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from model_package.forecaster import KronosForecaster
from model_package.settings import ModelSettings

from .model_cache import ModelCache, VersionIdentity, utc_text
from .registry_health import registry_uri, unreachable_cause

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class RegistryUnavailableError(RuntimeError):
    """The registry does not answer and the local cache has no copy of what was asked."""


@dataclass(frozen=True)
class Offline:
    """Why a version was taken from the cache without the registry's word on it."""

    cause: str  # the registry failure, one line
    resolved_at: float | None  # when the registry last confirmed the alias (unix s); None: a version URI

    @property
    def description(self) -> str:
        return f"resolved at {utc_text(self.resolved_at)}" if self.resolved_at is not None else "cached version"


@dataclass(frozen=True)
class ResolvedUri:
    """What a model URI points at: what to load (a URI or a cached model folder) and its
    registry version (if any)."""

    requested: str
    load_uri: str
    version: str  # registry version number, or "unregistered"
    name: str | None = None
    alias: str | None = None
    identity: VersionIdentity | None = None  # the registry's word on the version
    offline: Offline | None = None  # set when the registry did not answer


@dataclass
class LoadedModel:
    """A loaded Kronos pyfunc and where it came from."""

    source: ResolvedUri
    forecaster: KronosForecaster
    settings: ModelSettings

    @property
    def version(self) -> str:
        return self.source.version


def open_cache(root: Path, keep: int) -> ModelCache:
    """The model cache of the registry this process reads (OSError when `root` is unusable)."""
    return ModelCache(root, mlflow.get_registry_uri(), keep)


def is_registry_uri(uri: str) -> bool:
    """`models:/name@alias` or `models:/name/<n>`."""
    return _REGISTRY_URI.match(uri) is not None


def resolve_uri(uri: str, client: MlflowClient | None = None) -> ResolvedUri:
    """`models:/name@alias` -> `models:/name/<version>` (one registry call); `models:/name/<n>`
    keeps <n> (no call); any other URI (runs:/, a path) loads as is and reports
    "unregistered"."""
    match = _REGISTRY_URI.match(uri)
    if match is None:
        return ResolvedUri(uri, uri, "unregistered")
    name, alias = match["name"], match["alias"]
    if alias is None:
        return ResolvedUri(uri, uri, match["version"], name)
    model_version = (client or MlflowClient()).get_model_version_by_alias(name, alias)
    version = str(model_version.version)
    return ResolvedUri(uri, f"models:/{name}/{version}", version, name, alias, version_identity(model_version))


def version_identity(model_version: object) -> VersionIdentity:
    """What a registry `ModelVersion` is: its source and creation time."""
    return VersionIdentity(str(model_version.source), int(model_version.creation_timestamp or 0))  # type: ignore[attr-defined]


def fetch(source: ResolvedUri, cache: ModelCache, client: MlflowClient | None = None) -> ResolvedUri:
    """`source` loading from its cached copy, downloaded first when the cache has none (or
    another model under the same number). Asks the registry what the version is when
    `source` does not say (a `models:/name/<n>` URI)."""
    if source.name is None:
        return source
    client = client or MlflowClient()
    identity = source.identity or version_identity(client.get_model_version(source.name, source.version))
    path = cache.version_path(source.name, source.version, identity)
    if path is None:
        artifact_uri = f"models:/{source.name}/{source.version}"
        path = cache.store(
            source.name,
            source.version,
            identity,
            lambda dst: mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst)),
        )
    return replace(source, load_uri=str(path), identity=identity)


def cached_source(uri: str, cache: ModelCache, cause: str) -> ResolvedUri:
    """What the cache serves for `uri` while the registry is unreachable (`cause`): the
    alias' last recorded version, or the version the URI names; RegistryUnavailableError
    when the cache has no copy of it."""
    match = _REGISTRY_URI.match(uri)
    assert match is not None, uri
    name, alias = match["name"], match["alias"]
    record = cache.alias_record(name, alias) if alias is not None else None
    version = record.version if record is not None else match["version"]
    path = cache.version_path(name, version) if version is not None else None
    if path is None:
        raise RegistryUnavailableError(
            f"registry {registry_uri()} unreachable ({cause}) and no cached copy of {uri} in {cache.root}"
        )
    offline = Offline(cause, record.resolved_at if record is not None else None)
    return ResolvedUri(uri, str(path), version, name, alias, cache.identity(name, version), offline)


def locate(uri: str, cache: ModelCache | None, client: MlflowClient | None = None) -> ResolvedUri:
    """Resolve `uri` with the registry and make sure its version is in `cache`; when the
    registry does not answer, what `cached_source` serves. Without a cache (or for URIs
    outside the registry) it is `resolve_uri`: MLflow then downloads at load."""
    if cache is None or _REGISTRY_URI.match(uri) is None:
        return resolve_uri(uri, client)
    try:
        return fetch(resolve_uri(uri, client), cache, client)
    except Exception as exc:
        cause = unreachable_cause(exc)
        if cause is None:
            raise
        return cached_source(uri, cache, cause)


def remember(source: ResolvedUri, cache: ModelCache | None) -> None:
    """After a load the registry vouched for: record the alias' version (now) and evict
    the cache's oldest versions of the model."""
    if cache is None or source.name is None or source.offline is not None:
        return
    if source.alias is not None:
        cache.record_alias(source.name, source.alias, source.version, time.time())
    cache.evict(source.name)


def load_model(source: ResolvedUri) -> LoadedModel:
    """Load the pyfunc and take its forecaster and settings (blocking: run in a thread)."""
    pyfunc = mlflow.pyfunc.load_model(source.load_uri)
    python_model = pyfunc.unwrap_python_model()
    # duck-typed: MLflow may import the logged copy of model_package (code_paths)
    if not hasattr(python_model, "forecaster") or not hasattr(python_model, "settings"):
        raise TypeError(f"{source.requested} is not a Kronos pyfunc (got {type(python_model).__name__})")
    return LoadedModel(source, python_model.forecaster, python_model.settings)
