"""Acceptance tests against a real `mlserver start` process serving the tiny Kronos from a
sqlite MLflow registry (see conftest.py). No mocks.

The module's server runs with max_batch_size=32 series, max_batch_time=0.2 s and a queue
of 48 series; the promotion test runs last because it moves the `champion` alias.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pandas as pd
import pytest
from mlserver.grpc import dataplane_pb2_grpc
from serving_helpers import (
    MODEL_NAME,
    QUEUE_BUDGET_MB,
    RawPost,
    grpc_infer,
    grpc_request,
    history,
    metric_value,
    response_frame,
    v2_request,
)

from model_package import SamplingParams
from model_package.budget import request_cost
from model_package.data import random_walk_candles
from model_package.kronos.checkpoint import weights_sha256

pytestmark = pytest.mark.integration

KRONOS_METRICS = (
    "kronos_requests_total",
    "kronos_request_seconds_bucket",
    "kronos_queue_wait_seconds_bucket",
    "kronos_inference_seconds_bucket",
    "kronos_batch_series_bucket",
    "kronos_batch_requests_bucket",
    "kronos_step_series_bucket",
    "kronos_generated_candles_total",
    "kronos_queue_series",
    "kronos_queue_cost_bytes",
    "kronos_queue_budget_bytes",
    "kronos_running_series",
    "kronos_running_cost_bytes",
    "kronos_running_budget_bytes",
    "kronos_model_info",
    "kronos_model_version",
    "kronos_ready",
    "kronos_last_progress_timestamp_seconds",
    "kronos_worker_resident_memory_bytes",
)


def assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), rtol=1e-5, check_dtype=False)


def wait_live(client: httpx.Client, server, condition, timeout_s: float = 30) -> dict:
    """Poll /kronos/health/live until `condition(state)` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = client.get(f"{server.url}/kronos/health/live").json()
        if condition(state):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


def test_rest_forecast_equals_the_direct_forecaster(server, serving_registry):
    frame = history(["AAPL", "MSFT"], seed=3)
    params = {"pred_len": 4, "top_k": 1, "temperature": 0.7, "top_p": 0.5, "quantiles": [0.5]}
    with httpx.Client(timeout=120) as client:
        reply = server.infer(client, frame, params)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["parameters"]["model_version"] == "1"
    assert body["parameters"]["model_uri"] == "models:/kronos@champion"
    want = serving_registry.forecaster("1").predict(frame, **params)
    assert "close_q0.5" in want.columns
    assert_same(response_frame(body), want)


def test_grpc_forecast_with_float_params_sent_as_strings(server, serving_registry):
    frame = history(["X", "Y"], seed=5)
    forecaster = serving_registry.forecaster("1")
    # sampled (not greedy), seeded: temperature and top_p change the result, so the test
    # sees whether the string floats were honoured
    got = grpc_infer(
        server, frame, {"pred_len": 3, "temperature": "0.35", "top_p": "0.6", "seed": 11, "sample_count": 2}
    )
    assert got.attrs["parameters"]["model_version"] == "1"
    want = forecaster.predict(frame, pred_len=3, temperature=0.35, top_p=0.6, seed=11, sample_count=2)
    assert_same(got, want)
    other = forecaster.predict(frame, pred_len=3, temperature=1.0, top_p=0.9, seed=11, sample_count=2)
    assert not got[["close"]].equals(other[["close"]])
    greedy = grpc_infer(server, frame, {"pred_len": 2, "top_k": 1, "temperature": "2.5"})
    assert_same(greedy, forecaster.predict(frame, pred_len=2, top_k=1))


