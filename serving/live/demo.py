"""Live evidence, end to end, on this machine (`python -m serving.live.demo`, `make demo-live`).

1. A fresh sqlite registry: v1 = the demo shape with RANDOM predictor weights (champion), v2 =
   the shipped trained demo model (`model_package/demo_weights`, challenger).
2. Two MLServer processes (champion and challenger) sharing one live store, and the nginx
   gateway in front of the champion copying every REST inference request to the challenger.
3. A held-out month of daily S&P 500 and NASDAQ candles (`--month`, default 2018-11; the
   demo model never saw 2016-2018) replayed day by day: each trading day one request with the
   history up to the day before (`--context` candles, 5 days ahead, XNYS calendar), then that
   day's realised candles posted to `/kronos/live/actuals` (the admin network).
4. The live accuracy table (`kronos-registry live`), the gauges the Grafana row "Live
   accuracy" draws, and `kronos-registry promote --evidence live`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd

from model_package.data import load_indexes
from model_package.demo import DEMO_MAX_CONTEXT, demo_checkpoints
from model_package.kronos import load_model, write_random_checkpoint
from serving.gateway.process import GatewayProcess
from serving.live.store import LiveStore
from serving.loadtest.payloads import Spec, rest_body
from serving.local_server import MODEL_NAME, LocalRegistry, LocalServer, local_gateway_settings

PRED_LEN = 5
HISTORY_COLUMNS = ("series_id", "timestamp", "open", "high", "low", "close", "volume")
LIVE_METRICS = ("kronos_live_forecasts", "kronos_live_mase", "kronos_live_coverage", "kronos_live_crps")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.live.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--month", default="2018-11", help="held-out month replayed (YYYY-MM, 2016-01 .. 2018-12)")
    parser.add_argument("--context", type=int, default=128, help="history candles per request")
    parser.add_argument("--sample-count", type=int, default=16, help="sampled paths per forecast")
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp folder)")
    return parser.parse_args(argv)


def registry_with_two_versions(root: Path) -> LocalRegistry:
    tokenizer_dir, model_dir = demo_checkpoints()
    untrained = write_random_checkpoint(load_model(model_dir).config, root / "untrained-predictor", seed=3)
    registry = LocalRegistry.create(root / "registry", "kronos-live-demo")
    registry.log_version(tokenizer_dir, untrained, max_context=DEMO_MAX_CONTEXT, champion=True, example_rows=16)
    registry.log_version(tokenizer_dir, model_dir, max_context=DEMO_MAX_CONTEXT, example_rows=16)
    registry.client().set_registered_model_alias(MODEL_NAME, "challenger", "2")
    return registry


def replay(gateway: GatewayProcess, candles: pd.DataFrame, month: str, args: argparse.Namespace) -> int:
    """Request and realise every trading day of `month`, then the week after; returns requests."""
    days = sorted(candles.loc[candles["timestamp"].dt.strftime("%Y-%m") == month, "timestamp"].unique())
    if not days:
        first, last = candles["timestamp"].min(), candles["timestamp"].max()
        raise SystemExit(f"no candles in {month} (the data has {first:%Y-%m} .. {last:%Y-%m})")
    after = sorted(candles.loc[candles["timestamp"] > days[-1], "timestamp"].unique())[:PRED_LEN]
    params = {"pred_len": PRED_LEN, "sample_count": args.sample_count, "quantiles": [0.1, 0.9], "calendar": "XNYS"}
    with httpx.Client(timeout=600) as client:
        for number, day in enumerate([*days, *after]):
            if day in days:  # a forecast from the history before `day`
                history = candles[candles["timestamp"] < day].groupby("series_id").tail(args.context)
                body = rest_body(Spec(history[list(HISTORY_COLUMNS)], {**params, "seed": number}))
                url = f"{gateway.http_url}/v2/models/{MODEL_NAME}/infer"
                client.post(url, json=body, headers={"X-Request-ID": f"demo-{day:%Y%m%d}"}).raise_for_status()
            realised = candles[candles["timestamp"] == day]
            columns = ["series_id", "timestamp", "close"]
            rows = [[sid, ts.isoformat(), close] for sid, ts, close in realised[columns].to_numpy()]
            body = {"dataframe_split": {"columns": columns, "data": rows}}
            client.post(f"{gateway.http_url}/kronos/live/actuals", json=body).raise_for_status()
    return len(days)


def wait_for_copies(store_uri: str, timeout_s: float = 600.0) -> None:
    """Until the challenger (v2) has recorded as many forecast candles as the champion (v1):
    its copies are answered after the champion's, in the background."""
    from sqlalchemy import text

    query = text("SELECT model_version, count(*) FROM live_forecasts GROUP BY model_version")
    deadline = time.monotonic() + timeout_s
    with LiveStore.open(store_uri) as store:
        while True:
            with store.engine.connect() as connection:
                counts = {str(version): int(n) for version, n in connection.execute(query)}
            if counts.get("2", 0) >= counts.get("1", 0) > 0 or time.monotonic() > deadline:
                return
            time.sleep(0.5)


