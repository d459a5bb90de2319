"""The gateway scripts run as the container runs them: plain scripts, unprivileged nginx."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from serving.gateway.process import wait_for_port
from serving.local_server import free_port, free_ports

pytestmark = pytest.mark.integration  # real nginx and exporter processes

GATEWAY_DIR = Path(__file__).resolve().parents[2] / "serving" / "gateway"


def _as_unprivileged(command: list[str]) -> list[str]:
    """Run as `nobody` when the tests run as root; as the current user otherwise."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop root in this test"
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]


def _status_field(pid: int | str, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split()[1]
    raise KeyError(field)


def _uid(pid: int | str) -> int:
    """Real uid of a process (Linux /proc)."""
    return int(_status_field(pid, "Uid"))


def _uids_of_children(pid: int) -> list[int]:
    """Real uids of the direct children of `pid`."""
    uids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_status_field(entry.name, "PPid")) == pid:
                uids.append(_uid(entry.name))
        except (FileNotFoundError, ProcessLookupError, KeyError):
            continue  # exited meanwhile
    return uids


def _let_others_traverse(path: Path) -> None:
    """Add the search (x) bit for others on every parent of `path` that lacks it."""
    for parent in path.parents:
        if parent != Path("/") and not parent.stat().st_mode & 0o001:
            os.chmod(parent, parent.stat().st_mode | 0o001)


def _wait_for_pid_file(pid_file: Path, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Block until nginx's master (this process, after exec) has written its pid file."""
    deadline = time.monotonic() + timeout_s
    while not (pid_file.exists() and pid_file.read_text().strip() == str(process.pid)):
        assert process.poll() is None, "the gateway exited"
        assert time.monotonic() < deadline, f"no {pid_file} after {timeout_s} s"
        time.sleep(0.05)


def test_render_script_and_nginx_run_without_root(tmp_path: Path) -> None:
    prefix = tmp_path / "gateway"
    prefix.mkdir()
    os.chmod(tmp_path, 0o755)  # nobody must reach the prefix (pytest's tmp is private)
    # ... and the scripts and the venv, wherever the checkout lies (mktemp dirs are 0700)
    for path in (tmp_path, GATEWAY_DIR, Path(sys.prefix)):
        _let_others_traverse(path)
    if os.geteuid() == 0:
        os.chown(prefix, 65534, 65534)
    http_port, grpc_port, status_port = free_ports(3)
    env = {
        **os.environ,
        "KRONOS_GATEWAY_LISTEN_HOST": "127.0.0.1",
        "KRONOS_GATEWAY_HTTP_PORT": str(http_port),
        "KRONOS_GATEWAY_GRPC_PORT": str(grpc_port),
        "KRONOS_GATEWAY_STATUS_PORT": str(status_port),
        "KRONOS_GATEWAY_WORKER_PROCESSES": "1",
    }
    env.pop("KRONOS_GATEWAY_USER", None)
    # as in the gateway image: the script path, not the package, from another directory
    process = subprocess.Popen(
        _as_unprivileged(
            [sys.executable, str(GATEWAY_DIR / "render.py"), "--prefix", str(prefix), "--check", "--exec"]
        ),
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        # `--check` runs `nginx -t` first, which binds the ports for a moment too: wait for
        # the real master (it writes the pid file) before connecting.
        _wait_for_pid_file(prefix / "nginx.pid", process, timeout_s=30)
        wait_for_port("127.0.0.1", status_port, timeout_s=15)
        url = f"http://127.0.0.1:{status_port}/gateway/health"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
        owners = _uids_of_children(process.pid)
        assert owners and 0 not in owners  # nginx workers
        assert _uid(process.pid) != 0  # and the master
        assert (prefix / "nginx.pid").read_text().strip() == str(process.pid)
        assert (prefix / "logs" / "access.log").exists()
    except Exception as error:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
        raise AssertionError(f"gateway failed; its stderr: {stderr.decode()}") from error
    process.terminate()
    _, stderr = process.communicate(timeout=10)
    assert b"emerg" not in stderr, stderr.decode()


def test_exporter_script_runs_standalone(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "access.log"
    log.write_text("")
    process = subprocess.Popen(
        [
            sys.executable,
            str(GATEWAY_DIR / "log_exporter.py"),
            "--log",
            str(log),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout_s=15)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert b"kronos_gateway_log_lines_total 0.0" in response.read()
    finally:
        process.terminate()
        assert process.wait(10) == 0