def test_answers_are_replayable_over_rest_and_grpc(server, serving_registry):
    """Every answer names the seed it used (drawn when the client gave none), every param
    and the weights; sending those params back gives the same answer, over either transport."""
    frame = history(["R1", "R2"], seed=8)
    tokenizer_dir, model_dir = serving_registry.checkpoints["1"]
    asked = {"pred_len": 3, "sample_count": 2, "temperature": 0.8, "quantiles": [0.25, 0.75]}
    with httpx.Client(timeout=120) as client:
        first = server.infer(client, frame, asked)
        assert first.status_code == 200, first.text
        facts = first.json()["parameters"]
        assert facts["model_version"] == "1"
        assert facts["weights_digest"] == weights_sha256(model_dir)
        assert facts["tokenizer_digest"] == weights_sha256(tokenizer_dir)
        used = json.loads(facts["params"])
        assert isinstance(facts["seed"], int) and 0 <= facts["seed"] < 2**63 and used["seed"] == facts["seed"]
        assert used == {**dataclasses.asdict(SamplingParams()), **asked, "seed": facts["seed"]}
        again = server.infer(client, frame, used)
        assert again.status_code == 200, again.text
        assert again.json()["parameters"]["params"] == facts["params"]
        unseeded = server.infer(client, frame, asked)  # another draw: another seed, other paths
        assert unseeded.json()["parameters"]["seed"] != facts["seed"]
    want = response_frame(first.json())
    pd.testing.assert_frame_equal(response_frame(again.json()), want)  # exact, not close
    assert not response_frame(unseeded.json())["close"].equals(want["close"])
    assert_same(want, serving_registry.forecaster("1").predict(frame, **used))
    over_grpc = grpc_infer(server, frame, used)  # floats and lists travel as text
    assert over_grpc.attrs["parameters"]["seed"] == facts["seed"]
    assert json.loads(over_grpc.attrs["parameters"]["params"]) == used
    pd.testing.assert_frame_equal(over_grpc, want)
    big = grpc_infer(server, frame, {**used, "seed": 2**64 - 1})  # beyond int64: sent and echoed as text
    assert big.attrs["parameters"]["seed"] == str(2**64 - 1)


def test_the_calendar_param_continues_at_the_next_session(server, serving_registry):
    """5-minute XNYS bars ending 15:55 on 2024-07-02 (the next day closes at 13:00, then the
    Fourth of July): over REST and gRPC the future is the exchange's next bars; an unknown
    calendar is a 400 / INVALID_ARGUMENT naming the param."""
    frame = random_walk_candles(30, seed=4, series_id="SPY", start="2024-07-02 13:30", freq="5min")
    assert frame["timestamp"].iloc[-1] == pd.Timestamp("2024-07-02 15:55")
    params = {"pred_len": 43, "top_k": 1, "calendar": "XNYS"}
    with httpx.Client(timeout=120) as client:
        reply = server.infer(client, frame, params)
        assert reply.status_code == 200, reply.text
        unknown = server.infer(client, frame, {**params, "calendar": "XMOON"})
    stamps = list(response_frame(reply.json())["timestamp"])
    half_day = list(pd.date_range("2024-07-03 09:30", "2024-07-03 12:55", freq="5min"))
    assert stamps == [*half_day, pd.Timestamp("2024-07-05 09:30")]
    assert_same(response_frame(reply.json()), serving_registry.forecaster("1").predict(frame, **params))
    assert unknown.status_code == 400 and "calendar: unknown calendar" in unknown.json()["error"], unknown.text
    over_grpc = grpc_infer(server, frame, params)
    assert list(over_grpc["timestamp"]) == stamps
    with pytest.raises(grpc.RpcError) as refused:
        grpc_infer(server, frame, {**params, "calendar": "XMOON"})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "calendar" in refused.value.details()


