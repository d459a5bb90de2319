"""Status codes and error bodies: what MLServer 1.7.1 answers, made to match our contract.

- gRPC: MLServer maps only 400/404/422/500 to gRPC codes (others become UNKNOWN); add
  503 -> UNAVAILABLE, 504 -> DEADLINE_EXCEEDED, 408 -> DEADLINE_EXCEEDED,
  413 -> RESOURCE_EXHAUSTED.
- REST: every 503 gets `Retry-After`, so that clients and gateways back off.
- REST: a body FastAPI cannot read (malformed JSON, not an object, a field of the wrong
  type) is a 400 in the project's error shape `{"error": "<field>: <rule>"}`, not
  FastAPI's 422 with its own shape.
- Logs: one WARNING line with the request id for every client-side answer (4xx, 503, 504),
  no traceback: the runtime logs the requests it handled (MLServer's duplicate of that line
  is dropped), and the answers MLServer gives itself (an unknown model, an unreadable body
  or gRPC field) are logged here. Real failures keep their traceback.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import mlserver.grpc.utils as grpc_utils
import mlserver.rest.errors as rest_errors
from fastapi import Request, status
from fastapi.exceptions import RequestValidationError
from mlserver.errors import MLServerError

RETRY_AFTER_HEADER = "Retry-After"
MAX_DETAIL_CHARS = 300
logger = logging.getLogger("kronos.serving.answers")
_PATCHED = "__kronos_patched__"
_retry_after_s = 2


def install(retry_after_s: int) -> None:
    """Install the additions (safe to call any number of times; the last Retry-After wins)."""
    global _retry_after_s
    _retry_after_s = retry_after_s
    for http_status, code in (
        (status.HTTP_503_SERVICE_UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (status.HTTP_504_GATEWAY_TIMEOUT, grpc.StatusCode.DEADLINE_EXCEEDED),
        (status.HTTP_408_REQUEST_TIMEOUT, grpc.StatusCode.DEADLINE_EXCEEDED),
        (status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ):
        grpc_utils.STATUS_CODE_MAPPING.setdefault(http_status, code)
    rest_errors._EXCEPTION_HANDLERS[RequestValidationError] = bad_request_body  # noqa: SLF001
    rest_errors._EXCEPTION_HANDLERS[MLServerError] = mlserver_error  # noqa: SLF001
    for name in ("mlserver", "mlserver.grpc", "mlserver.rest", "mlserver.parallel"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
            logger.addFilter(ClientErrorFilter())
    base = rest_errors.Response
    if getattr(base, _PATCHED, False):
        return

    class RetryAfterResponse(base):  # type: ignore[misc, valid-type]
        """MLServer's JSON response, plus Retry-After on 503."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.status_code == status.HTTP_503_SERVICE_UNAVAILABLE:
                self.headers[RETRY_AFTER_HEADER] = str(_retry_after_s)

    setattr(RetryAfterResponse, _PATCHED, True)
    rest_errors.Response = RetryAfterResponse


def retry_after_s() -> int:
    """The Retry-After (seconds) every 503 carries."""
    return _retry_after_s


def validation_message(exc: RequestValidationError) -> str:
    """`<field>: <rule>` for the first problem FastAPI found in a request body."""
    errors = exc.errors()
    if not errors:
        return "body: not a valid request"
    first = errors[0]
    location = ".".join(str(part) for part in first.get("loc", ("body",)))
    message = str(first.get("msg", "invalid"))
    if first.get("type") == "json_invalid":
        location, message = "body", f"not valid JSON ({first.get('ctx', {}).get('error', message)})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{location}: {message}{more}"[:MAX_DETAIL_CHARS]


async def bad_request_body(request: Request, exc: Exception) -> Any:
    """FastAPI's request validation errors as 400 `{"error": "<field>: <rule>"}`."""
    assert isinstance(exc, RequestValidationError)
    message = validation_message(exc)
    log_answer(status.HTTP_400_BAD_REQUEST, message)
    return rest_errors.Response(status_code=status.HTTP_400_BAD_REQUEST, content={"error": message})


async def mlserver_error(request: Request, exc: Exception) -> Any:
    """MLServer's own REST error answer, logged as one line unless the runtime did."""
    assert isinstance(exc, MLServerError)
    if not is_relayed(exc):
        log_answer(exc.status_code, str(exc))
    return rest_errors.Response(status_code=exc.status_code, content={"error": str(exc)})


def log_answer(http_status: int, message: str) -> None:
    """One WARNING line for a client-side answer given outside the runtime (the request id
    comes from `serving.logs.current_request_id`)."""
    logger.warning("answered %s: %s", http_status, message[:MAX_DETAIL_CHARS], extra={"status": http_status})


def is_client_side(exc: BaseException | None) -> bool:
    """An error that answers a request as the contract says (4xx, 503, 504), not a failure."""
    return isinstance(exc, MLServerError) and (
        exc.status_code < 500
        or exc.status_code in (status.HTTP_503_SERVICE_UNAVAILABLE, status.HTTP_504_GATEWAY_TIMEOUT)
    )


class RelayedError(MLServerError):
    """A client-side error raised in the worker, relayed with its own message and status
    (the runtime logged it there already), and the runtime's outcome for it
    (`serving.metrics.OUTCOMES`; None: the status says it)."""

    def __init__(self, msg: str, status_code: int = 400, outcome: str | None = None) -> None:
        # defaults: unpickling calls the class with the message only, then restores the
        # attributes (the worker -> main process hop)
        super().__init__(msg, status_code)
        self.outcome = outcome


def is_relayed(exc: BaseException | None) -> bool:
    """An answer the runtime (in the worker) gave and logged already."""
    return isinstance(exc, RelayedError)


class ClientErrorFilter(logging.Filter):
    """MLServer's traceback records for client-side errors: dropped when the runtime logged
    the request already, otherwise made one WARNING line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not is_client_side(exc):
            return True
        if is_relayed(exc):
            return False
        assert exc is not None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "answered %s: %s", (getattr(exc, "status_code", "?"), str(exc)[:MAX_DETAIL_CHARS])
        return True
