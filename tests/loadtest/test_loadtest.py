"""The load-test kit: payloads are real candles and decode as the server decodes them
(REST and gRPC), and the locustfile loads with both users.

Locust monkey-patches the interpreter with gevent when imported, so it only ever runs in
a subprocess here; the payload checks use `serving.loadtest.payloads` (no Locust). Live
runs against a real server are `make loadtest` and `make soak` (too slow for the suite
on two shared cores: about 90 s).
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlserver.grpc.converters import ModelInferRequestConverter
from mlserver.types import InferenceRequest

from model_package.data import load_index
from model_package.pyfunc import sampling_params
from serving.loadtest import compare
from serving.loadtest.payloads import (
    INDEXES,
    PayloadMix,
    candle_pool,
    grpc_request,
    make_spec,
    rest_body,
)
from serving.loadtest.soak import (
    MB,
    OVERLOAD_SUFFIX,
    Row,
    check,
    load_cost,
    parse_args,
    read_stats,
)
from serving.local_server import demo_shape, describe_weights, model_shape, random_shape, shape_forecaster
from serving.v2 import request_frame, request_params

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "serving" / "loadtest" / "locustfile.py"
COLUMNS = ["series_id", "timestamp", "open", "high", "low", "close", "volume"]


def _same_history(decoded: pd.DataFrame, expected: pd.DataFrame) -> None:
    decoded = decoded[COLUMNS].copy()
    decoded["timestamp"] = pd.to_datetime(decoded["timestamp"])
    pd.testing.assert_frame_equal(decoded.reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # mlserver gRPC converters
def test_payloads_are_real_candles_in_both_encodings() -> None:
    pool = candle_pool()
    assert set(pool) == set(INDEXES)
    for name in INDEXES:
        pd.testing.assert_frame_equal(pool[name], load_index(name))
    rng = random.Random(3)
    specs = [make_spec(rng, PayloadMix()) for _ in range(24)]
    assert {s.n_series for s in specs} == {1, 2, 3}
    assert any(s.params.get("top_k") == 1 for s in specs)
    assert any(s.params.get("sample_count", 1) > 1 for s in specs)
    assert any("quantiles" in s.params for s in specs)
    assert len({s.params["pred_len"] for s in specs}) > 1
    for spec in specs:
        for sid, part in spec.history.groupby("series_id"):
            index = str(sid).split("@")[0]
            real = pool[index].set_index("timestamp").loc[part["timestamp"], "close"]
            assert (real.to_numpy() == part["close"].to_numpy()).all()
        expected = sampling_params(spec.params)
        rest = InferenceRequest.model_validate(rest_body(spec))
        _same_history(request_frame(rest), spec.history)
        assert sampling_params(request_params(rest)) == expected
        grpc = ModelInferRequestConverter.to_types(grpc_request(spec))
        _same_history(request_frame(grpc), spec.history)
        assert sampling_params(request_params(grpc)) == expected


def test_locustfile_loads_with_both_users() -> None:
    listed = subprocess.run(
        [str(Path(sys.executable).with_name("locust")), "-f", str(LOCUSTFILE), "--list"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "RestUser" in listed.stdout and "GrpcUser" in listed.stdout


def test_locustfile_builds_its_payload_pool() -> None:
    script = (
        "import runpy, sys; ns = runpy.run_path(sys.argv[1]); pool = ns['payload_pool'](None);"
        "assert len(pool) == ns['POOL_SIZE'];"
        "assert all(r.model_name == 'kronos' and len(b['inputs']) == 7 for _, b, r in pool);"
        "print(sum(s.n_series for s, _, _ in pool))"
    )
    built = subprocess.run(
        [sys.executable, "-c", script, str(LOCUSTFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    assert int(built.stdout.split()[-1]) > 48  # some requests hold several series


def _rows(**named: tuple[int, int, float]) -> dict[str, Row]:
    """Stats rows from name -> (requests, failures, p95 ms)."""
    rows = {
        name.replace("_", " "): Row(name.replace("_", " "), n, f, 1.0, p95 / 2, p95, p95, p95)
        for name, (n, f, p95) in named.items()
    }
    rows["Aggregated"] = Row("Aggregated", 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
    return rows


def test_soak_rules() -> None:
    args = parse_args(["--max-rss-growth-mb", "100", "--max-503-p95-s", "1"])
    below = _rows(REST_infer=(10, 0, 900.0))
    overload = "REST infer" + OVERLOAD_SUFFIX
    above = {**_rows(REST_infer=(5, 0, 900.0)), overload: Row(overload, 40, 40, 1, 50, 80, 90, 95)}
    assert check({"below": below, "above": above}, 1000 * MB, 1050 * MB, args) == []
    slow = {**above, overload: Row(overload, 40, 40, 1, 900, 1500, 1600, 1700)}
    assert any("p95" in p for p in check({"below": below, "above": slow}, 0, 0, args))
    assert any("no 503" in p for p in check({"below": below, "above": below}, 0, 0, args))
    failing = _rows(REST_infer=(10, 1, 900.0))
    assert any("1 failed" in p for p in check({"below": failing, "above": above}, 0, 0, args))
    assert any("RSS grew" in p for p in check({"below": below, "above": above}, 0, 200 * MB, args))


def test_soak_and_compare_serve_the_trained_demo_model_by_default() -> None:
    """`--preset` unset: `register_model(workdir, None)` = the shipped demo pair (checked
    byte for byte in tests/serving/test_demo_model.py), priced with the demo's shape."""
    from model_package.demo import DEMO_MAX_CONTEXT, DEMO_MODEL_CONFIG, DEMO_TOKENIZER_CONFIG

    assert parse_args([]).preset is None
    assert compare.parse_args([]).preset is None
    assert model_shape(None) == demo_shape()
    assert (demo_shape().tokenizer, demo_shape().model, demo_shape().max_context) == (
        DEMO_TOKENIZER_CONFIG,
        DEMO_MODEL_CONFIG,
        DEMO_MAX_CONTEXT,
    )
    assert "trained demo model" in describe_weights(None)
    # random weights only when a published shape is asked for, and then said so
    assert parse_args(["--preset", "small"]).preset == compare.parse_args(["--preset", "small"]).preset == "small"
    assert model_shape("small") == random_shape("small")
    assert "RANDOM" in describe_weights("small")
    with pytest.raises(SystemExit):
        compare.parse_args(["--preset", "huge"])
    with pytest.raises(SystemExit):
        parse_args(["--preset", "huge"])


