"""Load the Kronos pyfunc from an MLflow URI, with aliases resolved to a concrete version,
through the local model cache, and with or without the registry.

`models:/kronos@champion` is turned into `models:/kronos/<n>` before loading, so the
server knows (and reports) exactly which version it serves, and alias polling can tell
when the alias moved. Registry versions are loaded from `serving.model_cache` (downloaded
there once), so a restarted worker needs the registry only to learn where the alias points:

    apply_registry_limits(settings.registry_limits)    # before the first registry call
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

import logging
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import mlflow
import requests
import urllib3
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from model_package.forecaster import KronosForecaster
from model_package.settings import ModelSettings

from .model_cache import ModelCache, VersionIdentity, redact_uri, utc_text
from .settings import RegistryLimits

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
MAX_CAUSE_CHARS = 300
# Failures under MLflow's wrapper that mean the registry did not answer: the socket layer,
# requests and urllib3 (connection, timeout, retries used up on 429/5xx answers), and a
# database registry's driver (by name: SQLAlchemy is not imported for an HTTP registry).
_NO_ANSWER = (
    ConnectionError,
    TimeoutError,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.RetryError,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
)
_DATABASE_ERRORS = ("sqlalchemy.exc.OperationalError", "sqlalchemy.exc.InterfaceError")


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


class RegistryObserver(Protocol):
    def registry_checked(self, ok: bool, reachable: bool) -> None: ...


class RegistryHealth:
    """Whether the registry answers, from the outcome of every check of one worker: each
    is counted (`observer`); one WARNING when checks start failing, one INFO when one
    succeeds again (outage length, failed checks), nothing for the checks in between."""

    def __init__(self, observer: RegistryObserver, logger: logging.Logger) -> None:
        self.observer = observer
        self.logger = logger
        self.ok_checks = 0
        self.failed_checks = 0
        self.failing_since: float | None = None  # time.monotonic() of the first failed check
        self.failed_in_row = 0

    def ok(self) -> tuple[float, int] | None:
        """Count a check that got its answer; when it ends a run of failures, log it and
        return (seconds since the first failure, failed checks)."""
        self.ok_checks += 1
        self.observer.registry_checked(True, True)
        if self.failing_since is None:
            return None
        outage = (time.monotonic() - self.failing_since, self.failed_in_row)
        self.failing_since, self.failed_in_row = None, 0
        self.logger.info(
            "registry %s answers again after %.1f s (%d failed checks)", registry_uri(), outage[0], outage[1]
        )
        return outage

    def failed(self, cause: str, *, reachable: bool, consequence: str | None) -> bool:
        """Count a failed check (`reachable`: the registry answered, with an error); the
        first of a run logs one WARNING with the cause and `consequence` (what is served;
        None: the caller says it). True for that first one."""
        self.failed_checks += 1
        self.failed_in_row += 1
        self.observer.registry_checked(False, reachable)
        if self.failing_since is not None:
            return False
        self.failing_since = time.monotonic()
        if consequence is not None:
            head = "registry check failed" if reachable else "registry unreachable"
            self.logger.warning("%s (%s); %s", head, cause, consequence)
        return True


def apply_registry_limits(limits: RegistryLimits) -> dict[str, str]:
    """Bound every MLflow registry request of this process: set MLflow's HTTP variables,
    overriding whatever the environment had (ours win). MLflow 3.17 reads them on every
    request (`mlflow.utils.rest_utils.http_request`; its session cache is keyed by the
    values), so this works at any time; the server calls it before its first registry call.
    Retries are immediate and a Retry-After header is not waited for, so one request takes
    at most `limits.check_s` seconds. Returns the variables set."""
    values = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(limits.timeout_s),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(limits.retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
        "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
    }
    os.environ.update(values)
    return values


def open_cache(root: Path, keep: int) -> ModelCache:
    """The model cache of the registry this process reads (OSError when `root` is unusable)."""
    return ModelCache(root, mlflow.get_registry_uri(), keep)


def is_registry_uri(uri: str) -> bool:
    """`models:/name@alias` or `models:/name/<n>`."""
    return _REGISTRY_URI.match(uri) is not None


def registry_uri() -> str:
    """The registry this process reads, without credentials (for logs)."""
    return redact_uri(mlflow.get_registry_uri())


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions behind it (causes, contexts, urllib3's `reason`)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        reason = getattr(current, "reason", None)
        current = current.__cause__ or current.__context__ or (reason if isinstance(reason, BaseException) else None)
    return seen


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line, shortened to MAX_CAUSE_CHARS."""
    text = " ".join(str(exc).split()) or "no message"
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= MAX_CAUSE_CHARS else text[: MAX_CAUSE_CHARS - 3] + "..."


def unreachable_cause(exc: BaseException) -> str | None:
    """The registry failure behind `exc` in one line (connection refused or reset, timeout,
    HTTP 5xx), or None when the registry answered (e.g. 404 "alias not found")."""
    chain = _chain(exc)
    no_answer = [
        e for e in chain if isinstance(e, _NO_ANSWER) or f"{type(e).__module__}.{type(e).__name__}" in _DATABASE_ERRORS
    ]
    if no_answer:
        # urllib3's own errors say what failed (most name the host); the socket's the errno
        named = [e for e in no_answer if isinstance(e, urllib3.exceptions.HTTPError) and not _is_max_retry(e)]
        cause = one_line(named[-1] if named else no_answer[0])
        pools = [pool for e in chain if _is_max_retry(e) and (pool := getattr(e, "pool", None)) is not None]
        if "host=" not in cause and pools:  # e.g. "too many 503 error responses"
            cause += f" from {pools[0].scheme}://{pools[0].host}:{pools[0].port}"
        return cause
    for e in chain:
        if _http_status(e) >= 500:
            return one_line(e)
    return None


def _is_max_retry(exc: BaseException) -> bool:
    return isinstance(exc, urllib3.exceptions.MaxRetryError)


def _http_status(exc: BaseException) -> int:
    """The HTTP status an exception carries (0 when none)."""
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code()
    response = exc.response if isinstance(exc, requests.exceptions.HTTPError) else None
    return response.status_code if response is not None else 0


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
