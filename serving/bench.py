"""Serving benchmarks against real MLServer processes (random weights, no network).

    python -m serving.bench throughput --clients 16 --requests 2   # batched vs unbatched
    python -m serving.bench throughput --mode rolling               # the same in rolling mode
    python -m serving.bench overhead --repeats 5                    # REST vs direct call

`throughput` starts MLServer twice on free 127.0.0.1 ports, once with the series-aware
batcher (`max_batch_size` 64 series) and once with `max_batch_size` 1 (every request its
own pass), and has `--clients` concurrent clients send `--requests` forecasts each
(`--history` candles -> `--pred-len` steps, generation mode `--mode`, precision `--dtype`).
`overhead` times one REST request against `KronosForecaster.predict` on the same input and
threads (median of `--repeats`).
Both log a random-weight model of the chosen shape (`--shape small` = Kronos-small, or
`tiny` for a quick try) into a temporary sqlite registry (`serving.local_server`). The
servers' budgets (`KRONOS_MAX_REQUEST_MEMORY_MB`, `KRONOS_QUEUE_BUDGET_MB`,
`KRONOS_RUNNING_BUDGET_MB`) are sized from the request's cost
(`model_package.budget.request_cost`) so that every client's request fits at once: no 503,
and only `max_batch_size` differs between the two runs. Run them on an otherwise idle
machine.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
import torch

from model_package import KronosForecaster
from model_package.budget import request_cost
from model_package.data import random_walk_candles
from model_package.kronos.precision import PRECISIONS
from model_package.settings import MIB
from serving.loadtest.payloads import Spec, rest_body
from serving.local_server import (
    LocalServer,
    random_shape,
    register_random_model,
    shape_forecaster,
)

START_TIMEOUT_S = 600


def series(history: int, seed: int) -> pd.DataFrame:
    """One random-walk series "S" of `history` candles (no amount: the model derives it)."""
    return random_walk_candles(history, seed, start="2024-01-02", series_id="S", amount=False)


def budget_env(forecaster: KronosForecaster, clients: int, history: int, pred_len: int) -> dict[str, str]:
    """Budgets that hold every client's request at once, queued or running: neither a 503
    nor the running budget shapes the comparison, only `max_batch_size` does."""
    cost = request_cost(forecaster, [history], pred_len, 1)
    request_mb = math.ceil(cost.memory_bytes / MIB)
    everyone_mb = clients * request_mb
    return {
        "KRONOS_MAX_REQUEST_MEMORY_MB": str(request_mb),
        "KRONOS_QUEUE_BUDGET_MB": str(everyone_mb),
        "KRONOS_RUNNING_BUDGET_MB": str(everyone_mb),
    }


def start_server(
    workdir: Path,
    tracking_uri: str,
    batch_series: int,
    threads: int,
    budgets: dict[str, str],
    mode: str = "fast",
    dtype: str = "float32",
) -> LocalServer:
    """MLServer with serving/ settings on free ports, `max_batch_size` = `batch_series`,
    generating in `dtype` (KRONOS_DTYPE)."""
    return LocalServer.start(
        workdir,
        tracking_uri,
        env={"KRONOS_TORCH_THREADS": str(threads), "KRONOS_GENERATION_MODE": mode, "KRONOS_DTYPE": dtype, **budgets},
        model_settings={"max_batch_size": batch_series},
        timeout_s=START_TIMEOUT_S,
    )


def throughput(url: str, clients: int, requests: int, history: int, pred_len: int) -> float:
    """Forecasts per second for `clients` concurrent clients, `requests` each."""
    bodies = [rest_body(Spec(series(history, seed=i), {"pred_len": pred_len, "top_k": 1})) for i in range(clients)]

    def client(body: dict) -> None:
        with httpx.Client(timeout=3600) as http:
            for _ in range(requests):
                reply = http.post(f"{url}/v2/models/kronos/infer", json=body)
                reply.raise_for_status()

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, bodies))
    return clients * requests / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.bench")
    parser.add_argument("what", choices=("throughput", "overhead"))
    parser.add_argument("--shape", default="small", help="small, base, mini or tiny")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--history", type=int, default=400)
    parser.add_argument("--pred-len", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--mode", default="fast", choices=("fast", "rolling"), help="generation mode of the server")
    parser.add_argument("--dtype", default="float32", choices=PRECISIONS, help="the servers' KRONOS_DTYPE")
    args = parser.parse_args(argv)
    try:
        shape = random_shape(args.shape)
    except ValueError as error:
        parser.error(str(error))
    root = Path(tempfile.mkdtemp(prefix="kronos-bench-"))
    try:
        registry, tokenizer, model = register_random_model(root, args.shape, experiment="bench")
        uri = registry.tracking_uri
        if args.what == "throughput":
            budgets = budget_env(shape_forecaster(shape), args.clients, args.history, args.pred_len)
            results = {}
            for label, batch in (("batched", 64), ("unbatched", 1)):
                with start_server(root / label, uri, batch, args.threads, budgets, args.mode, args.dtype) as server:
                    results[label] = throughput(server.url, args.clients, args.requests, args.history, args.pred_len)
                print(f"{label}: {results[label]:.3f} forecasts/s", flush=True)
            print(f"speed-up: {results['batched'] / results['unbatched']:.2f}x")
        else:
            torch.set_num_threads(args.threads)
            forecaster = KronosForecaster.from_pretrained(tokenizer, model, device="cpu")
            frame = series(args.history, seed=0)
            params = {"pred_len": args.pred_len, "top_k": 1}
            direct = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                forecaster.predict(frame, **params)
                direct.append(time.perf_counter() - started)
            budgets = budget_env(shape_forecaster(shape), 1, args.history, args.pred_len)
            rest = []
            with (
                start_server(root / "overhead", uri, 64, args.threads, budgets) as server,
                httpx.Client(timeout=3600) as http,
            ):
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    http.post(
                        f"{server.url}/v2/models/kronos/infer", json=rest_body(Spec(frame, params))
                    ).raise_for_status()
                    rest.append(time.perf_counter() - started)
            d, r = statistics.median(direct), statistics.median(rest)
            print(f"direct {d:.3f} s, REST {r:.3f} s, overhead {100 * (r - d) / d:+.1f}%")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
