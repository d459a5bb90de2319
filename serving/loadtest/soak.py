"""Bounded soak of a local Kronos stack (`make soak` = `python -m serving.loadtest.soak`).

1. Registers the shipped trained demo model (`model_package.demo`; `--preset SHAPE`:
   random weights of a published shape instead, said in the output) in a temporary sqlite
   registry and starts `mlserver start` on free 127.0.0.1 ports (`serving.local_server`)
   with a small queue budget (`KRONOS_QUEUE_BUDGET_MB`) and batch (`max_batch_size`:
   series in generation at once), so that overload is reachable. The load's costliest
   request (`--max-series` series of `--max-candles` candles at the payload mix's longest
   horizon and most sample paths, priced by `model_package.budget.request_cost` for the
   served model's shape) is the per-request budget (`KRONOS_MAX_REQUEST_MEMORY_MB`), so no
   request of the load is refused as too large.
2. Phase "below": so few users that even all their requests at their costliest fit the
   queue budget (the default budget is exactly that) -> no failed request at all.
3. Phase "above": many more users than the queue budget and the batch can hold -> some
   503s, fast (p95 under `--max-503-p95-s`), and every accepted request still succeeds.
4. Server RSS (the mlserver process tree, sampled every second) may grow by at most
   `--max-rss-growth-mb` from the end of phase "below" to the end of the run, measured
   once the server is idle again (requests still generating hold their caches).
5. `/v2/health/ready` is 200 afterwards and one more forecast succeeds.

Prints a summary table and exits 1 on any violation. Locust runs as a subprocess per
phase with the project's locustfile; CSV/HTML reports land in `--report-dir`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import httpx

from serving.local_server import (
    MODEL_NAME,
    ROOT,
    SERVING,
    LocalServer,
    describe_weights,
    model_shape,
    register_model,
    shape_forecaster,
    venv_script,
)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
OVERLOAD_SUFFIX = " [503 overloaded]"
MB = 1024 * 1024


# -- what the load costs ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoadCost:
    """The costliest request of the load and the server settings sized from it."""

    worst_bytes: int  # memory of the costliest request (model_package.budget.request_cost)
    series: int
    candles: int
    pred_len: int
    sample_count: int

    @property
    def request_mb(self) -> int:
        """The per-request budget that admits every request of the load (whole MiB)."""
        return math.ceil(self.worst_bytes / MB)

    def describe(self) -> str:
        return (
            f"{self.worst_bytes / MB:.1f} MiB for {self.series} series x {self.candles} "
            f"candles -> {self.pred_len} steps x {self.sample_count} paths"
        )


@lru_cache(maxsize=4)
def load_cost(preset: str | None, max_series: int, max_candles: int) -> LoadCost:
    """The costliest request the locustfile can send with these options, priced for the
    model `register_model` serves for `preset` (None: the shipped demo model; mode "fast",
    the soaked server's)."""
    from model_package.budget import request_cost
    from serving.loadtest.payloads import PayloadMix

    # the locustfile's mix (see `payload_pool`): windows of min_candles..max_candles
    mix = PayloadMix(max_candles=max(PayloadMix.min_candles + 1, max_candles), max_series=max_series)
    pred_len, paths = max(mix.horizons), max(mix.sample_counts)
    forecaster = shape_forecaster(model_shape(preset))
    cost = request_cost(forecaster, [mix.max_candles] * mix.max_series, pred_len, paths)
    return LoadCost(cost.memory_bytes, mix.max_series, mix.max_candles, pred_len, paths)


def batch_series(max_batch_size: int) -> int:
    """Series the soaked server generates at once: `--max-batch-size`, or for 0 the shipped
    model-settings.json's `max_batch_size` (else the batcher's default)."""
    if max_batch_size:
        return max_batch_size
    spec = json.loads((SERVING / "models" / MODEL_NAME / "model-settings.json").read_text())
    if "max_batch_size" in spec:
        return int(spec["max_batch_size"])
    from serving.batcher import BatcherConfig

    return BatcherConfig().max_batch_series


def server_env(args: argparse.Namespace, cost: LoadCost) -> dict[str, str]:
    """The soaked server's budgets and threads."""
    from serving.batcher import BatcherConfig

    running_mb = max(cost.request_mb, math.ceil(BatcherConfig().running_budget_bytes / MB))
    return {
        "KRONOS_QUEUE_BUDGET_MB": str(args.queue_budget_mb),
        "KRONOS_MAX_REQUEST_MEMORY_MB": str(cost.request_mb),
        "KRONOS_RUNNING_BUDGET_MB": str(running_mb),
        "KRONOS_TORCH_THREADS": str(args.torch_threads),
    }


# -- running Locust --------------------------------------------------------------------------


@dataclass
class Row:
    """One line of Locust's `_stats.csv` (times in ms)."""

    name: str
    requests: int
    failures: int
    rps: float
    p50: float
    p95: float
    p99: float
    max: float


def run_locust(
    stack: LocalServer,
    prefix: Path,
    users: int,
    seconds: int,
    wait: tuple[float, float],
    max_candles: int,
    seed: int = 0,
    extra_env: dict[str, str] | None = None,
    stop_timeout_s: int = 120,
) -> dict[str, Row]:
    """Run the locustfile headless for `seconds`; returns its stats rows by name."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        venv_script("locust"),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds}s",
        "--stop-timeout",
        str(stop_timeout_s),
        "--only-summary",
        "--host",
        stack.url,
        "--grpc-target",
        stack.grpc_target,
        "--wait-min",
        str(wait[0]),
        "--wait-max",
        str(wait[1]),
        "--max-candles",
        str(max_candles),
        "--payload-seed",
        str(seed),
        "--csv",
        str(prefix),
        "--html",
        f"{prefix}.html",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "LOADTEST_"))}
    env.update(extra_env or {})
    with (prefix.parent / f"{prefix.name}.log").open("wb") as out:
        subprocess.run(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            timeout=seconds + stop_timeout_s + 120,
            check=False,
        )
    return read_stats(Path(f"{prefix}_stats.csv"))


def read_stats(path: Path) -> dict[str, Row]:
    """Locust's stats CSV by request name (the total is under "Aggregated")."""
    if not path.exists():
        raise RuntimeError(f"locust wrote no {path} (see {path.parent})")
    rows = {}
    with path.open() as handle:
        for rec in csv.DictReader(handle):

            def num(key: str, rec: dict[str, str] = rec) -> float:
                value = rec.get(key) or "0"
                return float(value) if value != "N/A" else 0.0

            rows[rec["Name"]] = Row(
                rec["Name"],
                int(num("Request Count")),
                int(num("Failure Count")),
                num("Requests/s"),
                num("50%"),
                num("95%"),
                num("99%"),
                num("Max Response Time"),
            )
    return rows


# -- memory sampling -------------------------------------------------------------------------


@dataclass
class RssSampler:
    """Samples the stack's RSS every `every_s` seconds in a thread, labelled by phase."""

    stack: LocalServer
    every_s: float = 1.0
    phase: str = "start"
    samples: list[tuple[str, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((self.phase, self.stack.rss_bytes()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def now(self) -> int:
        value = self.stack.rss_bytes()
        self.samples.append((self.phase, value))
        return value

    def peak(self, phase: str | None = None) -> int:
        return max((v for p, v in self.samples if phase in (None, p)), default=0)


# -- the soak --------------------------------------------------------------------------------


def accepted(rows: dict[str, Row]) -> list[Row]:
    return [r for n, r in rows.items() if n != "Aggregated" and not n.endswith(OVERLOAD_SUFFIX)]


def overloaded(rows: dict[str, Row]) -> list[Row]:
    return [r for n, r in rows.items() if n.endswith(OVERLOAD_SUFFIX)]


def summary(phases: dict[str, dict[str, Row]], sampler: RssSampler) -> str:
    """A plain-text table: one line per phase and request name."""
    lines = [
        f"{'phase':<6} {'name':<34} {'reqs':>6} {'fail':>5} {'req/s':>6} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7}"
    ]
    for phase, rows in phases.items():
        total = sum(r.requests for r in accepted(rows) + overloaded(rows))
        refused = sum(r.requests for r in overloaded(rows))
        for row in rows.values():
            if row.name == "Aggregated":
                continue
            lines.append(
                f"{phase:<6} {row.name:<34} {row.requests:>6} {row.failures:>5} "
                f"{row.rps:>6.2f} {row.p50:>7.0f} {row.p95:>7.0f} {row.p99:>7.0f} "
                f"{row.max:>7.0f}"
            )
        share = refused / total if total else 0.0
        lines.append(
            f"{phase:<6} {'503 share':<34} {refused}/{total} = {share:.1%}; peak RSS {sampler.peak(phase) / MB:.0f} MiB"
        )
    lines.append(f"peak RSS of the mlserver process tree over the run: {sampler.peak() / MB:.0f} MiB")
    return "\n".join(lines)


def check(phases: dict[str, dict[str, Row]], rss_after_below: int, rss_end: int, args: argparse.Namespace) -> list[str]:
    """The soak's acceptance rules; returns the violations."""
    problems = []
    below, above = phases["below"], phases["above"]
    if not accepted(below) or sum(r.requests for r in accepted(below)) == 0:
        problems.append("below capacity: no request completed")
    failed = sum(r.failures for r in below.values() if r.name != "Aggregated")
    if failed:
        problems.append(f"below capacity: {failed} failed requests (want 0)")
    refused = overloaded(above)
    if not refused or sum(r.requests for r in refused) == 0:
        problems.append("above capacity: no 503 at all (raise --above-users or lower --queue-budget-mb)")
    for row in refused:
        if row.p95 > args.max_503_p95_s * 1000:
            problems.append(f"above capacity: {row.name} p95 {row.p95:.0f} ms > {args.max_503_p95_s * 1000:.0f} ms")
    for row in accepted(above):
        if row.failures:
            problems.append(f"above capacity: {row.failures} accepted {row.name} requests failed (want 0)")
    if sum(r.requests - r.failures for r in accepted(above)) == 0:
        problems.append("above capacity: no request was accepted and answered")
    growth = (rss_end - rss_after_below) / MB
    if growth > args.max_rss_growth_mb:
        problems.append(f"RSS grew {growth:.0f} MiB after phase 'below' (bound {args.max_rss_growth_mb} MiB)")
    return problems


def final_forecast(stack: LocalServer) -> bool:
    """One more small real-candle forecast after the soak."""
    import random

    from serving.loadtest.payloads import PayloadMix, expected_rows, make_spec, rest_body

    spec = make_spec(random.Random(7), PayloadMix(max_candles=64, max_series=1))
    reply = httpx.post(f"{stack.url}/v2/models/{MODEL_NAME}/infer", json=rest_body(spec), timeout=120)
    return reply.status_code == 200 and int(reply.json()["outputs"][0]["shape"][0]) == expected_rows(spec)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.loadtest.soak", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds",
        type=int,
        default=int(os.environ.get("SOAK_SECONDS", 60)),
        help="length of each phase (s); SOAK_SECONDS",
    )
    parser.add_argument(
        "--queue-budget-mb",
        type=float,
        default=0.0,
        help="KRONOS_QUEUE_BUDGET_MB of the soaked server (MiB of queued "
        "requests' cost); 0 = below-users x the load's costliest request",
    )
    parser.add_argument(
        "--below-users",
        type=int,
        default=2,
        help="users of phase 'below' (all their costliest requests must fit the queue budget)",
    )
    parser.add_argument("--above-users", type=int, default=12, help="users of phase 'above'")
    parser.add_argument("--max-series", type=int, default=3, help="most series per request")
    parser.add_argument("--max-candles", type=int, default=256, help="longest history (candles)")
    parser.add_argument(
        "--preset",
        default=None,
        help="serve RANDOM weights of this shape (tiny, mini, small, base) instead of the shipped "
        "trained demo model (the default)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="max_batch_size (series generated at once; 1 = batching off; 0 = "
        "the shipped model-settings.json). The server holds this many "
        "series in generation plus the queue, so a small value keeps "
        "phase 'above' over capacity",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="KRONOS_TORCH_THREADS (1 leaves a core to the event loop)"
    )
    parser.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=300.0,
        help="allowed RSS growth from the end of phase 'below' to the end",
    )
    parser.add_argument("--max-503-p95-s", type=float, default=1.0, help="allowed p95 latency of 503 answers (s)")
    parser.add_argument("--report-dir", type=Path, default=ROOT / "loadtest-reports" / "soak")
    parser.add_argument(
        "--honor-retry-after", action="store_true", help="users pause Retry-After seconds after a 503 (default: retry)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary state dir")
    args = parser.parse_args(argv)
    try:
        cost = load_cost(args.preset, args.max_series, args.max_candles)
    except ValueError as error:
        parser.error(str(error))
    if not args.queue_budget_mb:
        args.queue_budget_mb = float(args.below_users * cost.request_mb)
    for problem in budget_problems(args, cost):
        parser.error(problem)
    return args


def budget_problems(args: argparse.Namespace, cost: LoadCost) -> list[str]:
    """Why a queue budget cannot give the two phases their outcomes (none: it can). A request
    is refused (503) when the queued requests' cost plus its own exceeds the budget."""
    budget = args.queue_budget_mb * MB
    problems = []
    if cost.request_mb * MB > budget:
        problems.append(
            f"the load's costliest request ({cost.describe()}) needs a per-request "
            f"budget of {cost.request_mb} MiB, over --queue-budget-mb "
            f"{args.queue_budget_mb:g}: raise it"
        )
    if args.below_users * cost.worst_bytes > budget:
        problems.append(
            f"phase 'below' could fill the queue: below-users x the costliest "
            f"request = {args.below_users} x {cost.worst_bytes / MB:.1f} MiB > "
            f"--queue-budget-mb {args.queue_budget_mb:g}"
        )
    # every running request holds at least one of the batch's series, so at most that many
    # requests run at once: only the other users' requests can be queued
    queued = args.above_users - batch_series(args.max_batch_size)
    if queued * cost.worst_bytes <= budget:
        problems.append(
            f"phase 'above' can never fill the queue: (above-users - series "
            f"running at once) x the costliest request = {max(queued, 0)} x "
            f"{cost.worst_bytes / MB:.1f} MiB <= --queue-budget-mb "
            f"{args.queue_budget_mb:g} (raise --above-users or lower "
            "--max-batch-size)"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cost = load_cost(args.preset, args.max_series, args.max_candles)
    workdir = Path(tempfile.mkdtemp(prefix="kronos-soak-"))
    stack: LocalServer | None = None
    try:
        print(f"soak: registering {describe_weights(args.preset)} under {workdir}", flush=True)
        registry, _, _ = register_model(workdir, args.preset, experiment="kronos-loadtest")
        settings = {"max_batch_size": args.max_batch_size} if args.max_batch_size else None
        started = time.monotonic()
        stack = LocalServer.start(workdir / "server", registry.tracking_uri, server_env(args, cost), settings)
        print(
            f"soak: mlserver ready in {time.monotonic() - started:.0f} s on {stack.url} "
            f"(gRPC {stack.grpc_target}), queue budget {args.queue_budget_mb:g} MiB, "
            f"per-request budget {cost.request_mb} MiB (costliest request of the load: "
            f"{cost.describe()})",
            flush=True,
        )
        phases: dict[str, dict[str, Row]] = {}
        args.report_dir.mkdir(parents=True, exist_ok=True)
        load = {
            "max_candles": args.max_candles,
            "extra_env": {
                "LOADTEST_MAX_SERIES": str(args.max_series),
                "LOADTEST_HONOR_RETRY_AFTER": str(args.honor_retry_after).lower(),
            },
        }
        with RssSampler(stack) as sampler:
            sampler.phase = "below"
            print(f"soak: phase below: {args.below_users} users, {args.seconds} s", flush=True)
            phases["below"] = run_locust(
                stack, args.report_dir / "below", args.below_users, args.seconds, (0.2, 1.0), **load
            )
            rss_after_below = sampler.now()
            sampler.phase = "above"
            print(f"soak: phase above: {args.above_users} users, {args.seconds} s", flush=True)
            phases["above"] = run_locust(
                stack, args.report_dir / "above", args.above_users, args.seconds, (0.05, 0.3), seed=1, **load
            )
            sampler.phase = "after"
            stack.wait_idle(timeout_s=300)  # requests still running hold their caches
            time.sleep(3)
            rss_end = sampler.now()
        problems = check(phases, rss_after_below, rss_end, args)
        if not stack.ready():
            problems.append("/v2/health/ready is not 200 after the soak")
        elif not final_forecast(stack):
            problems.append("a forecast after the soak failed")
        print(summary(phases, sampler))
        print(f"model: {describe_weights(args.preset)}")
        print(
            f"RSS after phase below {rss_after_below / MB:.0f} MiB, at the end "
            f"{rss_end / MB:.0f} MiB (bound +{args.max_rss_growth_mb:.0f} MiB); "
            f"reports in {args.report_dir}"
        )
        for problem in problems:
            print(f"SOAK FAILED: {problem}")
        if not problems:
            print("soak passed")
        return 1 if problems else 0
    finally:
        if stack is not None:
            stack.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
