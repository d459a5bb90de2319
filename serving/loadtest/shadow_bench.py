"""Champion latency with and without the shadow copy (`python -m serving.loadtest.shadow_bench`).

Registers the shipped trained demo model twice (v1 champion, v2 challenger) in a temporary
registry, starts the champion's MLServer and the challenger's (its process group at the
lowest CPU priority, `nice 19`, so that what is measured is waiting for the mirror, not
two generations sharing the CPU), and two gateways in front of the champion: one plain, one
copying every REST inference request to the challenger. The same keep-alive client then
alternates between the two gateways (one request to each, `--requests` times: the
machine's noise hits both alike) and the script prints the median and p90 latency of
each, their ratio, and how many copies the challenger answered (from the live store).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from model_package.data import load_index
from model_package.demo import DEMO_MAX_CONTEXT
from serving.gateway.process import GatewayProcess
from serving.live.store import LiveStore
from serving.loadtest.payloads import Spec, rest_body
from serving.local_server import MODEL_NAME, LocalServer, local_gateway_settings, register_demo_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serving.loadtest.shadow_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--requests", type=int, default=40, help="requests to each gateway")
    parser.add_argument("--history", type=int, default=200, help="candles per request (S&P 500 daily)")
    parser.add_argument("--pred-len", type=int, default=20)
    parser.add_argument("--sample-count", type=int, default=1)
    return parser.parse_args(argv)


def v2_body(history_rows: int, pred_len: int, sample_count: int) -> dict:
    """The S&P 500's last `history_rows` daily candles as a V2 REST body."""
    frame = load_index("SP500", last=history_rows)
    history = frame[["series_id", "timestamp", "open", "high", "low", "close", "volume"]]
    return rest_body(Spec(history, {"pred_len": pred_len, "sample_count": sample_count, "seed": 1}))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kronos-shadow-bench-") as tmp:
        root = Path(tmp)
        registry, tokenizer_dir, model_dir = register_demo_model(root / "registry")
        registry.log_version(tokenizer_dir, model_dir, max_context=DEMO_MAX_CONTEXT, example_rows=16)
        registry.client().set_registered_model_alias(MODEL_NAME, "challenger", "2")
        store_uri = f"sqlite:///{root / 'live.db'}"
        common = {"KRONOS_LIVE_STORE_URI": store_uri, "KRONOS_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
        champion = LocalServer.start(root / "champion", registry.tracking_uri, env=common)
        challenger = LocalServer.start(
            root / "challenger", registry.tracking_uri, env={**common, "KRONOS_MODEL_URI": "models:/kronos@challenger"}
        )
        os.setpriority(os.PRIO_PGRP, challenger.process.pid, 19)
        try:
            with (
                GatewayProcess(local_gateway_settings(champion), prefix=root / "plain") as plain,
                GatewayProcess(local_gateway_settings(champion, challenger), prefix=root / "shadowed") as shadowed,
            ):
                body = v2_body(args.history, args.pred_len, args.sample_count)
                timings: dict[str, list[float]] = {"plain": [], "shadowed": []}
                with httpx.Client(timeout=600) as client:
                    for gateway in (plain, shadowed):  # warm both paths once
                        client.post(f"{gateway.http_url}/v2/models/{MODEL_NAME}/infer", json=body).raise_for_status()
                    for _ in range(args.requests):
                        for name, gateway in (("plain", plain), ("shadowed", shadowed)):
                            started = time.perf_counter()
                            reply = client.post(f"{gateway.http_url}/v2/models/{MODEL_NAME}/infer", json=body)
                            reply.raise_for_status()
                            timings[name].append(time.perf_counter() - started)
                deadline = time.monotonic() + 600
                with LiveStore.open(store_uri) as store:
                    while time.monotonic() < deadline and challenger_rows(store) < (args.requests + 1) * args.pred_len:
                        time.sleep(1)
                    copies = challenger_rows(store) // args.pred_len
        finally:
            challenger.stop()
            champion.stop()
    plain_median, shadow_median = statistics.median(timings["plain"]), statistics.median(timings["shadowed"])
    print(f"champion latency over {args.requests} requests each, {args.history} -> {args.pred_len} candles:")
    for name in ("plain", "shadowed"):
        print(
            f"  {name:9s} median {statistics.median(timings[name]):.3f} s   p90 {percentile(timings[name], 0.9):.3f} s"
        )
    print(f"  shadowed / plain median ratio: {shadow_median / plain_median:.3f}")
    print(f"  copies the challenger answered and recorded: {copies} of {args.requests + 1}")
    return 0


def challenger_rows(store: LiveStore) -> int:
    """Forecast candles recorded by the challenger (v2)."""
    from sqlalchemy import text

    with store.engine.connect() as connection:
        return int(
            connection.execute(text("SELECT count(*) FROM live_forecasts WHERE model_version = '2'")).scalar_one()
        )


if __name__ == "__main__":
    raise SystemExit(main())
