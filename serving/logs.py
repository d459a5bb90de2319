"""Structured JSON logs of the Kronos runtime: one JSON object per line, one line per request.

    from serving.logs import configure_json_logging, log_request, request_id_from

    logger = configure_json_logging("INFO")          # the `kronos` logger, JSON on stderr
    request_id = request_id_from(payload.parameters.headers if payload.parameters else None)
    log_request(logger, request_id=request_id, model_version="3", outcome="ok", series=2,
                horizon=12, sample_count=1, queue_wait_s=0.01, inference_s=0.4, total_s=0.45)

A line looks like

    {"ts": "2026-11-26T11:30:00.123Z", "level": "INFO", "logger": "kronos.serving.requests",
     "message": "request", "request_id": "abc", "model_version": "3", "outcome": "ok",
     "series": 2, "horizon": 12, "sample_count": 1, "queue_wait_s": 0.01,
     "inference_s": 0.4, "total_s": 0.45, "error": null}

How the request id reaches `MLModel.predict` (MLServer 1.7, checked in its sources):

- REST: `mlserver/rest/endpoints.py` `Endpoints.infer` calls
  `insert_headers(payload, dict(raw_request.headers))` (`mlserver/utils.py`), which sets
  `payload.parameters.headers` to every HTTP request header; Starlette gives the names in
  lower case (`x-request-id`). Any `parameters.headers` sent by the client in the body is
  replaced (MLServer logs a warning), so a client cannot smuggle a different id that way.
- gRPC: `mlserver/grpc/servicers.py` `InferenceServicer.ModelInfer` calls `_InsertHeaders`,
  i.e. `insert_headers(payload, to_headers(context))`, where `to_headers`
  (`mlserver/grpc/utils.py`) turns the call's invocation metadata (plus trailing metadata)
  into a dict; gRPC metadata keys are lower case.
- With `parallel_workers > 0` the payload, `parameters.headers` included, is pickled to
  the inference worker unchanged. Custom REST handlers (e.g. `/invocations`) do not get
  this treatment: they must read the header from their own `fastapi.Request`.

Behind the gateway the header is always present: nginx accepts a well-formed client
`X-Request-ID` or generates one, and forwards it (REST and gRPC). `request_id_from` applies
the same rule as the gateway (`[A-Za-z0-9._:-]{1,128}`) and ignores anything else, so a
direct caller cannot inject arbitrary text into the logs.

Only the fields named by `log_request` are logged: never inputs, outputs, parameters,
headers or other request contents, and error texts are shortened and scrubbed of
`key=value` credentials.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import math
import re
import sys
import uuid
from collections.abc import Mapping
from typing import IO, Any

ROOT_LOGGER = "kronos"
REQUEST_LOGGER = "kronos.serving.requests"
HANDLER_NAME = "kronos-json"  # marks our handler, so that re-configuration replaces it
REQUEST_ID_HEADER = "x-request-id"
MAX_ERROR_CHARS = 300

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# The request a task is serving (set where a request enters the process: the REST middleware,
# the gRPC servicer); every log line written meanwhile carries it.
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("kronos_request_id", default=None)
_CREDENTIAL = re.compile(
    r"(?i)\b(authorization|token|password|passwd|secret|api[_-]?key)\b\s*[=:]\s*"
    r"(?:(?:bearer|basic)\s+)?[^\s,;&]+"
    r"|\b(bearer)\s+[^\s,;&]+"
)
# Attributes every LogRecord has; anything else on a record came in through `extra=`
# (uvicorn's `color_message` repeats the message with terminal colour codes).
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


def _jsonable(value: Any) -> Any:
    """A value json.dumps writes as strict JSON (NaN/inf become null, others str())."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601, ms), level, logger, message, the
    record's `extra=` fields, and `exc_info` / `stack_info` text when present."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
        entry: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in entry:
                entry[key] = _jsonable(value)
        if entry.get("request_id") is None and current_request_id.get() is not None:
            entry["request_id"] = current_request_id.get()
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, allow_nan=False)


