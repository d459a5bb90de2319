"""The per-request memory budget holds for real: the largest request a server accepts keeps
the worker's peak memory under the budget plus a fixed overhead, and a request one step
larger is refused with 400 naming the budget and the cost (real MLServer process)."""

from __future__ import annotations

import itertools
from pathlib import Path

import httpx
import psutil
import pytest
from serving_helpers import history, start_server

from model_package.budget import request_cost

pytestmark = pytest.mark.integration

BUDGET_MB = 256
# What a worker may allocate for a request beyond its priced cost: the decoded request and
# response objects, torch's allocator and glibc's arenas.
OVERHEAD_MB = 96
HISTORY = 40  # candles per series; with pred_len <= 88 the tiny model's window never slides


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise KeyError(key)


def _worker_pid(server_pid: int) -> int:
    """MLServer's inference worker: the spawned child process holding the model."""
    children = [p for p in psutil.Process(server_pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert children, "no inference worker found"
    return max(children, key=lambda p: p.memory_info().rss).pid


def largest_request(forecaster, budget_bytes: int) -> tuple[int, int, int, int]:
    """(series, sample_count, pred_len, cost) of the costliest request within the budget and
    the server's limits (64 series, 64 paths), without a sliding window."""
    best = (0, 0, 0, 0)
    for series, paths, pred_len in itertools.product((16, 32, 64), (16, 32, 64), range(1, 129 - HISTORY)):
        cost = request_cost(forecaster, [HISTORY + i for i in range(series)], pred_len, paths).memory_bytes
        if best[3] < cost <= budget_bytes:
            best = (series, paths, pred_len, cost)
    return best


def test_the_largest_allowed_request_stays_within_its_budget(serving_registry, tmp_path):
    forecaster = serving_registry.forecaster("1")
    series, paths, pred_len, cost = largest_request(forecaster, BUDGET_MB << 20)
    assert cost > 0.9 * (BUDGET_MB << 20), (series, paths, pred_len, cost)
    frame = history([f"m{i}" for i in range(series)], seed=5, length=HISTORY)
    server = start_server(
        tmp_path / "mlserver",
        serving_registry.tracking_uri,
        env={
            "KRONOS_MAX_REQUEST_MEMORY_MB": str(BUDGET_MB),
            "KRONOS_RUNNING_BUDGET_MB": str(BUDGET_MB),
            "KRONOS_QUEUE_BUDGET_MB": str(BUDGET_MB),
            "KRONOS_MAX_REQUEST_CANDLES": str(10**7),
        },
    )
    try:
        worker = _worker_pid(server.process.pid)
        with httpx.Client(timeout=600) as client:
            assert server.infer(client, history(["w"], seed=1), {"pred_len": 2}).status_code == 200
            Path(f"/proc/{worker}/clear_refs").write_text("5")  # restart the peak (VmHWM) here
            baseline_kib = _status_kib(worker, "VmRSS:")
            reply = server.infer(client, frame, {"pred_len": pred_len, "sample_count": paths, "seed": 1})
            assert reply.status_code == 200, reply.text[:500]
            assert len(reply.json()["outputs"][0]["data"]) == series * pred_len
            peak_kib = _status_kib(worker, "VmHWM:")
            grown_mb = (peak_kib - baseline_kib) / 1024
            print(
                f"worker peak grew {grown_mb:.0f} MiB for a request priced {cost / 2**20:.0f} MiB "
                f"({series} series x {paths} paths x {pred_len} steps)"
            )
            assert grown_mb <= BUDGET_MB + OVERHEAD_MB, (grown_mb, cost / 2**20)
            larger = server.infer(client, frame, {"pred_len": pred_len + 8, "sample_count": paths})
            assert larger.status_code == 400, larger.text[:500]
            error = larger.json()["error"]
            assert "max_request_memory_mb" in error and f"{BUDGET_MB} MiB" in error, error
    finally:
        server.stop()
