"""The access-log exporter: line parsing, log following, and end to end behind real nginx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_helpers import ADMIN, OUTSIDER, GatewayFactory, call
from prometheus_client.parser import text_string_to_metric_families

from serving.gateway.log_exporter import GatewayLogMetrics, follow
from serving.gateway.process import wait_for_port
from serving.local_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def _line(status: int = 200, route: str = "infer", seconds: float = 0.02, grpc_status: str = "") -> str:
    return json.dumps(
        {"request_id": "r", "status": status, "route": route, "request_time": seconds, "grpc_status": grpc_status}
    )


def _value(metrics: GatewayLogMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_observe_line_counts_status_route_and_latency() -> None:
    metrics = GatewayLogMetrics()
    assert metrics.observe_line(_line(200, "infer", 0.3))
    assert metrics.observe_line(_line(200, "infer", 2.0))
    assert metrics.observe_line(_line(429, "infer", 0.0))
    assert metrics.observe_line(_line(200, "grpc", 0.1, grpc_status="3"))
    total = "kronos_gateway_requests_total"
    assert _value(metrics, total, status="200", route="infer") == 2
    assert _value(metrics, total, status="429", route="infer") == 1
    assert _value(metrics, total, status="200", route="grpc") == 1
    hist = "kronos_gateway_request_seconds"
    assert _value(metrics, f"{hist}_count", route="infer") == 3
    assert _value(metrics, f"{hist}_bucket", route="infer", le="0.5") == 2
    assert _value(metrics, f"{hist}_sum", route="infer") == pytest.approx(2.3)
    assert _value(metrics, "kronos_gateway_grpc_responses_total", grpc_status="3") == 1


def test_unknown_route_is_other_and_bad_lines_are_counted_not_fatal() -> None:
    metrics = GatewayLogMetrics()
    assert metrics.observe_line(_line(404, "/etc/passwd"))
    assert _value(metrics, "kronos_gateway_requests_total", status="404", route="other") == 1
    for bad in ("not json", '{"status": 200}', _line(999), '{"status": "x", "request_time": 1}'):
        assert not metrics.observe_line(bad)
    assert not metrics.observe_line("   ")  # blank lines are ignored, not errors
    assert _value(metrics, "kronos_gateway_log_parse_errors_total") == 4
    assert _value(metrics, "kronos_gateway_log_lines_total") == 5


@pytest.fixture
def followed(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """Follow tmp_path/access.log in a thread; yields (path, lines seen so far)."""
    path = tmp_path / "access.log"
    seen: list[str] = []
    stop = threading.Event()

    def collect_live() -> None:
        for line in follow(path, stop, from_start=True, poll_s=0.02):
            seen.append(line)

    thread = threading.Thread(target=collect_live, daemon=True)
    thread.start()
    yield path, seen
    stop.set()
    thread.join(5)


def _wait_for(seen: list[str], count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(seen) < count:
        assert time.monotonic() < deadline, f"saw only {seen}"
        time.sleep(0.02)


def test_follow_waits_for_file_handles_partial_lines_truncation_and_rotation(followed: tuple[Path, list[str]]) -> None:
    path, seen = followed
    time.sleep(0.1)  # the file does not exist yet
    with path.open("a") as log:
        log.write("one\ntw")
        log.flush()
        _wait_for(seen, 1)
        log.write("o\n")
    _wait_for(seen, 2)
    assert seen == ["one", "two"]
    path.write_text("")  # truncation (copytruncate rotation)
    time.sleep(0.1)
    with path.open("a") as log:
        log.write("three\n")
    _wait_for(seen, 3)
    os.rename(path, path.with_suffix(".1"))  # rename rotation: a new file appears
    path.write_text("four\n")
    _wait_for(seen, 4)
    assert seen == ["one", "two", "three", "four"]


def test_follow_trims_a_large_log_without_losing_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    stop = threading.Event()
    seen: list[str] = []

    def collect() -> None:
        for line in follow(path, stop, from_start=True, poll_s=0.02, max_bytes=100):
            seen.append(line)

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    expected = []
    with path.open("a") as log:  # O_APPEND, as nginx writes
        for batch in range(5):
            lines = [f"batch {batch} line {i} " + "x" * 20 for i in range(5)]
            log.write("".join(line + "\n" for line in lines))
            log.flush()
            expected += lines
            _wait_for(seen, len(expected))
            deadline = time.monotonic() + 10  # a bound, not a speed requirement
            while path.stat().st_size and time.monotonic() < deadline:
                time.sleep(0.02)
            assert path.stat().st_size == 0  # read completely, then trimmed
    stop.set()
    thread.join(5)
    assert seen == expected


def test_follow_starts_at_end_of_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text("old\n")
    stop = threading.Event()
    seen: list[str] = []

    def collect() -> None:
        for line in follow(path, stop, poll_s=0.02):
            seen.append(line)

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    time.sleep(0.1)
    with path.open("a") as log:
        log.write("new\n")
    _wait_for(seen, 1)
    stop.set()
    thread.join(5)
    assert seen == ["new"]


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.integration
def test_exporter_process_counts_statuses_from_real_nginx(make_gateway: GatewayFactory) -> None:
    gateway = make_gateway(rate_limit="1r/m", rate_limit_burst=1, max_body_size="1k")
    port = free_port()
    exporter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.gateway.log_exporter",
            "--log",
            str(gateway.access_log),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--from-start",
            "--poll",
            "0.05",
            "--max-bytes",
            "1",
        ],  # trim after every read
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout_s=15)
        statuses = [call(gateway, "/v2/models/kronos/infer", method="POST", body=b"{}").status for _ in range(4)]
        assert statuses == [200, 200, 429, 429]
        assert call(gateway, "/v2/health/ready", source=OUTSIDER).status == 403
        assert call(gateway, "/v2/repository/index", method="POST", body=b"{}", source=ADMIN).status == 200
        assert call(gateway, "/v2/models/kronos/infer", method="POST", body=b"x" * 4096, source=ADMIN).status == 413

        def total(status: str, route: str) -> float:
            key = ("kronos_gateway_requests_total", frozenset({("status", status), ("route", route)}))
            return _scrape(port).get(key, 0.0)

        deadline = time.monotonic() + 5
        while total("413", "infer") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert total("200", "infer") == 2
        assert total("429", "infer") == 2
        assert total("403", "health") == 1
        assert total("200", "repository") == 1
        assert total("413", "infer") == 1
        samples = _scrape(port)
        count = samples[("kronos_gateway_request_seconds_count", frozenset({("route", "infer")}))]
        assert count == 5
        assert samples[("kronos_gateway_log_parse_errors_total", frozenset())] == 0
        deadline = time.monotonic() + 5
        while gateway.access_log.stat().st_size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gateway.access_log.stat().st_size == 0  # trimmed; nginx kept appending
    finally:
        exporter.terminate()
        exporter.wait(10)
