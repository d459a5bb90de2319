"""Serving benchmarks against real MLServer processes (random weights, no network).

    python -m serving.bench throughput --clients 16 --requests 2   # batched vs unbatched
    python -m serving.bench overhead --repeats 5                    # REST vs direct call

`throughput` starts MLServer twice on free 127.0.0.1 ports, once with the series-aware
batcher (`max_batch_size` 64 series) and once with `max_batch_size` 1 (every request its
own pass), and has `--clients` concurrent clients send `--requests` forecasts each
(`--history` candles -> `--pred-len` steps). `overhead` times one REST request against
`KronosForecaster.predict` on the same input and threads (median of `--repeats`).
Both log a random-weight model of the chosen shape (`--shape small` = Kronos-small) into
a temporary sqlite registry. Run them on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient

from model_package import KronosForecaster
from model_package.kronos import KronosConfig, TokenizerConfig, write_random_checkpoint
from model_package.kronos.presets import preset_by_name
from model_package.log_model import log_kronos_model

ROOT = Path(__file__).resolve().parents[1]
SERVING = ROOT / "serving"
TINY = (TokenizerConfig(d_in=6, d_model=32, n_heads=2, ff_dim=64, n_enc_layers=3,
                        n_dec_layers=3, ffn_dropout_p=0.0, attn_dropout_p=0.0,
                        resid_dropout_p=0.0, s1_bits=8, s2_bits=8, beta=0.05, gamma0=1.0,
                        gamma=1.1, zeta=0.05, group_size=4),
        KronosConfig(s1_bits=8, s2_bits=8, n_layers=2, d_model=48, n_heads=3, ff_dim=96,
                     ffn_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0,
                     token_dropout_p=0.0, learn_te=True))


def candles(length: int, seed: int, series_id: str) -> pd.DataFrame:
    """A random-walk OHLCV series in the long format."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, length)))
    open_ = np.concatenate([[close[0]], close[:-1]])
    return pd.DataFrame({
        "series_id": series_id,
        "timestamp": pd.date_range("2024-01-02", periods=length, freq="5min"),
        "open": open_, "high": np.maximum(open_, close) * 1.002,
        "low": np.minimum(open_, close) * 0.998, "close": close,
        "volume": rng.uniform(1e3, 5e3, length),
    })


def v2_body(frame: pd.DataFrame, params: dict) -> dict:
    inputs = [{"name": "series_id", "datatype": "BYTES", "shape": [len(frame), 1],
               "data": frame["series_id"].tolist()},
              {"name": "timestamp", "datatype": "BYTES", "shape": [len(frame), 1],
               "data": [t.isoformat() for t in frame["timestamp"]]}]
    inputs += [{"name": c, "datatype": "FP64", "shape": [len(frame), 1],
                "data": frame[c].tolist()} for c in ("open", "high", "low", "close", "volume")]
    return {"inputs": inputs, "parameters": params}


def make_registry(root: Path, shape: str) -> tuple[str, Path, Path]:
    """Log random weights of `shape` as kronos@champion; returns (uri, tokenizer, model)."""
    if shape == "tiny":
        tokenizer_config, model_config, max_context = *TINY, 512
    else:
        preset = preset_by_name(shape)
        assert preset is not None, f"unknown shape {shape}"
        tokenizer_config, model_config = preset.tokenizer_config, preset.model_config
        max_context = preset.max_context
    tokenizer = write_random_checkpoint(tokenizer_config, root / "tokenizer", 1)
    model = write_random_checkpoint(model_config, root / "model", 2)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri, uri)
    experiment = client.create_experiment("bench", artifact_location=(root / "a").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_kronos_model(tokenizer, model, registered_model_name="kronos",
                                max_context=max_context, example_rows=16)
    client.set_registered_model_alias("kronos", "champion", info.registered_model_version)
    return uri, tokenizer, model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlserver(workdir: Path, tracking_uri: str, batch_series: int, threads: int
                   ) -> tuple[subprocess.Popen, str]:
    """MLServer with serving/ settings on free ports; returns (process, base URL)."""
    settings = json.loads((SERVING / "settings.json").read_text())
    http_port = free_port()
    settings.update(http_port=http_port, grpc_port=free_port(), metrics_port=free_port(),
                    metrics_dir=str(workdir / "metrics"))
    (workdir / "models" / "kronos").mkdir(parents=True)
    (workdir / "settings.json").write_text(json.dumps(settings))
    spec = json.loads((SERVING / "models" / "kronos" / "model-settings.json").read_text())
    spec["max_batch_size"] = batch_series
    (workdir / "models" / "kronos" / "model-settings.json").write_text(json.dumps(spec))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "KRONOS_DEVICE": "cpu",
           "KRONOS_TORCH_THREADS": str(threads), "KRONOS_QUEUE_CAPACITY_SERIES": "4096",
           "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([str(Path(sys.executable).with_name("mlserver")), "start",
                                str(workdir)], env=env, cwd=workdir, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/models/kronos/ready", timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError("mlserver exited")
        time.sleep(1)
    stop(process)
    raise RuntimeError("mlserver not ready in 600 s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def throughput(url: str, clients: int, requests: int, history: int, pred_len: int) -> float:
    """Forecasts per second for `clients` concurrent clients, `requests` each."""
    bodies = [v2_body(candles(history, seed=i, series_id="S"), {"pred_len": pred_len,
                                                                "top_k": 1})
              for i in range(clients)]

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
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="kronos-bench-"))
    try:
        uri, tokenizer, model = make_registry(root, args.shape)
        if args.what == "throughput":
            results = {}
            for label, batch in (("batched", 64), ("unbatched", 1)):
                process, url = start_mlserver(root / label, uri, batch, args.threads)
                try:
                    results[label] = throughput(url, args.clients, args.requests,
                                                args.history, args.pred_len)
                finally:
                    stop(process)
                print(f"{label}: {results[label]:.3f} forecasts/s", flush=True)
            print(f"speed-up: {results['batched'] / results['unbatched']:.2f}x")
        else:
            torch.set_num_threads(args.threads)
            forecaster = KronosForecaster.from_pretrained(tokenizer, model, device="cpu")
            frame = candles(args.history, seed=0, series_id="S")
            params = {"pred_len": args.pred_len, "top_k": 1}
            direct = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                forecaster.predict(frame, **params)
                direct.append(time.perf_counter() - started)
            process, url = start_mlserver(root / "overhead", uri, 64, args.threads)
            rest = []
            try:
                with httpx.Client(timeout=3600) as http:
                    for _ in range(args.repeats):
                        started = time.perf_counter()
                        http.post(f"{url}/v2/models/kronos/infer",
                                  json=v2_body(frame, params)).raise_for_status()
                        rest.append(time.perf_counter() - started)
            finally:
                stop(process)
            d, r = statistics.median(direct), statistics.median(rest)
            print(f"direct {d:.3f} s, REST {r:.3f} s, overhead {100 * (r - d) / d:+.1f}%")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
