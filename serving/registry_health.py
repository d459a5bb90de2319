"""Whether the model registry answers, and how long the server waits for it.

- `apply_registry_limits`: every MLflow registry request of this process bounded (timeout,
  immediate retries), sized by `ServingSettings.registry_limits`.
- `unreachable_cause`: a failure in one line when the registry did not answer (refused or
  reset connection, timeout, HTTP 5xx, a database registry's driver error), None when it
  answered (e.g. "alias not found").
- `RegistryHealth`: every check counted, one WARNING when checks start failing and one
  INFO when the registry answers again.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Protocol

import mlflow
import requests
import urllib3
from mlflow.exceptions import MlflowException

from .model_cache import redact_uri
from .settings import RegistryLimits

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
