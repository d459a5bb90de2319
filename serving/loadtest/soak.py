"""Bounded soak of a local Kronos stack (`make soak` = `python -m serving.loadtest.soak`).

1. Registers random demo weights (Kronos-small shape by default) in a temporary sqlite
   registry and starts `mlserver start` on free 127.0.0.1 ports with a small queue
   (`KRONOS_QUEUE_CAPACITY_SERIES`) and batch (`max_batch_size`: series in generation at
   once), so that overload is reachable.
2. Phase "below": fewer users than queue slots (each request holds <= max_series series)
   -> no failed request at all.
3. Phase "above": many more users than queue slots -> some 503s, fast (p95 under
   `--max-503-p95-s`), and every accepted request still succeeds.
4. Server RSS (the mlserver process tree, sampled every second) may grow by at most
   `--max-rss-growth-mb` from the end of phase "below" to the end of the run, measured
   once the server is idle again (requests still generating hold their caches).
5. `/v2/health/ready` is 200 afterwards and one more forecast succeeds.

Prints a summary table and exits 1 on any violation. Locust runs as a subprocess per
phase with the project's locustfile; CSV/HTML reports land in `--report-dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
SERVING = ROOT / "serving"
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
MODEL_NAME = "kronos"
OVERLOAD_SUFFIX = " [503 overloaded]"


# -- the local stack -------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def register_demo_model(workdir: Path, preset: str = "small",
                        tokenizer_dir: Path | None = None, model_dir: Path | None = None,
                        max_context: int | None = None) -> str:
    """Log random demo weights (or the given checkpoint dirs) as kronos@champion in a
    fresh sqlite registry under `workdir`; returns its tracking URI."""
    import mlflow
    from mlflow import MlflowClient

    from model_package.kronos import write_random_checkpoint
    from model_package.kronos.presets import preset_by_name
    from model_package.log_model import log_kronos_model

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    if tokenizer_dir is None or model_dir is None:
        shape = preset_by_name(preset)
        if shape is None:
            raise SystemExit(f"unknown preset {preset!r} (mini, small, base)")
        tokenizer_dir = write_random_checkpoint(shape.tokenizer_config, workdir / "tokenizer", 1)
        model_dir = write_random_checkpoint(shape.model_config, workdir / "model", 2)
        max_context = max_context or shape.max_context
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("kronos-loadtest",
                                          artifact_location=(workdir / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_kronos_model(tokenizer_dir, model_dir, registered_model_name=MODEL_NAME,
                                max_context=max_context, example_rows=16,
                                tags={"kronos.weights": "random-demo"})
    client.set_registered_model_alias(MODEL_NAME, "champion", str(info.registered_model_version))
    return uri


@dataclass
class Stack:
    """A running `mlserver start` (own process group) and its ports."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its children (workers)."""
        try:
            root = psutil.Process(self.process.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v2/health/ready", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is queued or being generated (`/kronos/health/live`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                state = httpx.get(f"{self.url}/kronos/health/live", timeout=10).json()
                if not state.get("running") and not state.get("queued_series"):
                    return True
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        return False

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
            except ProcessLookupError:
                pass


def start_stack(workdir: Path, tracking_uri: str, env: dict[str, str] | None = None,
                model_settings: dict | None = None, timeout_s: float = 300) -> Stack:
    """Start MLServer with serving/'s settings on free ports; wait until the model is ready."""
    ports = [free_port() for _ in range(3)]
    settings = json.loads((SERVING / "settings.json").read_text())
    settings.update(http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                    metrics_dir=str(workdir / "metrics"))
    (workdir / "metrics").mkdir(parents=True, exist_ok=True)
    (workdir / "settings.json").write_text(json.dumps(settings))
    model_dir = workdir / "models" / MODEL_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    spec = json.loads((SERVING / "models" / MODEL_NAME / "model-settings.json").read_text())
    spec.update(model_settings or {})
    (model_dir / "model-settings.json").write_text(json.dumps(spec))
    child_env = {k: v for k, v in os.environ.items()
                 if not k.startswith(("KRONOS_", "MLSERVER", "PYTHONPATH"))}
    child_env.update({"MLFLOW_TRACKING_URI": tracking_uri, "KRONOS_DEVICE": "cpu",
                      "PYTHONPATH": str(ROOT), **(env or {})})
    log = workdir / "mlserver.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlserver")), "start", str(workdir)],
            cwd=workdir, env=child_env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    stack = Stack(process, *ports, log)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"mlserver exited with {process.returncode}:\n{stack.tail()}")
            try:
                if httpx.get(f"{stack.url}/v2/models/{MODEL_NAME}/ready",
                             timeout=5).status_code == 200:
                    return stack
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"mlserver not ready after {timeout_s:.0f} s:\n{stack.tail()}")
    except BaseException:
        stack.stop()
        raise


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


