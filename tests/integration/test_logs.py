"""Unit tests of serving/logs.py: JSON lines, request fields, no payloads, idempotent setup."""

from __future__ import annotations

import importlib
import io
import json
import logging
from collections.abc import Iterator

import pytest

from serving import logs
from serving.logs import (
    HANDLER_NAME,
    JsonFormatter,
    configure_json_logging,
    log_request,
    request_id_from,
)

REQUEST_FIELDS = {
    "request_id",
    "model_version",
    "outcome",
    "series",
    "horizon",
    "sample_count",
    "queue_wait_s",
    "inference_s",
    "total_s",
    "error",
}
BASE_FIELDS = {"ts", "level", "logger", "message"}


@pytest.fixture
def logger_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh logger name per test; its handlers are removed afterwards."""
    name = f"kronos-test.{request.node.name}"
    yield name
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True


def lines(stream: io.StringIO) -> list[dict]:
    """Every line written to `stream`, each parsed as JSON (fails on a non-JSON line)."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_formatter_writes_one_json_object_per_line(logger_name: str) -> None:
    stream = io.StringIO()
    logger = configure_json_logging("DEBUG", stream=stream, logger_name=logger_name)
    logger.info("loaded %s\nversion %s", "kronos", 3, extra={"model_version": "3", "weird": float("nan")})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    text = stream.getvalue()
    assert len(text.splitlines()) == 2  # the newline in the message and traceback are escaped
    first, second = lines(stream)
    assert first.keys() >= BASE_FIELDS
    assert first["level"] == "INFO" and first["logger"] == logger_name
    assert first["message"] == "loaded kronos\nversion 3"
    assert first["model_version"] == "3" and first["weird"] is None  # strict JSON: no NaN
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc_info"]
    assert "args" not in first and "msg" not in first  # LogRecord internals stay out


def test_log_request_has_exactly_the_request_fields(logger_name: str) -> None:
    stream = io.StringIO()
    logger = configure_json_logging("INFO", stream=stream, logger_name=logger_name)
    log_request(
        logger,
        request_id="req-1",
        model_version="7",
        outcome="ok",
        series=3,
        horizon=12,
        sample_count=2,
        queue_wait_s=0.0123456789,
        inference_s=0.5,
        total_s=0.52,
    )
    log_request(
        logger,
        request_id=None,
        model_version=None,
        outcome="invalid",
        series=None,
        horizon=None,
        sample_count=None,
        queue_wait_s=None,
        inference_s=None,
        total_s=float("inf"),
        error=ValueError("pred_len must be > 0"),
    )
    ok, invalid = lines(stream)
    assert ok.keys() == BASE_FIELDS | REQUEST_FIELDS
    assert invalid.keys() == BASE_FIELDS | REQUEST_FIELDS
    assert ok == {
        **ok,
        "request_id": "req-1",
        "model_version": "7",
        "outcome": "ok",
        "series": 3,
        "horizon": 12,
        "sample_count": 2,
        "queue_wait_s": 0.012346,
        "inference_s": 0.5,
        "total_s": 0.52,
        "error": None,
        "level": "INFO",
        "message": "request",
    }
    assert invalid["level"] == "WARNING" and invalid["total_s"] is None
    assert invalid["error"] == "ValueError: pred_len must be > 0"


def test_log_request_never_logs_payloads_or_secrets(logger_name: str) -> None:
    stream = io.StringIO()
    logger = configure_json_logging("INFO", stream=stream, logger_name=logger_name)
    secret_error = "upstream said: Authorization: Bearer sk-live-123 password=hunter2 api_key=AKIA999 " + "x" * 1000
    log_request(
        logger,
        request_id="r",
        model_version="1",
        outcome="error",
        series=1,
        horizon=1,
        sample_count=1,
        queue_wait_s=0.0,
        inference_s=0.0,
        total_s=0.0,
        error=secret_error,
    )
    text = stream.getvalue()
    for leaked in ("sk-live-123", "hunter2", "AKIA999"):
        assert leaked not in text
    (entry,) = lines(stream)
    assert len(entry["error"]) <= logs.MAX_ERROR_CHARS
    # the signature itself admits no payload: unknown keyword arguments are refused
    payload: dict = {"inputs": [{"name": "close", "data": [101.5]}]}
    with pytest.raises(TypeError):
        log_request(
            logger,
            request_id="r",
            model_version="1",
            outcome="ok",
            series=1,
            horizon=1,
            sample_count=1,
            queue_wait_s=0.0,
            inference_s=0.0,
            total_s=0.0,
            **payload,
        )
    assert "101.5" not in stream.getvalue()


def test_configuration_is_idempotent_across_calls_and_reloads(logger_name: str) -> None:
    stream = io.StringIO()
    configure_json_logging("INFO", stream=stream, logger_name=logger_name)
    configure_json_logging("INFO", stream=stream, logger_name=logger_name)
    # MLServer re-imports the runtime module on every (re)load: the class is re-created
    reloaded = importlib.reload(logs)
    logger = reloaded.configure_json_logging("WARNING", stream=stream, logger_name=logger_name)
    ours = [h for h in logger.handlers if h.get_name() == HANDLER_NAME]
    assert len(ours) == 1 and len(logger.handlers) == 1
    assert logger.level == logging.WARNING and logger.propagate is False
    logger.info("dropped")  # below the new level
    logger.warning("once")
    assert [e["message"] for e in lines(stream)] == ["once"]


def test_child_loggers_inherit_the_json_handler(logger_name: str) -> None:
    stream = io.StringIO()
    configure_json_logging("INFO", stream=stream, logger_name=logger_name)
    logging.getLogger(f"{logger_name}.serving.requests").info("child")
    (entry,) = lines(stream)
    assert entry["logger"] == f"{logger_name}.serving.requests"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-request-id": "abc-123"}, "abc-123"),  # REST (Starlette) and gRPC: lower case
        ({"X-Request-ID": "Mixed.Case:1"}, "Mixed.Case:1"),
        ({"X-REQUEST-ID": b"bytes_id"}, "bytes_id"),
        ({"content-type": "application/json"}, None),
        ({}, None),
        (None, None),
        ({"x-request-id": ""}, None),
        ({"x-request-id": "has space"}, None),  # the gateway's rule: ids are tokens
        ({"x-request-id": '"}\n{"injected": 1'}, None),
        ({"x-request-id": "a" * 129}, None),
    ],
)
def test_request_id_from_headers(headers: dict | None, expected: str | None) -> None:
    assert request_id_from(headers) == expected


def test_formatter_is_a_logging_formatter() -> None:
    record = logging.LogRecord("kronos", logging.INFO, __file__, 1, "hi %d", (1,), None)
    assert json.loads(JsonFormatter().format(record))["message"] == "hi 1"


def test_default_stream_is_the_current_stderr(logger_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    logger = configure_json_logging("INFO", logger_name=logger_name)
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    logger.info("one")
    monkeypatch.setattr("sys.stderr", second)
    logger.info("two")
    assert [e["message"] for e in lines(first)] == ["one"]
    assert [e["message"] for e in lines(second)] == ["two"]
