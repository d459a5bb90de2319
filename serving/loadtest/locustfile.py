"""Locust users for the Kronos server: REST (`POST /v2/models/kronos/infer`) and gRPC
(`ModelInfer`), with real S&P 500 / NASDAQ candles (see `payloads.py`).

    locust -f serving/loadtest/locustfile.py --headless -u 4 -r 2 -t 60s \
        --host http://127.0.0.1:8080 --grpc-target 127.0.0.1:8081

Request names in the statistics:
- `REST infer` / `gRPC ModelInfer`: accepted requests (200 / OK with the right row count);
- `... [503 overloaded]`: the server refused the request because its queue was full
  (HTTP 503 / gRPC UNAVAILABLE saying "overloaded"). They are reported as failures under
  their own name, so their count and latency are visible apart from real errors.

Options (CLI or environment): `--grpc-target` / LOADTEST_GRPC_TARGET (default: the host of
`--host` with port 8081), `--wait-min`/`--wait-max` (s between a user's requests),
`--max-candles`, `--max-series`, `--payload-seed`, `--request-timeout` (s),
`--honor-retry-after` (pause as told after a 503; off: retry after the usual pause).
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import HttpUser, User, events, task
from locust.env import Environment

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # locust puts only this file's folder on sys.path
    sys.path.insert(0, str(ROOT))

from serving.loadtest.payloads import (  # noqa: E402
    MODEL_NAME,
    PayloadMix,
    Spec,
    expected_rows,
    grpc_request,
    make_spec,
    rest_body,
)

grpc_gevent.init_gevent()  # gRPC's blocking calls must yield to Locust's greenlets

REST_NAME = "REST infer"
GRPC_NAME = "gRPC ModelInfer"
OVERLOAD_SUFFIX = " [503 overloaded]"
DEFAULT_GRPC_PORT = 8081
DEFAULT_RETRY_AFTER_S = 2.0  # the server's default KRONOS_RETRY_AFTER_S
POOL_SIZE = 48  # distinct payloads per Locust process, built once
_user_ids = itertools.count()


class OverloadedResponseError(Exception):
    """The server answered 503 / UNAVAILABLE because its queue was full."""


class WrongForecastError(Exception):
    """A 200 / OK response whose forecast does not have the expected shape."""


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    parser.add_argument(
        "--grpc-target",
        env_var="LOADTEST_GRPC_TARGET",
        default="",
        help="host:port of the gRPC server (default: --host's host, port 8081)",
    )
    parser.add_argument(
        "--wait-min",
        type=float,
        env_var="LOADTEST_WAIT_MIN",
        default=0.5,
        help="shortest pause between a user's requests (s)",
    )
    parser.add_argument(
        "--wait-max",
        type=float,
        env_var="LOADTEST_WAIT_MAX",
        default=2.0,
        help="longest pause between a user's requests (s)",
    )
    parser.add_argument(
        "--max-candles",
        type=int,
        env_var="LOADTEST_MAX_CANDLES",
        default=320,
        help="longest history per series (candles)",
    )
    parser.add_argument(
        "--max-series", type=int, env_var="LOADTEST_MAX_SERIES", default=3, help="most series per request"
    )
    parser.add_argument("--payload-seed", type=int, env_var="LOADTEST_SEED", default=0, help="seed of the payload pool")
    parser.add_argument(
        "--request-timeout",
        type=float,
        env_var="LOADTEST_REQUEST_TIMEOUT",
        default=300.0,
        help="client timeout per request (s)",
    )
    parser.add_argument(
        "--honor-retry-after",
        action="store_true",
        env_var="LOADTEST_HONOR_RETRY_AFTER",
        help="after a 503, pause Retry-After seconds (gRPC: the same 2 s)",
    )


_pool: list[tuple[Spec, dict[str, Any], Any]] = []


def payload_pool(environment: Environment | None) -> list[tuple[Spec, dict[str, Any], Any]]:
    """(spec, REST body, gRPC request) triples, built once per process."""
    if not _pool:
        opts = getattr(environment, "parsed_options", None)
        mix = PayloadMix(
            max_candles=max(PayloadMix.min_candles + 1, getattr(opts, "max_candles", PayloadMix.max_candles)),
            max_series=getattr(opts, "max_series", PayloadMix.max_series),
        )
        rng = random.Random(getattr(opts, "payload_seed", 0))
        for _ in range(POOL_SIZE):
            spec = make_spec(rng, mix)
            _pool.append((spec, rest_body(spec), grpc_request(spec)))
    return _pool


@events.init.add_listener
def _build_payloads(environment: Environment, **_kwargs: Any) -> None:
    """Build the pool before users start (pandas work does not yield to greenlets)."""
    payload_pool(environment)


def grpc_target(environment: Environment) -> str:
    """`--grpc-target`, else the host of `--host` with the default gRPC port."""
    opts = environment.parsed_options
    target = getattr(opts, "grpc_target", "") if opts is not None else ""
    if target:
        return target
    host = urlsplit(environment.host or "http://127.0.0.1:8080").hostname or "127.0.0.1"
    return f"{host}:{DEFAULT_GRPC_PORT}"


class KronosUser(User):
    """Shared parts: pauses from the options, a per-user random stream over the pool."""

    abstract = True

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.rng = random.Random(next(_user_ids))
        self.opts = environment.parsed_options
        self.backoff_s = 0.0

    def wait_time(self) -> float:
        if self.backoff_s:
            backoff, self.backoff_s = self.backoff_s, 0.0
            return backoff
        low = getattr(self.opts, "wait_min", 0.5)
        high = getattr(self.opts, "wait_max", 2.0)
        return self.rng.uniform(low, max(low, high))

    def pick(self) -> tuple[Spec, dict[str, Any], Any]:
        return self.rng.choice(payload_pool(self.environment))

    def refused(self, retry_after: str | None) -> None:
        """Remember to back off before the next request (with --honor-retry-after)."""
        if getattr(self.opts, "honor_retry_after", False):
            try:
                self.backoff_s = float(retry_after or DEFAULT_RETRY_AFTER_S)
            except ValueError:
                self.backoff_s = DEFAULT_RETRY_AFTER_S

    @property
    def timeout_s(self) -> float:
        return float(getattr(self.opts, "request_timeout", 300.0))


class RestUser(KronosUser, HttpUser):
    """Posts pandas-codec V2 JSON to /v2/models/kronos/infer."""

    weight = 3
    host = "http://127.0.0.1:8080"

    @task
    def infer(self) -> None:
        spec, body, _ = self.pick()
        with self.client.post(
            f"/v2/models/{MODEL_NAME}/infer", json=body, name=REST_NAME, timeout=self.timeout_s, catch_response=True
        ) as response:
            if response.status_code == 503 and "overloaded" in response.text:
                response.request_meta["name"] = REST_NAME + OVERLOAD_SUFFIX
                self.refused(response.headers.get("Retry-After"))
                response.failure(
                    OverloadedResponseError(f"503 overloaded (Retry-After {response.headers.get('Retry-After')})")
                )
            elif response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            else:
                try:
                    rows = int(response.json()["outputs"][0]["shape"][0])
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    rows = -1
                    response.failure(WrongForecastError(f"unreadable V2 response: {exc!r}"))
                if rows >= 0 and rows != expected_rows(spec):
                    response.failure(WrongForecastError(f"{rows} rows, expected {expected_rows(spec)}"))


class GrpcUser(KronosUser):
    """Calls ModelInfer over gRPC; fires Locust request events itself."""

    weight = 1

    def on_start(self) -> None:
        from mlserver.grpc import dataplane_pb2_grpc as pb_grpc

        options = [
            ("grpc.max_send_message_length", 32 * 1024 * 1024),
            ("grpc.max_receive_message_length", 32 * 1024 * 1024),
        ]
        self.channel = grpc.insecure_channel(grpc_target(self.environment), options=options)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def infer(self) -> None:
        spec, _, request = self.pick()
        name, length = GRPC_NAME, 0
        exception: Exception | None = None
        started = time.perf_counter()
        try:
            reply = self.stub.ModelInfer(request, timeout=self.timeout_s)
            length = reply.ByteSize()
            rows = int(reply.outputs[0].shape[0]) if reply.outputs else 0
            if rows != expected_rows(spec):
                exception = WrongForecastError(f"{rows} rows, expected {expected_rows(spec)}")
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE and "overloaded" in details:
                name = GRPC_NAME + OVERLOAD_SUFFIX
                self.refused(None)
                exception = OverloadedResponseError("UNAVAILABLE overloaded")
            else:
                exception = RuntimeError(f"{code.name}: {details[:200]}")
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=elapsed_ms,
            response_length=length,
            exception=exception,
            context={},
        )