class _CurrentStderrHandler(logging.StreamHandler):
    """A StreamHandler that always writes to the current `sys.stderr` (looked up at every
    record), so a replaced stderr (test capture, a reopened log) never leaves it writing to
    a closed stream."""

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass  # StreamHandler.__init__ / setStream assign it; the current stderr always wins


def configure_json_logging(
    level: int | str = "INFO", stream: IO[str] | None = None, logger_name: str = ROOT_LOGGER
) -> logging.Logger:
    """Send `logger_name` (default `kronos`, parent of the runtime's loggers) to `stream`
    (default: whatever `sys.stderr` is when a record is written) as JSON lines, at `level`;
    return that logger.

    Idempotent: MLServer re-imports the runtime module on every model (re)load, so this
    may run many times in one process. Our handler is found by name (not by class, which a
    reload re-creates) and replaced, so there is always exactly one and no line is written
    twice. The logger does not propagate, so MLServer's own handlers do not repeat our lines
    in their plain-text format.
    """
    logger = logging.getLogger(logger_name)
    for handler in [h for h in logger.handlers if h.get_name() == HANDLER_NAME]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderrHandler()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    logger.propagate = False
    return logger


def request_id_from(headers: Mapping[str, Any] | None) -> str | None:
    """The `X-Request-ID` in `headers` (name matched case-insensitively), or None when
    absent or malformed (not 1-128 of `A-Z a-z 0-9 . _ : -`, the gateway's own rule).

    Pass `payload.parameters.headers` in `MLModel.predict`: MLServer puts the REST request
    headers and the gRPC invocation metadata there (see the module docstring).
    """
    if not headers:
        return None
    for name, value in headers.items():
        if isinstance(name, str) and name.lower() == REQUEST_ID_HEADER:
            if isinstance(value, bytes):
                value = value.decode("ascii", errors="replace")
            if isinstance(value, str) and _REQUEST_ID.match(value.strip()):
                return value.strip()
            return None
    return None


def well_formed_request_id(value: str | bytes | None) -> str:
    """`value` when it follows the gateway's rule, else a newly generated id."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if isinstance(value, str) and _REQUEST_ID.match(value.strip()):
        return value.strip()
    return uuid.uuid4().hex


def _safe_error(error: BaseException | str | None) -> str | None:
    """One short line describing an error, credentials-looking `key=value` pairs redacted."""
    if error is None:
        return None
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    text = " ".join(text.split())
    text = _CREDENTIAL.sub(lambda m: f"{m.group(1) or m.group(2)}=[redacted]", text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _count(value: int | None) -> int | None:
    return None if value is None else int(value)


def _seconds(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def log_request(
    logger: logging.Logger,
    *,
    request_id: str | None,
    model_version: str | None,
    outcome: str,
    series: int | None,
    horizon: int | None,
    sample_count: int | None,
    queue_wait_s: float | None,
    inference_s: float | None,
    total_s: float | None,
    error: BaseException | str | None = None,
) -> None:
    """Log one request as one line with exactly these fields (message `request`).

    Counts and times may be None when the request failed before they were known (e.g.
    invalid input). Level INFO for outcome `ok`, WARNING otherwise. `error` (an exception
    or its text) is shortened to one line of at most 300 characters; nothing of the
    request's inputs, parameters or headers is ever logged.
    """
    fields = {
        "request_id": request_id,
        "model_version": None if model_version is None else str(model_version),
        "outcome": str(outcome),
        "series": _count(series),
        "horizon": _count(horizon),
        "sample_count": _count(sample_count),
        "queue_wait_s": _seconds(queue_wait_s),
        "inference_s": _seconds(inference_s),
        "total_s": _seconds(total_s),
        "error": _safe_error(error),
    }
    logger.log(logging.INFO if outcome == "ok" else logging.WARNING, "request", extra=fields)