def test_sixteen_concurrent_clients_get_their_own_forecasts(server, serving_registry):
    forecaster = serving_registry.forecaster("1")
    ids = ["A", "B", "C", "D"]
    cases = []
    for i in range(16):
        frame = history(ids[i % 3 : i % 3 + 1 + i % 2], seed=100 + i, length=30 + i)
        params = {"pred_len": 2 + i % 4, "top_k": 1, "sample_count": 1 + i % 2, "temperature": 0.5 + i / 10}
        cases.append((frame, params, forecaster.predict(frame, **params)))
    bad = history(["A"], seed=99)
    bad.loc[5, "timestamp"] = bad.loc[4, "timestamp"]  # a duplicate timestamp: 400
    before = server.metrics()
    start = threading.Barrier(17)

    def call(case: tuple) -> httpx.Response:
        frame, params, _ = case
        with httpx.Client(timeout=180) as client:
            start.wait()
            return server.infer(client, frame, params)

    with ThreadPoolExecutor(17) as pool:  # 16 good clients and one bad one, all at once
        replies = list(pool.map(call, [*cases, (bad, {"pred_len": 2, "top_k": 1}, None)]))
    assert replies.pop().status_code == 400
    for reply, (_, _, want) in zip(replies, cases, strict=True):
        assert reply.status_code == 200, reply.text
        assert_same(response_frame(reply.json()), want)
    after = server.metrics()
    passes = metric_value(after, "kronos_batch_requests_count") - metric_value(before, "kronos_batch_requests_count")
    single = metric_value(after, "kronos_batch_requests_bucket", le="1.0") - metric_value(
        before, "kronos_batch_requests_bucket", le="1.0"
    )
    requests = metric_value(after, "kronos_batch_requests_sum") - metric_value(before, "kronos_batch_requests_sum")
    assert requests == 16
    assert passes < 16 and single < passes, (passes, single)  # requests shared cohorts
    assert metric_value(after, "kronos_batch_series_sum") > metric_value(before, "kronos_batch_series_sum")
    steps = metric_value(after, "kronos_step_series_count") - metric_value(before, "kronos_step_series_count")
    lone_steps = metric_value(after, "kronos_step_series_bucket", le="1.0") - metric_value(
        before, "kronos_step_series_bucket", le="1.0"
    )
    assert steps > 0 and lone_steps < steps, (steps, lone_steps)  # series shared steps


def test_bad_inputs_get_400_and_leave_the_server_healthy(server):
    good = history(["A"], seed=1)
    unsorted = good.iloc[::-1].reset_index(drop=True)
    with_nan = good.copy()
    with_nan.loc[3, "close"] = math.nan
    cases = [
        (good.drop(columns=["close"]), {"pred_len": 2}, "close"),
        (with_nan, {"pred_len": 2}, "NaN"),
        (unsorted, {"pred_len": 2}, "increasing"),
        (history(["A"], seed=1, length=600), {"pred_len": 2}, "max_history_candles"),
        (good, {"pred_len": 10_000}, "pred_len"),
        (good, {"pred_len": "abc"}, "pred_len"),
        (good, {"pred_len": {"nested": 1}}, "pred_len"),
        (good, {"temprature": 0.5}, "unknown param"),
        (good, {"pred_len": 2, "timeout_s": "-1"}, "timeout_s"),
        (
            history([f"s{i}" for i in range(4)], seed=1, length=40),
            {"pred_len": 100, "sample_count": 64},
            "max_request_memory_mb",
        ),
    ]
    with httpx.Client(timeout=60) as client:
        for frame, params, needle in cases:
            body = json.dumps(v2_request(frame, params)).replace("NaN", "null")  # JSON has no NaN
            reply = client.post(
                f"{server.url}/v2/models/{MODEL_NAME}/infer", content=body, headers={"content-type": "application/json"}
            )
            assert reply.status_code == 400, (needle, reply.status_code, reply.text)
            assert needle in reply.json()["error"], (needle, reply.text)
        with pytest.raises(grpc.RpcError) as caught:
            grpc_infer(server, good.drop(columns=["open"]), {"pred_len": 2})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "open" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:  # a real IEEE NaN over gRPC
            grpc_infer(server, with_nan, {"pred_len": 2})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NaN" in caught.value.details()
        assert client.get(f"{server.url}/v2/health/ready").status_code == 200
        assert server.infer(client, good, {"pred_len": 2}).status_code == 200
    assert metric_value(server.metrics(), "kronos_requests_total", outcome="invalid") >= 10


