"""Helpers of the registry tests: run the CLI as a subprocess, free ports, a PostgreSQL
cluster and an MLflow server (real processes, always stopped)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
CLI_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_env(tracking_uri: str) -> dict[str, str]:
    """The environment of a CLI child: this registry, no inherited run, a fixed user."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KRONOS_"))}
    env.update({"MLFLOW_TRACKING_URI": tracking_uri, "KRONOS_USER": "registry-tests",
                "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "KRONOS_DEVICE": "cpu"})
    return env


def run_cli(tracking_uri: str, *args: str, cwd: Path | None = None,
            timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """`python -m registry_scripts ARGS` against `tracking_uri`."""
    return subprocess.run([sys.executable, "-m", "registry_scripts", *args], env=cli_env(tracking_uri),
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)


def stop(process: subprocess.Popen) -> None:
    """Terminate a child started with start_new_session=True, and its process group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _as_postgres(*command: str) -> list[str]:
    """Run as the postgres user when we are root (PostgreSQL refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:port (database `mlflow`, trust auth)."""

    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/mlflow"

    @classmethod
    def start(cls) -> Postgres:
        root = Path(tempfile.mkdtemp(prefix="kronos-pg-"))
        root.chmod(0o755)  # the postgres user must reach its data dir
        cluster = cls(root, free_port())
        cluster.data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(cluster.data, "postgres", "postgres")
        quiet = {"capture_output": True, "text": True, "timeout": 180, "check": True}
        subprocess.run(_as_postgres(str(PG_BIN / "initdb"), "-D", str(cluster.data), "-U", "postgres",
                                    "--auth=trust", "-E", "UTF8", "--locale=C"), **quiet)
        options = f"-p {cluster.port} -k {cluster.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(cluster.data), "-o", options,
                                    "-l", str(cluster.data / "server.log"), "-w", "-t", "120", "start"), **quiet)
        subprocess.run(_as_postgres(str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(cluster.port),
                                    "-U", "postgres", "-c", "CREATE DATABASE mlflow"), **quiet)
        return cluster

    def stop(self) -> None:
        subprocess.run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                                    "stop"), capture_output=True, timeout=120)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a backend store and proxied artifacts."""

    process: subprocess.Popen
    url: str
    log: Path

    @classmethod
    def start(cls, backend_uri: str, artifacts: Path, log: Path, timeout: float = 240) -> MlflowServer:
        port = free_port()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        command = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", backend_uri,
                   "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1"]
        with log.open("w") as sink:
            process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        server = cls(process, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
            try:
                if requests.get(server.url + "/health", timeout=2).status_code == 200:
                    return server
            except requests.RequestException:
                pass
            time.sleep(0.5)
        stop(process)
        raise RuntimeError(f"mlflow server not healthy after {timeout}s: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        stop(self.process)
