"""Prometheus exporter for the gateway: tails nginx's JSON access log and counts requests.

nginx has no per-status Prometheus metrics of its own, so this process follows the access
log written with the `kronos_json` format (see nginx.conf.template) and exports, on its own
port:

- `kronos_gateway_requests_total{status,route}`: responses by HTTP status and route
  (route: infer, grpc, health, repository, other);
- `kronos_gateway_request_seconds{route}`: histogram of nginx's request time (seconds,
  from the first client byte to the last byte sent);
- `kronos_gateway_grpc_responses_total{grpc_status}`: gRPC status codes (the upstream's, and
  the gateway's own refusals);
- `kronos_gateway_log_lines_total` and `kronos_gateway_log_parse_errors_total`.

It follows rotation (new inode) and truncation. Command line:

    python -m serving.gateway.log_exporter --log PREFIX/logs/access.log --port 9145

Only the standard library and prometheus_client are imported (runs as a plain script too).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

ROUTES = frozenset({"infer", "grpc", "health", "repository", "other"})
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayLogMetrics:
    """The exporter's metrics in their own registry; `observe_line` feeds one log line."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "kronos_gateway_requests", "Gateway responses by status", ["status", "route"], registry=self.registry
        )
        self.seconds = Histogram(
            "kronos_gateway_request_seconds",
            "Gateway request time in seconds",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.grpc = Counter(
            "kronos_gateway_grpc_responses", "gRPC status codes from upstream", ["grpc_status"], registry=self.registry
        )
        self.lines = Counter("kronos_gateway_log_lines", "Access log lines read", registry=self.registry)
        self.parse_errors = Counter(
            "kronos_gateway_log_parse_errors",
            "Access log lines that were not a valid JSON entry",
            registry=self.registry,
        )

    def observe_line(self, line: str) -> bool:
        """Count one access-log line; returns False (and counts a parse error) if invalid."""
        line = line.strip()
        if not line:
            return False
        self.lines.inc()
        try:
            entry = json.loads(line)
            status = int(entry["status"])
            seconds = float(entry["request_time"])
        except (ValueError, KeyError, TypeError):
            self.parse_errors.inc()
            return False
        if not 100 <= status <= 599 or seconds < 0:
            self.parse_errors.inc()
            return False
        route = entry.get("route")
        route = route if route in ROUTES else "other"
        self.requests.labels(status=str(status), route=route).inc()
        self.seconds.labels(route=route).observe(seconds)
        grpc_status = str(entry.get("grpc_status") or "")
        if grpc_status.isdigit() and int(grpc_status) <= 16:
            self.grpc.labels(grpc_status=grpc_status).inc()
        return True


def follow(
    path: Path, stop: threading.Event, from_start: bool = False, poll_s: float = 0.2, max_bytes: int = 0
) -> Iterator[str]:
    """Yield complete lines appended to `path` until `stop` is set.

    Waits for the file to appear; reopens it from the start when it is replaced (rotation,
    new inode) or truncated. Starts at the end of an existing file unless `from_start`.
    With `max_bytes` > 0, truncates the file once everything in it has been read and it
    holds at least that many bytes (like logrotate's copytruncate: nginx appends, so its
    next line lands at the new start), which keeps the log from filling the disk.
    """
    handle = None
    inode = -1
    pending = b""
    first_open = True
    while not stop.is_set():
        if handle is None:
            try:
                handle = path.open("rb")
            except FileNotFoundError:
                stop.wait(poll_s)
                continue
            inode = os.fstat(handle.fileno()).st_ino
            if first_open and not from_start:
                handle.seek(0, os.SEEK_END)
            first_open = False
            pending = b""
        chunk = handle.read(65536)
        if chunk:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                yield raw.decode("utf-8", errors="replace")
            continue
        # No new data: trim the file if asked, check for rotation or truncation, then wait.
        if max_bytes > 0 and not pending and handle.tell() >= max_bytes:
            os.truncate(path, 0)
            handle.seek(0)  # read what is appended from now on from the new start
            continue
        try:
            current = path.stat()
        except FileNotFoundError:
            current = None
        if current is None or current.st_ino != inode or current.st_size < handle.tell():
            if current is not None and current.st_ino == inode:
                handle.seek(0)
                pending = b""
            else:
                handle.close()
                handle = None
            continue
        stop.wait(poll_s)
    if handle is not None:
        handle.close()


def run(
    log: Path,
    metrics: GatewayLogMetrics,
    stop: threading.Event,
    from_start: bool = False,
    poll_s: float = 0.2,
    max_bytes: int = 0,
) -> None:
    """Feed every new line of `log` into `metrics` until `stop` is set."""
    for line in follow(log, stop, from_start=from_start, poll_s=poll_s, max_bytes=max_bytes):
        metrics.observe_line(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the metrics on --host:--port while following --log."""
    parser = argparse.ArgumentParser(description="Kronos gateway access-log exporter")
    parser.add_argument(
        "--log",
        type=Path,
        default=Path(os.environ.get("KRONOS_GATEWAY_EXPORTER_LOG", "/tmp/kronos-gateway/logs/access.log")),
    )
    parser.add_argument("--host", default=os.environ.get("KRONOS_GATEWAY_EXPORTER_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("KRONOS_GATEWAY_EXPORTER_PORT", "9145")))
    parser.add_argument(
        "--from-start", action="store_true", help="count lines already in the log (default: only new ones)"
    )
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between polls")
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=int(os.environ.get("KRONOS_GATEWAY_EXPORTER_MAX_BYTES", "0")),
        help="truncate the log after reading it once it is this large (0: never; the exporter then needs write access)",
    )
    args = parser.parse_args(argv)

    metrics = GatewayLogMetrics()
    server, thread = start_http_server(args.port, args.host, registry=metrics.registry)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"exporting {args.log} on http://{args.host}:{args.port}/metrics", flush=True)
    try:
        run(args.log, metrics, stop, from_start=args.from_start, poll_s=args.poll, max_bytes=args.max_bytes)
    finally:
        server.shutdown()
        thread.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
