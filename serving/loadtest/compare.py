"""Throughput and latency with batching on vs off (`python -m serving.loadtest.compare`).

Registers the shipped trained demo model (`model_package.demo`; `--preset SHAPE`: random
weights of a published shape instead, said in the output) once in a temporary registry,
then for each `max_batch_size` (default 64 = the shipped setting, and 1 = batching off: one
series in generation at a time) starts MLServer on free ports, runs the locustfile headless
with the same users, pauses and payload seed, and prints one table: requests, failures,
req/s, latency percentiles of accepted requests (REST and gRPC together), 503s and peak RSS
of the server.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from serving.loadtest.soak import MB, Row, RssSampler, accepted, overloaded, run_locust
from serving.local_server import ROOT, LocalServer, describe_weights, random_shape, register_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.loadtest.compare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batch-sizes", default="64,1", help="comma-separated max_batch_size values (series generated at once)"
    )
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--wait", default="0.1,0.5", help="min,max pause between requests (s)")
    parser.add_argument("--max-candles", type=int, default=256)
    parser.add_argument(
        "--preset",
        default=None,
        help="serve RANDOM weights of this shape (tiny, mini, small, base) instead of the shipped "
        "trained demo model (the default)",
    )
    parser.add_argument("--torch-threads", type=int, default=1, help="KRONOS_TORCH_THREADS")
    parser.add_argument("--report-dir", type=Path, default=ROOT / "loadtest-reports" / "compare")
    args = parser.parse_args(argv)
    if args.preset is not None:
        try:
            random_shape(args.preset)
        except ValueError as error:
            parser.error(str(error))
    return args


def weighted(rows: list[Row], attr: str) -> float:
    """Request-weighted mean of a per-name percentile (an approximation across names)."""
    total = sum(r.requests for r in rows)
    return sum(getattr(r, attr) * r.requests for r in rows) / total if total else 0.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wait = tuple(float(v) for v in args.wait.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="kronos-compare-"))
    lines = [
        f"{'max_batch_size':>14} {'reqs':>5} {'fail':>5} {'503':>5} {'req/s':>6} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'peak RSS MiB':>12}"
    ]
    try:
        print(f"compare: registering {describe_weights(args.preset)}", flush=True)
        registry, _, _ = register_model(workdir, args.preset, experiment="kronos-loadtest")
        for size in (int(v) for v in args.batch_sizes.split(",")):
            with (
                LocalServer.start(
                    workdir / f"server-{size}",
                    registry.tracking_uri,
                    {"KRONOS_TORCH_THREADS": str(args.torch_threads)},
                    {"max_batch_size": size},
                ) as stack,
                RssSampler(stack) as sampler,
            ):
                started = time.monotonic()
                rows = run_locust(
                    stack,
                    args.report_dir / f"batch{size}",
                    args.users,
                    args.seconds,
                    (wait[0], wait[-1]),
                    args.max_candles,
                )
                elapsed = time.monotonic() - started
            ok = accepted(rows)
            done = sum(r.requests - r.failures for r in ok)
            # without 503s Locust's "Aggregated" row has the exact percentiles of all
            # accepted requests; with them, a request-weighted mean of REST's and gRPC's
            latency = [rows["Aggregated"]] if not overloaded(rows) else ok
            lines.append(
                f"{size:>14} {sum(r.requests for r in ok):>5} {sum(r.failures for r in ok):>5} "
                f"{sum(r.requests for r in overloaded(rows)):>5} {done / elapsed:>6.2f} "
                f"{weighted(latency, 'p50'):>7.0f} {weighted(latency, 'p95'):>7.0f} "
                f"{weighted(latency, 'p99'):>7.0f} {sampler.peak() / MB:>12.0f}"
            )
            print(lines[-1], flush=True)
        print(
            f"{args.users} users, {args.seconds} s each, pauses {args.wait} s, "
            f"{describe_weights(args.preset)}, {args.torch_threads} torch thread(s); req/s = "
            "answered requests / wall time of the run (incl. the drain of in-flight ones)"
        )
        print("\n".join(lines))
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