def run_locust(stack: Stack, prefix: Path, users: int, seconds: int, wait: tuple[float, float],
               max_candles: int, seed: int = 0, extra_env: dict[str, str] | None = None,
               stop_timeout_s: int = 120) -> dict[str, Row]:
    """Run the locustfile headless for `seconds`; returns its stats rows by name."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("locust")), "-f", str(LOCUSTFILE), "--headless",
           "-u", str(users), "-r", str(users), "-t", f"{seconds}s",
           "--stop-timeout", str(stop_timeout_s), "--only-summary",
           "--host", stack.url, "--grpc-target", stack.grpc_target,
           "--wait-min", str(wait[0]), "--wait-max", str(wait[1]),
           "--max-candles", str(max_candles), "--payload-seed", str(seed),
           "--csv", str(prefix), "--html", f"{prefix}.html"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "LOADTEST_"))}
    env.update(extra_env or {})
    with (prefix.parent / f"{prefix.name}.log").open("wb") as out:
        subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                       timeout=seconds + stop_timeout_s + 120, check=False)
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
            rows[rec["Name"]] = Row(rec["Name"], int(num("Request Count")),
                                    int(num("Failure Count")), num("Requests/s"), num("50%"),
                                    num("95%"), num("99%"), num("Max Response Time"))
    return rows


# -- memory sampling -------------------------------------------------------------------------

@dataclass
class RssSampler:
    """Samples the stack's RSS every `every_s` seconds in a thread, labelled by phase."""

    stack: Stack
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

MB = 1024 * 1024


def accepted(rows: dict[str, Row]) -> list[Row]:
    return [r for n, r in rows.items() if n != "Aggregated" and not n.endswith(OVERLOAD_SUFFIX)]


def overloaded(rows: dict[str, Row]) -> list[Row]:
    return [r for n, r in rows.items() if n.endswith(OVERLOAD_SUFFIX)]


def summary(phases: dict[str, dict[str, Row]], sampler: RssSampler) -> str:
    """A plain-text table: one line per phase and request name."""
    lines = [f"{'phase':<6} {'name':<34} {'reqs':>6} {'fail':>5} {'req/s':>6} "
             f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7}"]
    for phase, rows in phases.items():
        total = sum(r.requests for r in accepted(rows) + overloaded(rows))
        refused = sum(r.requests for r in overloaded(rows))
        for row in rows.values():
            if row.name == "Aggregated":
                continue
            lines.append(f"{phase:<6} {row.name:<34} {row.requests:>6} {row.failures:>5} "
                         f"{row.rps:>6.2f} {row.p50:>7.0f} {row.p95:>7.0f} {row.p99:>7.0f} "
                         f"{row.max:>7.0f}")
        share = refused / total if total else 0.0
        lines.append(f"{phase:<6} {'503 share':<34} {refused}/{total} = {share:.1%}; "
                     f"peak RSS {sampler.peak(phase) / MB:.0f} MiB")
    lines.append(f"peak RSS of the mlserver process tree over the run: {sampler.peak() / MB:.0f} MiB")
    return "\n".join(lines)


def check(phases: dict[str, dict[str, Row]], rss_after_below: int, rss_end: int,
          args: argparse.Namespace) -> list[str]:
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
        problems.append("above capacity: no 503 at all (raise --above-users or lower "
                        "--queue-capacity)")
    for row in refused:
        if row.p95 > args.max_503_p95_s * 1000:
            problems.append(f"above capacity: {row.name} p95 {row.p95:.0f} ms > "
                            f"{args.max_503_p95_s * 1000:.0f} ms")
    for row in accepted(above):
        if row.failures:
            problems.append(f"above capacity: {row.failures} accepted {row.name} requests "
                            "failed (want 0)")
    if sum(r.requests - r.failures for r in accepted(above)) == 0:
        problems.append("above capacity: no request was accepted and answered")
    growth = (rss_end - rss_after_below) / MB
    if growth > args.max_rss_growth_mb:
        problems.append(f"RSS grew {growth:.0f} MiB after phase 'below' "
                        f"(bound {args.max_rss_growth_mb} MiB)")
    return problems