def wait_metric(server, name: str, at_least: float, timeout_s: float = 120, **labels: str) -> float:
    """Poll the metrics port until `name{labels}` reaches `at_least` (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = metric_value(server.metrics(), name, **labels)
        if value >= at_least:
            return value
        assert time.monotonic() < deadline, (name, labels, value, at_least)
        time.sleep(0.1)


BLOCKER = {"pred_len": 100, "sample_count": 4, "seed": 1}
# Histories longer than the window (128) slide from the first step, so every step recomputes
# each series' window: 24 such series with BLOCKER take ~3x as long as fitting ones (6-7 s in
# one process on a fast 2-core machine, longer in the server), while costing about the same
# memory. The deadline and overload tests below need the request still running while they act.
SLIDING = 130


def test_overload_gives_503_at_once_and_clients_that_leave_free_the_worker(server, serving_registry):
    """A request that runs for a while (SLIDING), two queued behind it (no room in the running
    batch), a third refused with 503 + Retry-After because the queue's budget is taken;
    then all three clients go away: their series leave generation and the queue, and the
    next request is served at once."""
    forecaster = serving_registry.forecaster("1")
    blocker = history([f"b{i}" for i in range(24)], seed=7, length=SLIDING)
    filler = [history([f"f{j}_{i}" for i in range(16)], seed=20 + j) for j in range(3)]
    filler_cost = request_cost(forecaster, [40 + i for i in range(16)], 100, 4).memory_bytes
    queue_budget = QUEUE_BUDGET_MB * 2**20
    assert 2 * filler_cost <= queue_budget < 3 * filler_cost  # two wait, the third is refused
    before = server.metrics()
    path = f"/v2/models/{MODEL_NAME}/infer"
    with httpx.Client(timeout=120) as client:
        clients = [RawPost(server.http_port, path, v2_request(blocker, BLOCKER))]
        wait_live(client, server, lambda s: s["running"] and s["queued_series"] == 0)
        for j in range(2):
            clients.append(RawPost(server.http_port, path, v2_request(filler[j], BLOCKER)))
            wait_live(client, server, lambda s, n=16 * (j + 1): s["queued_series"] == n)
        refused = server.infer(client, filler[2], BLOCKER)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "2"
        assert "queue" in refused.json()["error"]
        with pytest.raises(grpc.RpcError) as caught:
            grpc_infer(server, filler[2], {**BLOCKER, "temperature": "1.0"})
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        for raw in clients[1:]:
            raw.close()  # the waiting clients give up: they leave the queue
        wait_live(client, server, lambda s: s["running"] and s["queued_series"] == 0)
        clients[0].close()  # then the running one: its series leave generation
        wait_live(client, server, lambda s: not s["running"], timeout_s=180)
        wait_metric(
            server,
            "kronos_requests_total",
            metric_value(before, "kronos_requests_total", outcome="cancelled") + 3,
            outcome="cancelled",
        )
        assert server.infer(client, history(["after"], seed=10), {"pred_len": 2}).status_code == 200
    after = server.metrics()
    dropped = metric_value(after, "kronos_abandoned_series_total", reason="cancelled") - metric_value(
        before, "kronos_abandoned_series_total", reason="cancelled"
    )
    assert dropped == 24  # the blocker's series left generation; the fillers never started
    assert metric_value(after, "kronos_requests_total", outcome="overloaded") >= 2
    assert metric_value(after, "kronos_queue_cost_bytes") == 0


def test_a_deadline_abandons_the_series(server):
    """The server's deadline (lowered by the client's timeout_s) ends a request with 504 and
    drops its series at the next step, well before its horizon."""
    before = metric_value(server.metrics(), "kronos_abandoned_series_total", reason="deadline")
    with httpx.Client(timeout=300) as client:
        frame = history([f"d{i}" for i in range(24)], seed=8, length=SLIDING)
        reply = server.infer(client, frame, {**BLOCKER, "timeout_s": 2})
        assert reply.status_code == 504, reply.text
        assert "deadline" in reply.json()["error"]
        wait_metric(server, "kronos_abandoned_series_total", before + 24, reason="deadline")
        wait_live(client, server, lambda s: not s["running"], timeout_s=180)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_grpc_call_that_ends_early_leaves_generation(server, how):
    """A cancelled gRPC call, or one whose client-side deadline passed, stops its work."""
    before = metric_value(server.metrics(), "kronos_abandoned_series_total", reason="cancelled")
    request = grpc_request(history([f"g{i}" for i in range(24)], seed=9, length=SLIDING), BLOCKER)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel, httpx.Client(timeout=60) as client:
        stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
        if how == "cancel":
            call = stub.ModelInfer.future(request)
            wait_live(client, server, lambda s: s["running"])
            call.cancel()
        else:
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, timeout=2)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_metric(server, "kronos_abandoned_series_total", before + 24, reason="cancelled")
        wait_live(client, server, lambda s: not s["running"], timeout_s=180)


def test_invocations_metadata_liveness_and_metrics(server, serving_registry):
    frame = history(["A", "B"], seed=4)
    split = json.loads(frame.assign(timestamp=frame["timestamp"].astype(str)).to_json(orient="split", index=False))
    with httpx.Client(timeout=60) as client:
        reply = client.post(
            f"{server.url}/invocations", json={"dataframe_split": split, "params": {"pred_len": 3, "top_k": 1}}
        )
        assert reply.status_code == 200, reply.text
        got = pd.DataFrame(reply.json()["predictions"])
        got["timestamp"] = pd.to_datetime(got["timestamp"])
        assert_same(got, serving_registry.forecaster("1").predict(frame, pred_len=3, top_k=1))
        bad = client.post(f"{server.url}/invocations", json={"dataframe_split": split, "params": {"pred_len": 0}})
        assert bad.status_code == 400, bad.text
        meta = client.get(f"{server.url}/v2/models/{MODEL_NAME}").json()
        assert meta["versions"] == ["1"]
        assert meta["parameters"]["max_batch_size"] == 32
        assert meta["parameters"]["max_batch_time"] == 0.2
        live = client.get(f"{server.url}/kronos/health/live")
        assert live.status_code == 200 and live.json()["live"] is True
    text = server.metrics()
    for name in KRONOS_METRICS:
        assert name in text, name
    assert metric_value(text, "kronos_ready") == 1
    assert metric_value(text, "kronos_model_info", model_version="1") == 1
    assert metric_value(text, "kronos_queue_budget_bytes") == QUEUE_BUDGET_MB * 2**20
    assert (
        "batch_request_queue_bucket" not in text or metric_value(text, "batch_request_queue_count") == 0
    )  # MLServer's batcher never ran


def test_promote_and_roll_back_under_load(server, serving_registry):
    frame = history(["P"], seed=8)
    params = {"pred_len": 3, "top_k": 1}
    expected = {v: serving_registry.forecaster(v).predict(frame, **params) for v in ("1", "2")}
    assert not expected["1"].equals(expected["2"])
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                reply = server.infer(client, frame, params)
                if reply.status_code != 200:
                    failures.append(f"{reply.status_code} {reply.text}")
                    continue
                body = reply.json()
                version = body["parameters"]["model_version"]
                try:
                    assert_same(response_frame(body), expected[version])
                except AssertionError as exc:
                    failures.append(f"v{version} wrong forecast: {exc}")
                seen.append(version)

    def switch_to(version: str, client: httpx.Client) -> None:
        serving_registry.set_champion(version)
        reply = client.post(f"{server.url}/v2/repository/models/{MODEL_NAME}/load")
        assert reply.status_code == 200, reply.text
        mark = len(seen)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and version not in seen[mark:]:
            time.sleep(0.2)
        assert version in seen[mark:], f"never served v{version}"

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        with httpx.Client(timeout=180) as client:
            time.sleep(1)
            switch_to("2", client)
            time.sleep(1)
            switch_to("1", client)
            time.sleep(1)
    finally:
        stop.set()
        serving_registry.set_champion("1")
        for thread in threads:
            thread.join(60)
    assert not failures, failures[:3]
    assert seen[-1] == "1" and "2" in seen
    text = server.metrics()
    assert metric_value(text, "kronos_model_info", model_version="1") == 1
    assert metric_value(text, "kronos_model_info", model_version="2") == 0
    assert metric_value(text, "kronos_ready") == 1
    assert metric_value(text, "kronos_model_version") == 1


def test_a_broken_promotion_keeps_the_old_version_serving(server, serving_registry):
    client_registry = serving_registry.client()
    broken = client_registry.create_model_version(MODEL_NAME, source=(serving_registry.root / "no-such-model").as_uri())
    frame = history(["Z"], seed=12)
    try:
        serving_registry.set_champion(str(broken.version))
        with httpx.Client(timeout=120) as client:
            reply = client.post(f"{server.url}/v2/repository/models/{MODEL_NAME}/load")
            assert reply.status_code >= 400
            assert server.process.poll() is None  # the server is still up ...
            still = server.infer(client, frame, {"pred_len": 2, "top_k": 1})
            assert still.status_code == 200, still.text  # ... and serves the old version
            assert still.json()["parameters"]["model_version"] == "1"
            assert client.get(f"{server.url}/v2/health/ready").status_code == 200
    finally:
        serving_registry.set_champion("1")
