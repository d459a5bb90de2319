"""kill -9 of MLServer's inference worker under load (real MLServer process, REST + gRPC
clients): every failed answer is a 503 with Retry-After (gRPC UNAVAILABLE), readiness is
false until a new worker serves, every answer is counted in series that survive the
restart, and the event costs a bounded number of log lines."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc
from serving_helpers import Server, grpc_request, history, metric_value, start_server, v2_request, wait_for

pytestmark = pytest.mark.integration

PARAMS = {"pred_len": 2, "top_k": 1}


@dataclass
class Tally:
    """What the clients saw: outcome per answer, and anything that is not 200 or 503."""

    outcomes: Counter = field(default_factory=Counter)  # (protocol, "ok" | "unavailable")
    wrong: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, protocol: str, outcome: str | None, problem: str | None = None) -> None:
        with self.lock:
            if outcome is not None:
                self.outcomes[(protocol, outcome)] += 1
            if problem is not None:
                self.wrong.append(f"{protocol}: {problem}")


def rest_client(server: Server, tally: Tally, stop: threading.Event) -> None:
    body = v2_request(history(["A"], seed=3), PARAMS)
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            try:
                reply = client.post(f"{server.url}/v2/models/kronos/infer", json=body)
            except httpx.HTTPError as exc:  # a reset or a refused connection
                tally.add("rest", None, f"{type(exc).__name__}: {exc}")
                continue
            if reply.status_code == 200:
                tally.add("rest", "ok")
            elif reply.status_code == 503 and reply.headers.get("retry-after") and "error" in reply.json():
                tally.add("rest", "unavailable")
            else:
                tally.add("rest", None, f"{reply.status_code} {dict(reply.headers)} {reply.text[:200]}")
            time.sleep(0.02)


def grpc_client(server: Server, tally: Tally, stop: threading.Event) -> None:
    request = grpc_request(history(["B"], seed=4), PARAMS)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not stop.is_set():
            try:
                stub.ModelInfer(request, timeout=120)
                tally.add("grpc", "ok")
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and "inference worker" in (exc.details() or ""):
                    tally.add("grpc", "unavailable")
                else:
                    tally.add("grpc", None, f"{exc.code()} {exc.details()}")
            time.sleep(0.02)


def status(server: Server, path: str) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", timeout=30)


def log_records(server: Server, start: int) -> list[dict]:
    records = []
    for line in server.log.read_text(errors="replace")[start:].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"message": line, "level": "RAW"})
    return records


@pytest.fixture(scope="module")
def dying_server(serving_registry, tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("mlserver-worker-death"),
        serving_registry.tracking_uri,
    )
    try:
        yield server
    finally:
        server.stop()


def test_a_killed_worker_gives_503s_not_ready_and_counted_answers(dying_server):
    server = dying_server
    tally, stop = Tally(), threading.Event()
    clients = [
        threading.Thread(target=rest_client, args=(server, tally, stop), daemon=True),
        threading.Thread(target=rest_client, args=(server, tally, stop), daemon=True),
        threading.Thread(target=grpc_client, args=(server, tally, stop), daemon=True),
    ]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: tally.outcomes[("rest", "ok")] >= 3 and tally.outcomes[("grpc", "ok")] >= 1, "answers")
        before = server.metrics()
        log_start = len(server.log.read_text(errors="replace"))
        killed: list[int] = []
        for _ in range(3):  # a test process starved for seconds may stop the new worker too late
            (old,) = server.worker_pids()
            os.kill(old, signal.SIGKILL)
            killed.append(old)
            # hold the restart: stop the new worker before it can load the model, so that
            # the test sees the outage for sure (the clients keep sending all along)
            new = wait_for(lambda dead=old: server.worker_pids() - {dead}, "a new worker", poll_s=0.01).pop()
            os.kill(new, signal.SIGSTOP)
            ready = status(server, "/v2/health/ready")
            if ready.status_code == 503:
                break
            os.kill(new, signal.SIGCONT)  # it was serving already: kill it again
        try:
            assert ready.status_code == 503 and ready.headers["retry-after"], ready
            model_ready = status(server, "/v2/models/kronos/ready")
            assert model_ready.status_code == 503, model_ready
            live = status(server, "/kronos/health/live")
            assert live.status_code == 503 and live.headers["retry-after"], live
            assert "no inference worker" in live.json()["error"]
            wait_for(lambda: tally.outcomes[("rest", "unavailable")] >= 5, "503s to REST clients")
            wait_for(lambda: tally.outcomes[("grpc", "unavailable")] >= 2, "UNAVAILABLE to gRPC clients")
            gauge = metric_value(server.metrics(), "kronos_ready_workers")
            assert gauge == 0
        finally:
            os.kill(new, signal.SIGCONT)
        wait_for(lambda: status(server, "/v2/health/ready").status_code == 200, "readiness after the restart")
        served_again = tally.outcomes[("rest", "ok")]
        wait_for(lambda: tally.outcomes[("rest", "ok")] >= served_again + 3, "answers after the restart")
    finally:
        stop.set()
        for thread in clients:
            thread.join(150)

    assert not tally.wrong, tally.wrong[:5]
    after = server.metrics()
    # every answer the clients saw is counted, by protocol and outcome, in the main process
    for (protocol, outcome), seen in tally.outcomes.items():
        counted = metric_value(after, "kronos_answers_total", protocol=protocol, outcome=outcome)
        assert counted >= seen, (protocol, outcome, counted, seen)
        counted_before = metric_value(before, "kronos_answers_total", protocol=protocol, outcome=outcome)
        assert counted - counted_before <= seen, (protocol, outcome, counted, counted_before, seen)
    assert metric_value(after, "kronos_answers_total", outcome="error") == 0
    assert metric_value(after, "kronos_worker_restarts_total") == len(killed)
    assert metric_value(after, "kronos_ready_workers") == 1
    # the dead worker's counters are kept: the runtime's totals did not go backwards
    assert metric_value(after, "kronos_requests_total", outcome="ok") >= metric_value(
        before, "kronos_requests_total", outcome="ok"
    )
    assert metric_value(after, "kronos_generated_candles_total") >= metric_value(
        before, "kronos_generated_candles_total"
    )

    records = log_records(server, log_start)
    unavailable_seen = tally.outcomes[("rest", "unavailable")] + tally.outcomes[("grpc", "unavailable")]
    assert not [r for r in records if "Traceback" in json.dumps(r)], records[:20]
    warnings = [r for r in records if r.get("level") in ("WARNING", "ERROR", "CRITICAL", "RAW")]
    # one WARNING per killed worker, one INFO when a new one serves
    assert [r["message"].split(" with ")[0] for r in warnings] == [
        f"inference worker {pid} killed by SIGKILL" for pid in killed
    ], warnings
    back = [r for r in records if "serves again" in r.get("message", "")]
    assert len(back) == len(killed), records
    # bounded: the event's lines do not grow with the number of failed requests
    assert len(records) < 60 * len(killed), (len(records), unavailable_seen)


def test_metadata_names_the_served_version_after_a_restart(dying_server, serving_registry):
    """MLServer caches model metadata in the main process; it must follow the worker."""
    reply = httpx.get(f"{dying_server.url}/v2/models/kronos", timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["parameters"]["model_version"] == "1"


def test_a_restarted_worker_that_cannot_load_is_restarted_until_it_can(dying_server, serving_registry):
    """The champion moved to a broken version without a reload; then the worker dies: its
    successor cannot load, the server says so once, answers 503 and keeps retrying; once
    the alias is fixed, a retry serves again."""
    server = dying_server
    broken = serving_registry.client().create_model_version(
        "kronos", source=(serving_registry.root / "no-such-model").as_uri()
    )
    log_start = len(server.log.read_text(errors="replace"))
    restarts = metric_value(server.metrics(), "kronos_worker_restarts_total")
    try:
        serving_registry.set_champion(str(broken.version))
        (old,) = server.worker_pids()
        os.kill(old, signal.SIGKILL)
        wait_for(
            lambda: any("could not load its models" in r.get("message", "") for r in log_records(server, log_start)),
            "the failed restart in the log",
        )
        assert status(server, "/v2/health/ready").status_code == 503
        reply = httpx.post(
            f"{server.url}/v2/models/kronos/infer", json=v2_request(history(["C"], 5), PARAMS), timeout=60
        )
        assert reply.status_code == 503 and reply.headers["retry-after"], reply.text
    finally:
        serving_registry.set_champion("1")
    wait_for(lambda: status(server, "/v2/health/ready").status_code == 200, "a successful retry")
    reply = httpx.post(f"{server.url}/v2/models/kronos/infer", json=v2_request(history(["C"], 5), PARAMS), timeout=120)
    assert reply.status_code == 200 and reply.json()["parameters"]["model_version"] == "1", reply.text
    assert metric_value(server.metrics(), "kronos_worker_restarts_total") >= restarts + 2
    errors = [r["message"] for r in log_records(server, log_start) if r.get("level") == "ERROR"]
    # per try: the runtime's and MLServer's lines in the worker, the restart decision here
    tries = [m for m in errors if "could not load its models" in m]
    assert tries and len(errors) <= 3 * len(tries), errors
