"""Test-only servers, importable from every test folder as `support` (tests/ is on sys.path
through the rootdir conftest.py): a throwaway PostgreSQL cluster, `mlflow server` on a
backend store, and `mlflow models serve` run by a shell command.

Ports, process groups and bounded readiness waits come from `serving.local_server`, which
the project's tools use too (no MLServer needed here: the pandas-3 environment imports it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.local_server import LocalProcess, free_port, http_ok, start_process, venv_script

PG_BIN = Path("/usr/lib/postgresql/15/bin")


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
        subprocess.run(
            _as_postgres(
                str(PG_BIN / "initdb"),
                "-D",
                str(cluster.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ),
            **quiet,
        )
        options = f"-p {cluster.port} -k {cluster.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres(
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(cluster.data),
                "-o",
                options,
                "-l",
                str(cluster.data / "server.log"),
                "-w",
                "-t",
                "120",
                "start",
            ),
            **quiet,
        )
        subprocess.run(
            _as_postgres(
                str(PG_BIN / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(cluster.port),
                "-U",
                "postgres",
                "-c",
                "CREATE DATABASE mlflow",
            ),
            **quiet,
        )
        return cluster

    def stop(self) -> None:
        subprocess.run(
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"),
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class HttpProcess(LocalProcess):
    """A child process serving HTTP at `url`."""

    url: str


def start_mlflow_server(
    backend_uri: str,
    artifacts: Path,
    log: Path,
    timeout_s: float = 240,
    extra_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> HttpProcess:
    """`mlflow server` on 127.0.0.1:`port` (default: a free port; a fixed one lets a test
    stop the server and start it again at the same URL) with a backend store and proxied artifacts,
    healthy (`/health`) within `timeout_s`; `extra_args` (e.g. `--app-name kronos-auth`) and
    `extra_env` go to the server as well."""
    port = port or free_port()
    command = [
        venv_script("mlflow"),
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        *extra_args,
    ]
    url = f"http://127.0.0.1:{port}"
    process = start_process(
        command,
        log,
        lambda: http_ok(f"{url}/health", timeout_s=2),
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})},
        timeout_s=timeout_s,
        what="mlflow server",
    )
    return HttpProcess(process, log, url)


def start_models_serve(
    command: str, port: int, log: Path, cwd: Path, env: Mapping[str, str], timeout_s: float = 120
) -> HttpProcess:
    """`mlflow models serve ... -p PORT` given as one shell command line (run by `bash -c`,
    as a user pastes it), ready when the scoring server's `/ping` answers 200."""
    url = f"http://127.0.0.1:{port}"
    process = start_process(
        ["bash", "-c", command],
        log,
        lambda: http_ok(f"{url}/ping"),
        env=env,
        cwd=cwd,
        timeout_s=timeout_s,
        what="mlflow models serve",
    )
    return HttpProcess(process, log, url)