def gauge_lines(server: LocalServer) -> list[str]:
    """The /metrics lines of the live gauges (what the Grafana row draws)."""
    return [line for line in server.metrics().splitlines() if line.startswith(LIVE_METRICS)]


def kronos_registry(registry: LocalRegistry, store_uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.tracking_uri, "KRONOS_LIVE_STORE_URI": store_uri}
    return subprocess.run(
        [sys.executable, "-m", "registry_scripts", *args], env=env, capture_output=True, text=True, timeout=600
    )


def run(root: Path, args: argparse.Namespace) -> int:
    registry = registry_with_two_versions(root)
    store_uri = f"sqlite:///{root.resolve() / 'live.db'}"
    env = {"KRONOS_LIVE_STORE_URI": store_uri, "KRONOS_TORCH_THREADS": "1", "KRONOS_LIVE_REFRESH_S": "2"}
    print(f"registry {registry.tracking_uri}: v1 champion (untrained predictor), v2 challenger (trained demo)")
    champion = LocalServer.start(root / "champion", registry.tracking_uri, env=env)
    challenger = None
    try:
        challenger_env = {**env, "KRONOS_MODEL_URI": f"models:/{MODEL_NAME}@challenger"}
        challenger = LocalServer.start(root / "challenger", registry.tracking_uri, env=challenger_env)
        with GatewayProcess(local_gateway_settings(champion, challenger), prefix=root / "gateway") as gateway:
            print(f"gateway {gateway.http_url}: REST inference to the champion, a copy of each to the challenger")
            days = replay(gateway, load_indexes(), args.month, args)
            print(f"replayed {days} trading days of {args.month} (2 series, {PRED_LEN} days ahead) and their outcomes")
            wait_for_copies(store_uri)
            with httpx.Client(timeout=120) as client:  # refreshes the champion's gauges now
                client.get(f"{gateway.http_url}/kronos/live/accuracy").raise_for_status()
        print("\n$ kronos-registry live")
        print(kronos_registry(registry, store_uri, "live").stdout.rstrip())
        print("\nGrafana row 'Live accuracy' (Prometheus series):")
        print("\n".join(gauge_lines(champion)))
        print("\n$ kronos-registry promote --evidence live --min-forecasts 100")
        promoted = kronos_registry(registry, store_uri, "promote", "--evidence", "live", "--min-forecasts", "100")
        print((promoted.stdout + promoted.stderr).rstrip())
        return promoted.returncode
    finally:
        if challenger is not None:
            challenger.stop()
        champion.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return run(args.workdir, args)
    with tempfile.TemporaryDirectory(prefix="kronos-live-demo-") as tmp:
        return run(Path(tmp), args)


if __name__ == "__main__":
    raise SystemExit(main())