def test_soak_prices_the_load_with_the_served_model() -> None:
    from model_package.budget import request_cost

    demo, small = load_cost(None, 3, 256), load_cost("small", 3, 256)
    expected = request_cost(shape_forecaster(demo_shape()), [256] * 3, demo.pred_len, demo.sample_count)
    assert demo.worst_bytes == expected.memory_bytes
    assert demo.worst_bytes < small.worst_bytes  # the demo model is much smaller than Kronos-small
    assert parse_args(["--preset", "small"]).queue_budget_mb == 2 * small.request_mb


def test_soak_queue_budget_is_sized_from_the_load_cost() -> None:
    cost = load_cost(None, 3, 256)  # the defaults' costliest request (the demo model)
    assert (cost.series, cost.candles, cost.pred_len, cost.sample_count) == (3, 256, 30, 4)
    assert parse_args([]).queue_budget_mb == 2 * cost.request_mb  # 2 users below
    worst_mb = cost.worst_bytes / MB
    assert parse_args(["--queue-budget-mb", f"{math.ceil(2000 * worst_mb) / 1000}"])
    with pytest.raises(SystemExit):  # phase below could fill the queue
        parse_args(["--below-users", "3", "--queue-budget-mb", f"{2.5 * worst_mb:.3f}"])
    with pytest.raises(SystemExit):  # no request of the load fits
        parse_args(["--below-users", "1", "--queue-budget-mb", f"{0.5 * worst_mb:.3f}"])
    with pytest.raises(SystemExit):  # above: 12 users, 8 series running, 4 queued at most
        parse_args(["--queue-budget-mb", f"{4 * cost.request_mb}"])
    assert parse_args(["--queue-budget-mb", f"{4 * cost.request_mb}", "--max-batch-size", "4"])


def test_read_stats(tmp_path: Path) -> None:
    path = tmp_path / "run_stats.csv"
    path.write_text(
        "Type,Name,Request Count,Failure Count,Median Response Time,"
        "Average Response Time,Min Response Time,Max Response Time,"
        "Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,"
        "99%,99.9%,99.99%,100%\n"
        "POST,REST infer,7,0,120,130,90,400,9000,1.5,0,120,130,140,150,200,300,350,"
        "390,400,400,400\n"
        ",Aggregated,7,0,120,130,90,400,9000,1.5,0,120,N/A,140,150,200,300,350,"
        "390,400,400,400\n"
    )
    rows = read_stats(path)
    assert rows["REST infer"] == Row("REST infer", 7, 0, 1.5, 120, 300, 390, 400)
    assert rows["Aggregated"].requests == 7