def final_forecast(stack: Stack) -> bool:
    """One more small real-candle forecast after the soak."""
    import random

    from serving.loadtest.payloads import PayloadMix, expected_rows, make_spec, rest_body

    spec = make_spec(random.Random(7), PayloadMix(max_candles=64, max_series=1))
    reply = httpx.post(f"{stack.url}/v2/models/{MODEL_NAME}/infer", json=rest_body(spec),
                       timeout=120)
    return (reply.status_code == 200
            and int(reply.json()["outputs"][0]["shape"][0]) == expected_rows(spec))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.loadtest.soak",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("SOAK_SECONDS", 60)),
                        help="length of each phase (s); SOAK_SECONDS")
    parser.add_argument("--queue-capacity", type=int, default=6,
                        help="KRONOS_QUEUE_CAPACITY_SERIES of the soaked server (series)")
    parser.add_argument("--below-users", type=int, default=2,
                        help="users of phase 'below' (users * max-series must fit the queue)")
    parser.add_argument("--above-users", type=int, default=12, help="users of phase 'above'")
    parser.add_argument("--max-series", type=int, default=3, help="most series per request")
    parser.add_argument("--max-candles", type=int, default=256, help="longest history (candles)")
    parser.add_argument("--preset", default="small", help="demo weights shape: mini, small, base")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="max_batch_size (series generated at once; 1 = batching off; 0 = "
                             "the shipped model-settings.json). The server holds this many "
                             "series in generation plus the queue, so a small value keeps "
                             "phase 'above' over capacity")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="KRONOS_TORCH_THREADS (1 leaves a core to the event loop)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=300.0,
                        help="allowed RSS growth from the end of phase 'below' to the end")
    parser.add_argument("--max-503-p95-s", type=float, default=1.0,
                        help="allowed p95 latency of 503 answers (s)")
    parser.add_argument("--report-dir", type=Path, default=ROOT / "loadtest-reports" / "soak")
    parser.add_argument("--honor-retry-after", action="store_true",
                        help="users pause Retry-After seconds after a 503 (default: retry)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state dir")
    args = parser.parse_args(argv)
    if args.below_users * args.max_series > args.queue_capacity:
        parser.error("phase 'below' could fill the queue: below-users * max-series > "
                     "queue-capacity")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="kronos-soak-"))
    stack: Stack | None = None
    try:
        print(f"soak: registering {args.preset} demo weights under {workdir}", flush=True)
        uri = register_demo_model(workdir, args.preset)
        env = {"KRONOS_QUEUE_CAPACITY_SERIES": str(args.queue_capacity),
               "KRONOS_TORCH_THREADS": str(args.torch_threads)}
        settings = {"max_batch_size": args.max_batch_size} if args.max_batch_size else None
        started = time.monotonic()
        stack = start_stack(workdir / "server", uri, env, settings)
        print(f"soak: mlserver ready in {time.monotonic() - started:.0f} s on {stack.url} "
              f"(gRPC {stack.grpc_target}), queue capacity {args.queue_capacity} series",
              flush=True)
        phases: dict[str, dict[str, Row]] = {}
        args.report_dir.mkdir(parents=True, exist_ok=True)
        load = {"max_candles": args.max_candles,
                "extra_env": {"LOADTEST_MAX_SERIES": str(args.max_series),
                              "LOADTEST_HONOR_RETRY_AFTER": str(args.honor_retry_after).lower()}}
        with RssSampler(stack) as sampler:
            sampler.phase = "below"
            print(f"soak: phase below: {args.below_users} users, {args.seconds} s", flush=True)
            phases["below"] = run_locust(stack, args.report_dir / "below", args.below_users,
                                         args.seconds, (0.2, 1.0), **load)
            rss_after_below = sampler.now()
            sampler.phase = "above"
            print(f"soak: phase above: {args.above_users} users, {args.seconds} s", flush=True)
            phases["above"] = run_locust(stack, args.report_dir / "above", args.above_users,
                                         args.seconds, (0.05, 0.3), seed=1, **load)
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
        print(f"RSS after phase below {rss_after_below / MB:.0f} MiB, at the end "
              f"{rss_end / MB:.0f} MiB (bound +{args.max_rss_growth_mb:.0f} MiB); "
              f"reports in {args.report_dir}")
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
